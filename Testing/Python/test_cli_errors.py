"""The command line's last line of defence: exit codes 3 (internal error, traceback only in a log file) and
130 (interrupted); the published prompts JSON Schema matches the code; --replace-nonfinite and --check-only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import liversam.commands.segment as segment_command
from conftest import REPO_ROOT
from liversam.cli import main
from liversam.prompt_schema import prompts_json_schema


def _inputs(tmp_path: Path, nan: bool = False) -> tuple[Path, Path]:
    array = np.full((3, 40, 48), -1000, dtype=np.float32 if nan else np.int16)
    array[:, 10:30, 12:36] = 60
    if nan:
        array[0, :2, :5] = np.nan
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(ct))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinate_system": "IJK", "segments": [
        {"name": "liver", "boxes": [[[12, 10, 1], [35, 29, 1]]]}]}))  # fmt: skip
    return ct, prompts


def test_unexpected_exception_exits_3_with_a_log_file_and_no_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIVERSAM_HOME", str(tmp_path / "home"))

    def broken(args):
        raise RuntimeError("simulated bug deep inside")

    monkeypatch.setattr(segment_command, "run", broken)
    code = main(["segment", "ct.nrrd", "--prompts", "p.json", "--output", str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback" not in err and "internal error" in err and "simulated bug deep inside" in err
    logs = list((tmp_path / "home" / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: simulated bug" in text
    assert "segment ct.nrrd --prompts p.json" in text


def test_interrupt_exits_130_and_leaves_outputs_alone(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"previous result")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(segment_command, "run", interrupted)
    assert main(["segment", "ct.nrrd", "--prompts", "p.json", "--output", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == b"previous result"


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["segment", "--no-such-option"])
    assert info.value.code == 2


def test_published_prompts_schema_matches_the_code():
    published = json.loads((REPO_ROOT / "docs" / "prompts.schema.json").read_text())
    assert published == json.loads(json.dumps(prompts_json_schema())), (
        "docs/prompts.schema.json is stale: python -m liversam.prompt_schema > docs/prompts.schema.json"
    )


def test_example_prompts_validate_against_the_published_schema():
    from liversam.prompt_schema import PromptsFile

    PromptsFile.model_validate(json.loads((REPO_ROOT / "examples" / "lits117" / "prompts.json").read_text()))


def test_check_only_validates_without_the_model_and_writes_nothing(tmp_path, capsys):
    ct, prompts = _inputs(tmp_path)
    out = tmp_path / "out" / "o.seg.nrrd"
    assert main(["segment", str(ct), "--prompts", str(prompts), "--output", str(out), "--check-only"]) == 0
    assert "ok: CT (48, 40, 3)" in capsys.readouterr().out
    assert not out.parent.exists()


@pytest.mark.model
def test_replace_nonfinite_segments_and_says_how_many(tmp_path, capsys):
    ct, prompts = _inputs(tmp_path, nan=True)
    out = tmp_path / "o.nii.gz"
    argv = ["segment", str(ct), "--prompts", str(prompts), "--output", str(out), "--accelerate", "plain"]
    assert main(argv) == 2
    assert "10 non-finite voxel(s)" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--replace-nonfinite", "-1000"]) == 0
    assert "replaced 10 non-finite CT voxel(s) by -1000" in capsys.readouterr().out
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert labels[1, 15:25, 18:30].all()  # the bright block on the prompted slice is segmented


@pytest.mark.parametrize(
    ("argv", "option", "says"),
    [
        (["segment", "{ct}", "--prompts", "{p}", "--output", "{o}", "--window-width", "-5"], "--window-width", "above 0"),
        (["segment", "{ct}", "--prompts", "{p}", "--output", "{o}", "--window-width", "0"], "--window-width", "above 0"),
        (["segment", "{ct}", "--prompts", "{p}", "--output", "{o}", "--window-level", "nan"], "--window-level", "finite"),
        (["segment", "{ct}", "--prompts", "{p}", "--output", "{o}", "--cache-mb", "-1"], "--cache-mb", "above 0"),
        (["segment", "{ct}", "--prompts", "{p}", "--output", "{o}", "--closing-mm", "nan"], "--closing-mm", "finite"),
        (["segment", "{ct}", "--prompts", "{p}", "--output", "{o}", "--opening-mm", "-2"], "--opening-mm", "0 or more"),
        (["segment", "{ct}", "--prompts", "{p}", "--output", "{o}", "--min-island-mm2", "-1"], "--min-island-mm2",
         "0 or more"),
        (["segment", "{ct}", "--prompts", "{p}", "--output", "{o}", "--threads", "-1"], "--threads", "0 or more"),
        (["serve", "--port", "70000"], "--port", "65535"),
        (["serve", "--idle-timeout", "0"], "--idle-timeout", "above 0"),
        (["evaluate", "--data", "{ct}", "--output", "{o}", "--loose-mm", "inf"], "--loose-mm", "finite"),
        (["train", "--data", "{ct}", "--out", "{o}", "--lr", "-0.5"], "--lr", "above 0"),
        (["train", "--data", "{ct}", "--out", "{o}", "--epochs", "0"], "--epochs", "1 or more"),
    ],
)
def test_numeric_options_out_of_range_are_usage_errors_before_any_work(tmp_path, capsys, argv, option, says):
    """A window width of -5 or 0, a NaN level, a negative cache size or radius used to end in "internal error" (exit 3,
    a crash log), a NaN closing radius only after the model had run; a NaN window level wrote an empty segmentation
    with exit 0 and blamed the prompts. Now argparse refuses them: exit 2, the option, what to give."""
    ct, prompts = _inputs(tmp_path)
    out = tmp_path / "o.nii.gz"
    filled = [a.format(ct=ct, p=prompts, o=out) for a in argv]
    with pytest.raises(SystemExit) as stop:
        main(filled)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"argument {option}" in err and says in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "module", "says"),
    [
        ("serve", "liversam.commands.serve", "liversam serve: stopped."),
        ("train", "liversam.commands.train", "the caches of the studies already encoded): run the same command"),
        ("segment", "liversam.commands.segment", "interrupted; no output was changed."),
    ],
)
def test_ctrl_c_says_what_each_command_leaves(command, module, says, capsys, monkeypatch):
    """`liversam serve` stopped with "no output was changed", and train (whose run folder keeps its epochs and resumes)
    said the same."""
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), "run", interrupted)
    argv = {"serve": ["serve"], "train": ["train", "--data", "d", "--out", "o"],
            "segment": ["segment", "ct.nrrd", "--prompts", "p.json", "--output", "o.nii.gz"]}[command]  # fmt: skip
    assert main(argv) == 130
    assert says in capsys.readouterr().err


def test_series_options_on_an_image_file_and_a_report_that_is_not_json_are_refused(tmp_path, capsys):
    """``--series-uid`` with a NIfTI CT was ignored without a word; ``--report c.txt`` wrote JSON into a .txt file
    (``--lesions c.txt`` was already refused)."""
    ct, prompts = _inputs(tmp_path)
    out = tmp_path / "o.nii.gz"
    base = ["segment", str(ct), "--prompts", str(prompts), "--output", str(out), "--check-only"]
    assert main([*base, "--series-uid", "1.2.3"]) == 2
    assert "--series-uid chooses a series in a DICOM folder" in capsys.readouterr().err
    assert main([*base, "--series-number", "2"]) == 2
    assert "Leave --series-number out" in capsys.readouterr().err
    assert main([*base, "--report", str(tmp_path / "review.txt")]) == 2
    assert "the review report is JSON; use a .json file name" in capsys.readouterr().err
    assert main([*base, "--report", str(tmp_path / "review.json")]) == 0


def test_threads_0_means_torchs_default_on_every_command_and_probabilities_stay_within_0_and_1(tmp_path, capsys):
    """`--threads 0` (torch's default, as segment and serve say) was refused by evaluate and train."""
    from liversam.cli import build_parser

    parser = build_parser()
    for argv in (["evaluate", "--data", "d", "--output", "o.json"], ["train", "--data", "d", "--out", "o"],
                 ["segment", "ct", "--prompts", "p", "--output", "o.nii.gz"], ["serve"]):  # fmt: skip
        assert parser.parse_args([*argv, "--threads", "0"]).threads == 0
    for option in ("--point-prob", "--refine-prob", "--propagation-prompts"):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--data", "d", "--out", "o", option, "1.5"])
        assert f"argument {option}: 1.5: give a probability from 0 to 1" in capsys.readouterr().err
