"""`liversam segment` refuses a label mask given as the CT (exit 2, a message naming the file, what is wrong and
what to give instead, nothing written), while every real CT of the shared data still passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from liversam.cli import main
from liversam.ct_io import check_not_label_mask, read_ct

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "examples" / "lits117" / "prompts.json"


def segment(ct: Path, output: Path, *extra: str) -> int:
    return main(["segment", str(ct), "--prompts", str(PROMPTS), "--output", str(output), *extra])


def test_label_mask_as_ct_exits_2_with_a_specific_message_and_writes_nothing(tmp_path, capsys):
    label = REPO / "examples" / "lits117" / "label.nii.gz"
    output = tmp_path / "x.seg.nrrd"
    assert segment(label, output) == 2
    message = capsys.readouterr().err
    assert str(label) in message
    assert "looks like a label mask, not a CT" in message and "(0, 1, 2)" in message
    assert "air near -1000 HU" in message and "--allow-non-ct" in message
    assert list(tmp_path.iterdir()) == []


def test_allow_non_ct_lets_a_label_mask_through(tmp_path, capsys):
    label = REPO / "examples" / "lits117" / "label.nii.gz"
    assert segment(label, tmp_path / "x.seg.nrrd", "--check-only", "--allow-non-ct") == 0
    assert capsys.readouterr().out.startswith("ok: CT")


@pytest.mark.parametrize("case", ["lits117/ct.nii.gz", "totalseg_small/ct.nii.gz", "totalseg_small/ct_dicom",
                                  "hcc0697/ct.nii.gz", "hcc2144/ct.nii.gz", "ircadb17/ct.nii.gz",
                                  "dcmqi_ct3slice/ct"])
def test_real_cts_are_not_taken_for_label_masks(data_dir, case):
    check_not_label_mask(read_ct(data_dir / case))  # raises if refused


@pytest.mark.parametrize("case", ["lits117/label.nii.gz", "hcc0697/label.nii.gz", "dcmqi_ct3slice/liver_seg.nrrd",
                                  "totalseg_small/liver_model_output.nii.gz"])
def test_real_label_files_are_refused(data_dir, case):
    with pytest.raises(Exception, match="looks like a label mask"):
        check_not_label_mask(read_ct(data_dir / case))


def test_synthetic_volumes_without_air_are_not_refused():
    from scripted_predictor import synthetic_volume

    rng = np.random.default_rng(0)
    soft_tissue = rng.normal(60.0, 20.0, (4, 40, 40))  # a crop without air: hundreds of distinct values
    for array in (np.full((3, 40, 48), -1000), soft_tissue.astype(np.int16), soft_tissue.astype(np.float32)):
        check_not_label_mask(synthetic_volume(array))
