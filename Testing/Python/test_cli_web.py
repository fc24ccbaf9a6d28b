"""`liversam web` launches the web app from its own environment, passes every option on, and says what to do
when that environment is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_liversam(args: list[str], web_venv: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIVERSAM_WEB_VENV=str(web_venv), PYTHONPATH=str(REPO / "LiverSAM"))
    return subprocess.run([sys.executable, "-m", "liversam", "web", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_web_environment_is_a_clear_error(tmp_path):
    result = run_liversam(["--port", "0"], tmp_path / "no-web-venv")
    assert result.returncode == 2
    assert "no-web-venv" in result.stderr and "bash setup.sh" in result.stderr


def test_options_go_to_the_web_app(tmp_path):
    # a stand-in web environment whose python is this one: the app's --help needs only the stdlib client
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    result = run_liversam(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--server-url" in result.stdout and "--token-file" in result.stdout
    assert "start the LiverSAM web app" in result.stdout and "``" not in result.stdout  # plain text, no reST
    result = run_liversam(["--server-url", "http://127.0.0.1:9", "--token", "x"], tmp_path)
    assert result.returncode == 2
    assert "not reachable" in result.stderr
