"""``kill -9`` of ``liversam train`` at ten random moments; every rerun of the same command resumes.

Checked after each kill: ``state.pt`` and ``best.pt`` (when present) load as weights-only checkpoints (no
corrupt checkpoint), and the resumed run starts from the last epoch whose state was saved, which is at most
one epoch behind the last epoch the killed run logged in history.csv (history.csv is written just before
the state). At the end the run completes with every epoch in its history exactly once.

Tiny run: lits117, 6 liver slices (split into training and validation), batch 2, 20 decoder-only epochs.
Not part of ``bash run_tests.sh`` (it restarts training ten times: several minutes even on idle cores; 23 min
when 25 processes shared the 2 cores). Run it with::

    LIVERSAM_TEST_DATA=../shared/data python -m pytest -p no:cacheprovider -q -s Testing/faults

The first kill falls during start-up / data preparation (embedding cache being written); each later run is
killed at a random moment within 1.5 epochs after it has finished (and saved) its first new epoch, so every
run makes progress and the kills land anywhere in an epoch, including while its state is being saved.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "LiverSAM"))
DATA_DIR = Path(os.environ.get("LIVERSAM_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
pytestmark = pytest.mark.model
EPOCHS = 20
KILLS = 10


def _command(data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "liversam", "train", "--data", str(data), "--out", str(run_dir),
            "--max-slices", "6", "--epochs", str(EPOCHS), "--batch-size", "2", "--patience", "100",
            "--device", "cpu", "--threads", "2", "--seed", "0", "--no-progress", "--events",
            "--no-register", "--no-test-report"]  # fmt: skip


def _history_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


class Watched:
    """A training process whose stdout events are collected by a thread (time of the first one kept)."""

    def __init__(self, command: list[str], env: dict) -> None:
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.new_epoch = threading.Event()  # set when this run finished (and saved) an epoch >= 1
        self.epoch_seconds = 2.0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("LIVERSAM_EPOCH "):
                row = json.loads(line[len("LIVERSAM_EPOCH "):])
                if int(row["epoch"]) >= 1 and not self.new_epoch.is_set():
                    self.epoch_seconds = float(row.get("seconds") or 2.0)
                    self.new_epoch.set()
        self.new_epoch.set()

    def events(self, kind: str) -> list[dict]:
        prefix = f"LIVERSAM_{kind} "
        return [json.loads(line[len(prefix):]) for line in self.lines if line.startswith(prefix)]

    def kill_after(self, seconds: float) -> bool:
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.thread.join(timeout=10)
        return self.proc.returncode == -signal.SIGKILL


def test_training_killed_ten_times_resumes_each_time_losing_at_most_one_epoch(tmp_path):
    from liversam.models import safe_torch_load

    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "LiverSAM"), LIVERSAM_HOME=str(tmp_path / "home"))
    assert (DATA_DIR / "lits117" / "ct.nii.gz").is_file(), f"set LIVERSAM_TEST_DATA (not found: {DATA_DIR})"
    command = _command(DATA_DIR / "lits117", run_dir)
    rng = random.Random(15)
    started = time.monotonic()
    report = []
    expected_resume = None
    for attempt in range(KILLS):
        run = Watched(command, env)
        if attempt == 0:
            killed = run.kill_after(rng.uniform(3.0, 8.0))  # during start-up / data preparation
        else:
            run.new_epoch.wait(timeout=900)
            killed = run.kill_after(rng.uniform(0.0, 1.5 * run.epoch_seconds))
        resumes = run.events("RESUME")
        if expected_resume is not None:
            assert resumes and resumes[0]["epoch"] == expected_resume, (resumes, expected_resume, run.lines[-5:])
        logged = _history_epochs(run_dir)
        state_epoch = None
        if (run_dir / "state.pt").exists():
            state = safe_torch_load(run_dir / "state.pt")  # raises if the checkpoint is corrupt
            state_epoch = int(state["epoch"])
            assert [int(r["epoch"]) for r in state["history"]] == list(range(state_epoch + 1))
            assert max(logged) - state_epoch <= 1, (logged, state_epoch)  # at most one finished epoch lost
        if (run_dir / "best.pt").exists():
            safe_torch_load(run_dir / "best.pt")
        expected_resume = state_epoch
        report.append(f"{'killed' if killed else 'finished'} at state epoch {state_epoch}")
        if not killed:
            assert run.proc.returncode == 0, "".join(run.lines[-20:])
            break

    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    summary = json.loads(final.stdout.strip().splitlines()[-1])
    print(f"\n{len(report)} runs in {time.monotonic() - started:.0f} s: {report}; final: {summary}")
    assert sum(r.startswith("killed") for r in report) >= KILLS - 2
    assert sum("epoch None" not in r for r in report) >= KILLS - 2  # the kills hit training, not only start-up
    assert _history_epochs(run_dir) == list(range(EPOCHS + 1))  # every epoch once: nothing redone twice
    assert [p.name for p in run_dir.iterdir() if ".liversam-partial-" in p.name] == []
