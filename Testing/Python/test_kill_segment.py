"""``kill -9`` of ``liversam segment`` at random moments: the output is either the complete previous file
(byte-identical) or the complete new one, never a partial file; a killed run's temporary file (named
``.<output>.liversam-partial-<pid>-...``) is the only thing it may leave, and the next run removes it.

Six kills at random moments (seeded): three anywhere between start-up and the end of a measured complete run,
three in its last fifth, where the output is written (the seed puts them at about 0.09, 0.14 and 0.57, and 0.81,
0.90 and 0.99 of a run: start-up, the model, writing, and the very end, which may also finish). A 3-slice crop of lits117 (propagation from one box); ten kills took 2 to 2.7 min in CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.model
KILLS = 6


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def case(tmp_path_factory, data_dir, lits117_label):
    folder = tmp_path_factory.mktemp("kill")
    liver = lits117_label > 0
    k = int(liver.sum(axis=(1, 2)).argmax())
    ct = sitk.ReadImage(str(data_dir / "lits117" / "ct.nii.gz"))[:, :, k - 1 : k + 2]
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"), useCompression=True)
    js, is_ = np.nonzero(liver[k])
    box = [[int(is_.min()), int(js.min()), 1], [int(is_.max()), int(js.max()), 1]]
    for name, propagate in (("previous", False), ("new", True)):
        (folder / f"{name}.json").write_text(json.dumps({"coordinate_system": "IJK", "segments": [
            {"name": "liver", "label": 1, "propagate": propagate, "boxes": [box]}]}))  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "LiverSAM"), LIVERSAM_HOME=str(folder / "home"))
    return folder, env


def _command(folder: Path, prompts: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "liversam", "segment", str(folder / "ct.nii.gz"), "--prompts",
            str(folder / prompts), "--output", str(out), "--accelerate", "plain", "--threads", "2"]  # fmt: skip


def _masks(path: Path) -> dict[str, np.ndarray]:
    from liversam.segmentation_io import read_segmentation

    return {s.name: s.mask_kji for s in read_segmentation(path).segments}


def test_sigkill_at_random_moments_leaves_the_previous_or_the_complete_new_output(case):
    folder, env = case
    out_dir = folder / "out"
    out = out_dir / "liver.seg.nrrd"
    reference = folder / "reference.seg.nrrd"
    started = time.monotonic()
    subprocess.run(_command(folder, "new.json", reference), env=env, check=True, capture_output=True)
    full_run = time.monotonic() - started
    started = time.monotonic()
    subprocess.run(_command(folder, "previous.json", out), env=env, check=True, capture_output=True)
    full_run = min(full_run, time.monotonic() - started)  # the first run was cold (model files, page cache)
    previous_sha, new_masks = _sha(out), _masks(reference)
    assert not all(np.array_equal(m, _masks(out)[n]) for n, m in new_masks.items()), "runs must differ"

    rng = random.Random(49)
    outcomes = []
    for attempt in range(KILLS):
        proc = subprocess.Popen(_command(folder, "new.json", out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        # Half the kills anywhere in the run, half near its end, where the output is being written.
        delay = rng.uniform(0.2, full_run * 1.1) if attempt % 2 == 0 else rng.uniform(0.8, 1.05) * full_run
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        assert killed or proc.returncode == 0, proc.returncode
        if _sha(out) == previous_sha:
            outcomes.append("previous")
        else:
            masks = _masks(out)  # the new file is complete: it reads, and holds the whole new result
            assert masks.keys() == new_masks.keys()
            assert all(np.array_equal(masks[n], new_masks[n]) for n in masks)
            outcomes.append("new")
            previous_sha = _sha(out)  # later kills may leave this one
        others = [p.name for p in out_dir.iterdir() if p != out]
        allowed = f".{out.name}.liversam-partial-{proc.pid}-"
        assert all(name.startswith(allowed) for name in others), (others, proc.pid)
        outcomes[-1] += " (killed)" if killed else " (finished)"
    print(f"\nfull run {full_run:.1f} s; outcomes: {outcomes}")
    assert sum("killed" in o for o in outcomes) >= KILLS // 2  # most runs really were killed

    subprocess.run(_command(folder, "new.json", out), env=env, check=True, capture_output=True)
    assert [p.name for p in out_dir.iterdir()] == [out.name]  # leftovers of killed runs cleaned up
