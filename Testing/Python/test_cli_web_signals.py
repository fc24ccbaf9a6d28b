"""A signal sent to `liversam web` stops the web app and its `liversam serve` child too, instead of leaving both
running (re-parented to PID 1) as `subprocess.call` did."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
WEB_VENV = Path(os.environ.get("LIVERSAM_WEB_VENV", Path.home() / ".cache/liversam/web-venv"))
READY_LINE = "LiverSAM web app:"


def start_liversam_web(*app_args: str, **env_vars: str) -> tuple[subprocess.Popen, queue.Queue]:
    """`liversam web --port 0` as a user starts it (the real web environment), its stdout lines in a queue."""
    env = dict(os.environ, LIVERSAM_WEB_VENV=str(WEB_VENV), PYTHONPATH=str(REPO / "LiverSAM"), **env_vars)
    process = subprocess.Popen([sys.executable, "-m", "liversam", "web", "--port", "0", *app_args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return process, lines


def wait_until_ready(process: subprocess.Popen, lines: queue.Queue, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if READY_LINE in lines.get(timeout=0.5):
                return
        except queue.Empty:
            assert process.poll() is None, f"liversam web exited with {process.returncode} before it was ready"
    pytest.fail(f"liversam web did not print {READY_LINE!r} within {timeout:.0f} s")


def wait_gone(processes: list, timeout: float) -> list:
    _gone, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_to_liversam_web_stops_app_and_server(signum):
    # the web app's environment comes with `bash setup.sh`, as the README's test command needs (no skip: CI has it)
    assert (WEB_VENV / "bin" / "python").is_file(), f"no web app environment at {WEB_VENV}: run bash setup.sh"
    process, lines = start_liversam_web()
    descendants: list = []
    try:
        wait_until_ready(process, lines)
        descendants = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in descendants]
        assert any("liversam_web" in c for c in commands) and any("liversam serve" in c for c in commands), commands
        process.send_signal(signum)
        process.wait(timeout=30)
        alive = wait_gone(descendants, timeout=10)
        assert not alive, f"still running after {signum.name} to liversam web: {[p.cmdline() for p in alive]}"
    finally:
        for child in [*descendants, psutil.Process(process.pid) if process.poll() is None else None]:
            if child is not None and child.is_running():
                child.kill()
        process.wait(timeout=10)


def test_sigterm_while_the_local_server_starts_leaves_no_server_and_no_token_folder(tmp_path):
    assert (WEB_VENV / "bin" / "python").is_file(), f"no web app environment at {WEB_VENV}: run bash setup.sh"
    slow_server = tmp_path / "slow-python"  # stands in for the server's Python: starts, never gets ready
    slow_server.write_text("#!/bin/sh\nexec sleep 300\n")
    slow_server.chmod(0o755)
    temp = tmp_path / "tmp"
    temp.mkdir()
    process, _lines = start_liversam_web("--server-python", str(slow_server), TMPDIR=str(temp))
    descendants: list = []
    try:
        deadline = time.monotonic() + 60
        while not list(temp.glob("liversam-server-*")):
            assert time.monotonic() < deadline, "the web app never started its local server"
            assert process.poll() is None, f"liversam web exited with {process.returncode}"
            time.sleep(0.2)
        time.sleep(0.5)
        descendants = psutil.Process(process.pid).children(recursive=True)
        assert any("sleep" in " ".join(child.cmdline()) for child in descendants)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        alive = wait_gone(descendants, timeout=10)
        assert not alive, f"still running after SIGTERM during start-up: {[p.cmdline() for p in alive]}"
        assert list(temp.glob("liversam-server-*")) == [], "the server's token folder was left behind"
    finally:
        for child in [*descendants, psutil.Process(process.pid) if process.poll() is None else None]:
            if child is not None and child.is_running():
                child.kill()
        process.wait(timeout=10)
