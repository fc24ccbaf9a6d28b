"""`liversam serve --exit-with-stdin`: a server started by another program ends when that program does, even when
it crashes (its own "stop the server at exit" never runs then): the program holds the server's standard input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from liversam.commands.serve import STARTER_FOLDER_PREFIX


def _serve(tmp_path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "LIVERSAM_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "liversam", "serve", "--port", "0", "--token", "t" * 32, *extra]
    return subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_listening(process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "listening on" in line:
            return
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"the server did not start (exit code {process.poll()})")


def test_the_server_stops_when_its_standard_input_closes(tmp_path):
    process = _serve(tmp_path, "--exit-with-stdin")
    try:
        _wait_listening(process)
        time.sleep(0.5)
        assert process.poll() is None  # running while its starter lives
        process.stdin.close()  # what the operating system does when the starter ends, a crash included
        assert process.wait(timeout=20) == 0
        assert "standard input closed" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_without_the_option_a_closed_input_does_not_stop_the_server(tmp_path):
    process = _serve(tmp_path)
    try:
        _wait_listening(process)
        process.stdin.close()
        time.sleep(3)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=20)


STARTER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from LiverSAMLib.ServerClient import LocalServerProcess
server = LocalServerProcess(sys.executable, startup_timeout=120)
server.start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def test_a_local_server_ends_when_the_program_that_started_it_is_killed(tmp_path):
    """The Slicer module's LocalServerProcess: a SIGKILL to Slicer (a crash) runs no "stop at exit", yet the
    server must not stay behind holding the model."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "LIVERSAM_HOME": str(tmp_path), "TMPDIR": str(temp)}
    module_dir = str(Path(__file__).resolve().parents[2] / "LiverSAM")
    starter = subprocess.Popen([sys.executable, "-c", STARTER, module_dir], env=env, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(starter.stdout.readline())
        os.kill(server_pid, 0)  # running
        folders = list(temp.glob(f"{STARTER_FOLDER_PREFIX}*"))
        assert len(folders) == 1 and list(folders[0].iterdir()), "the starter's folder holds the token file"
        starter.kill()  # no clean-up code runs in the starter
        starter.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(server_pid):
            time.sleep(0.2)
        assert not _alive(server_pid)
        # the server deleted its token and the starter's folder with it (one empty folder a crash of Slicer before)
        assert not folders[0].exists()
    finally:
        if starter.poll() is None:
            starter.kill()


def test_the_server_and_its_starters_agree_on_the_folder_name():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "LiverSAM"))
    from LiverSAMLib.ServerClient import LOCAL_SERVER_FOLDER_PREFIX

    assert LOCAL_SERVER_FOLDER_PREFIX == STARTER_FOLDER_PREFIX


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped by init) is not running
        return stat.read().split(")")[-1].split()[0] != "Z"
