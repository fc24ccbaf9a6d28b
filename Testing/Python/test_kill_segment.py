"""``kill -9`` of ``liversam segment`` at moments spread over its stages: the output is either the complete previous
file (byte-identical) or the complete new one, never a partial file; a killed run's temporary file (named
``.<output>.liversam-partial-<pid>-...``) is the only thing it may leave, and the next run removes it.

One kill per stage of a run, each stage located by what the run prints on stderr (and timed on a complete run of
this machine, so that a loaded machine moves the moments with the run instead of bunching them at its start):

1. start-up (imports, reading the CT, loading the model): a random moment before the segment stage began;
2. the segment stage (encoding, decoding, post-processing): a random moment between its 'started' and 'done' lines;
3. between writing the output and renaming it into place: the process kills itself (SIGKILL) when the atomic writer
   flushes the finished temporary file, the last moment before the rename (a writer without the rename would leave a
   truncated output here); kills at random times hit this window of milliseconds only by chance (session 40: six
   of them on a loaded VM all came before the write);
4. after the rename, before the process ends: a random moment after the 'wrote' line (it may also finish).

Kill 4's write removes the leftover of kill 3. A 2-slice crop of lits117, one box per run and no propagation (one
slice encoded a run: the test is about the output file, not the segmentation): six runs, four of them killed. Six
kills at random times of a 3-slice run took 177 s on a loaded 2-core VM (session 40), and never hit moment 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.model
STARTED, DONE, WROTE = "): started", "): done in", "liversam.segmentation_io: wrote "

# `liversam segment`, killing itself once the finished temporary file of its output is flushed (before the rename).
KILLED_BEFORE_RENAME = """
import os, runpy, signal, sys
import liversam.atomic_write as atomic_write
flush = atomic_write._flush_to_disk
def flush_then_die(path):
    if path.is_file() and atomic_write.PARTIAL_MARKER in path.name:
        os.kill(os.getpid(), signal.SIGKILL)
    flush(path)
atomic_write._flush_to_disk = flush_then_die
sys.argv = ["liversam", *sys.argv[1:]]
runpy.run_module("liversam", run_name="__main__", alter_sys=True)
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def case(tmp_path_factory, data_dir, lits117_label):
    folder = tmp_path_factory.mktemp("kill")
    liver = lits117_label > 0
    k = int(liver.sum(axis=(1, 2)).argmax())
    ct = sitk.ReadImage(str(data_dir / "lits117" / "ct.nii.gz"))[:, :, k : k + 2]
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"), useCompression=True)
    for name, slice_k in (("previous", 0), ("new", 1)):  # one slice encoded per run
        js, is_ = np.nonzero(liver[k + slice_k])
        box = [[int(is_.min()), int(js.min()), slice_k], [int(is_.max()), int(js.max()), slice_k]]
        (folder / f"{name}.json").write_text(json.dumps({"coordinate_system": "IJK", "segments": [
            {"name": "liver", "label": 1, "propagate": False, "boxes": [box]}]}))  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "LiverSAM"), LIVERSAM_HOME=str(folder / "home"),
               PYTHONUNBUFFERED="1")  # fmt: skip
    return folder, env


def _arguments(folder: Path, prompts: str, out: Path) -> list[str]:
    return ["segment", str(folder / "ct.nii.gz"), "--prompts", str(folder / prompts), "--output", str(out),
            "--accelerate", "plain", "--threads", "2"]  # fmt: skip


class _Run:
    """A ``liversam segment`` process; its stderr lines are collected as they come, with when they came."""

    def __init__(self, command: list[str], env: dict) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.started, line))

    def seen(self, text: str) -> float | None:
        """When (seconds after the start) a line holding ``text`` came, or None."""
        return next((t for t, line in list(self.lines) if text in line), None)

    def wait_for(self, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.seen(text) is None and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)

    def kill_after(self, delay: float) -> bool:
        """SIGKILL the process ``delay`` s from now unless it ends before; True when it was killed."""
        try:
            self.proc.wait(timeout=max(delay, 0.0))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=10)
        assert self.proc.returncode in (0, -signal.SIGKILL), (self.proc.returncode, self.stderr()[-2000:])
        return self.proc.returncode == -signal.SIGKILL

    def finish(self) -> dict[str, float]:
        """Wait for a complete run; when its stages began (seconds after the start)."""
        assert self.proc.wait(timeout=900) == 0, self.stderr()[-2000:]
        self._reader.join(timeout=10)
        times = {text: self.seen(text) for text in (STARTED, DONE, WROTE)}
        assert None not in times.values(), self.stderr()
        return {**times, "end": time.monotonic() - self.started}

    def stderr(self) -> str:
        return "".join(line for _t, line in self.lines)


