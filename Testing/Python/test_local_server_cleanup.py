"""`LocalServerProcess.start()` leaves nothing behind when the start-up fails: no `liversam-server-*` token folder
and no server process, whether the server exits while starting, cannot be launched, or the wait is interrupted."""

from __future__ import annotations

import _thread
import os
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "LiverSAM"))
from LiverSAMLib.ServerClient import LocalServerProcess, ServerUnavailable  # noqa: E402


@pytest.fixture
def own_temp_dir(tmp_path, monkeypatch) -> Path:
    """The temporary folder start() makes its token folder in: a fresh one, so that only its own folders count."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def server_folders(temp_dir: Path) -> list[Path]:
    return sorted(temp_dir.glob("liversam-server-*"))


def server_env(home: Path) -> dict:
    path = os.pathsep.join(p for p in (str(REPO / "LiverSAM"), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, LIVERSAM_HOME=str(home))


def silent_python(folder: Path, seconds: str) -> str:
    """A stand-in server "python" that starts, never announces an address, and ends after ``seconds``."""
    path = folder / "silent-python"
    path.write_text(f"#!/bin/sh\nexec sleep {seconds}\n")
    path.chmod(0o755)
    return str(path)


def test_server_that_exits_while_starting_leaves_no_token_folder(own_temp_dir, tmp_path):
    process = LocalServerProcess(sys.executable, ["--max-sessions", "0"], startup_timeout=60,
                                 env=server_env(tmp_path / "home"))
    with pytest.raises(
        ServerUnavailable,
        match="exited with code 2 while starting:\nliversam serve: error: argument --max-sessions: 0: give a whole number",
    ):
        process.start()
    assert not process.running()
    assert server_folders(own_temp_dir) == []


def test_server_that_cannot_be_launched_leaves_no_token_folder(own_temp_dir, tmp_path):
    process = LocalServerProcess(str(tmp_path / "no-such-python"), startup_timeout=10)
    with pytest.raises(ServerUnavailable, match="cannot start the LiverSAM server"):
        process.start()
    assert server_folders(own_temp_dir) == []


def test_interrupted_start_up_stops_the_server_and_leaves_no_token_folder(own_temp_dir, tmp_path):
    # a stand-in "python" that never announces its address: start() waits until Ctrl-C (interrupt_main) arrives
    process = LocalServerProcess(silent_python(tmp_path, "61.5"), startup_timeout=60)
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            process.start()
    finally:
        timer.cancel()
    assert process.process is None and not process.running()
    assert not [p for p in psutil.Process().children() if p.cmdline() == ["sleep", "61.5"]]
    assert server_folders(own_temp_dir) == []


def test_stop_from_another_thread_during_start_up_is_a_clear_error(own_temp_dir, tmp_path):
    """The Slicer module's Stop server runs on the main thread while the I/O thread waits in start(): start() must
    fail with ServerUnavailable (which the module reports), not an AttributeError on the cleared process."""
    process = LocalServerProcess(silent_python(tmp_path, "62.5"), startup_timeout=60)
    timer = threading.Timer(1.0, process.stop)
    timer.start()
    try:
        with pytest.raises(ServerUnavailable, match="stopped while it started"):
            process.start()
    finally:
        timer.cancel()
    assert not process.running() and server_folders(own_temp_dir) == []
