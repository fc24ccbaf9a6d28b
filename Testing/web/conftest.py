"""Fixtures of the web app's browser tests: the app (with its own local `liversam serve`) and headless Chromium.

Run with the web environment's pytest (see run_tests.sh): ``$LIVERSAM_WEB_VENV/bin/python -m pytest Testing/web``.
Chromium is Debian's (``/usr/bin/chromium``, or $LIVERSAM_CHROMIUM) driven by Playwright; nothing downloads a browser.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "web") not in sys.path:
    sys.path.insert(0, str(REPO / "web"))  # the liversam_web package
APP_LOG = Path(os.environ.get("LIVERSAM_WEB_LOG", "/tmp/liversam-web-test.log"))  # the app's output, live
CHROMIUM = os.environ.get("LIVERSAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_PYTHON = os.environ.get(
    "LIVERSAM_SERVER_PYTHON",
    str(Path(os.environ.get("LIVERSAM_VENV", Path.home() / ".cache/liversam/venv")) / "bin/python"),
)


class WebApp:
    def __init__(self, process: subprocess.Popen, url: str, log: list[str]) -> None:
        self.process = process
        self.url = url
        self.log = log


@pytest.fixture(scope="session")
def web_app() -> Iterator[WebApp]:
    """``python -m liversam_web`` on a free port, which starts its own ``liversam serve``."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "web"), LIVERSAM_SERVER_PYTHON=SERVER_PYTHON, LIVERSAM_WEB_TRACE="1")
    log_file = APP_LOG.open("w")  # written live: a hang can be read while it lasts
    process = subprocess.Popen(
        [sys.executable, "-m", "liversam_web", "--port", "0"], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            log_file.write(line)
            log_file.flush()
            match = re.search(r"LiverSAM web app: (http://\S+)", line)
            if match and not found.is_set():
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 180
    while not found.is_set() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    if not found.is_set():
        process.kill()
        pytest.fail("the web app did not start:\n" + "".join(log[-40:]))
    while time.monotonic() < deadline:  # the page answers once trame's loop runs
        try:
            urllib.request.urlopen(url[0], timeout=2).close()
            break
        except OSError:
            time.sleep(0.3)
    yield WebApp(process, url[0], log)
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `bash setup.sh` (installs Debian's chromium as root) "
                    "or set LIVERSAM_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, web_app, tmp_path):
    from web_page import open_app_page

    context, page = open_app_page(browser, web_app.url)
    yield page
    context.close()