def _masks(path: Path) -> dict[str, np.ndarray]:
    from liversam.segmentation_io import read_segmentation

    return {s.name: s.mask_kji for s in read_segmentation(path).segments}


def test_sigkill_at_random_moments_leaves_the_previous_or_the_complete_new_output(case):
    folder, env = case
    liversam = [sys.executable, "-m", "liversam"]
    out_dir = folder / "out"
    out = out_dir / "liver.seg.nrrd"
    reference = folder / "reference.seg.nrrd"
    timings = [_Run(liversam + _arguments(folder, "new.json", reference), env).finish()]
    timings.append(_Run(liversam + _arguments(folder, "previous.json", out), env).finish())
    # the first run was cold (model files, page cache): each stage's moment from the quicker run
    stage = {key: min(t[key] for t in timings) for key in timings[0]}
    previous, new_masks = out.read_bytes(), _masks(reference)
    assert not all(np.array_equal(m, _masks(out)[n]) for n, m in new_masks.items()), "runs must differ"

    rng = random.Random(47)  # puts the timed kills at 0.35, 0.43 and 0.45 of their stages
    outcomes = []

    def check(run: _Run, killed: bool, moment: str) -> str:
        """The output is the previous file or the complete new one; only the killed run's temporary file is left.
        The previous file is put back for the next kill (each kill can tell the two apart)."""
        if out.read_bytes() == previous:
            outcome = "previous"
        else:
            masks = _masks(out)  # the new file is complete: it reads, and holds the whole new result
            assert masks.keys() == new_masks.keys()
            assert all(np.array_equal(masks[n], new_masks[n]) for n in masks)
            outcome = "new"
            out.write_bytes(previous)
        others = [p.name for p in out_dir.iterdir() if p != out]
        allowed = f".{out.name}.liversam-partial-{run.proc.pid}-"
        assert all(name.startswith(allowed) for name in others), (moment, others, run.proc.pid)
        outcomes.append(f"{moment}: {outcome} ({'killed' if killed else 'finished'}{', partial left' * bool(others)})")
        return outcome

    # 1. start-up: before the segment stage began
    run = _Run(liversam + _arguments(folder, "new.json", out), env)
    killed = run.kill_after(rng.uniform(0.2, stage[STARTED]))
    assert killed and check(run, killed, "start-up") == "previous"
    # 2. the segment stage: the model encodes and decodes the slice
    run = _Run(liversam + _arguments(folder, "new.json", out), env)
    run.wait_for(STARTED)
    check(run, run.kill_after(rng.uniform(0.0, stage[DONE] - stage[STARTED])), "segment stage")
    # 3. the output written to its temporary file, not yet renamed into place
    run = _Run([sys.executable, "-c", KILLED_BEFORE_RENAME] + _arguments(folder, "new.json", out), env)
    assert run.kill_after(900), "the run was to kill itself before the rename"
    assert run.seen(WROTE) is None and run.seen(DONE) is not None
    assert check(run, True, "before the rename") == "previous"
    [leftover] = [p for p in out_dir.iterdir() if p != out]  # the killed writer's temporary file, complete
    assert leftover.stat().st_size > 0
    # 4. after the rename: the 'wrote' line comes once the output is in place
    run = _Run(liversam + _arguments(folder, "new.json", out), env)
    run.wait_for(WROTE)
    assert run.seen(WROTE) is not None, run.stderr()[-2000:]
    killed_after_rename = run.kill_after(rng.uniform(0.0, 0.5 * (stage["end"] - stage[WROTE])))
    assert check(run, killed_after_rename, "after the rename") == "new"
    print(f"\nstages of a run (s): {stage}; outcomes: {outcomes}")
    assert [p.name for p in out_dir.iterdir()] == [out.name]  # the leftover of kill 3 removed by the next write
