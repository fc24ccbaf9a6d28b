"""Which LiverSAM server the Slicer module talks to, and the local server it starts and stops.

Two ways to reach a server (the module's *Server* section; kept in Slicer's application settings):

- ``local`` (default): LiverSAM starts ``<python> -m liversam serve --port 0 --token-file F`` on this
  computer the first time it is needed and stops it when Slicer exits. ``<python>`` is a Python
  environment that has the ``liversam`` package with its server and model packages (the virtual
  environment ``setup.sh`` makes, by default ``~/.cache/liversam/venv``), never Slicer's own Python,
  whose packages are shared with Slicer's modules (Slicer 5.10's DICOM module needs pydicom 2.4, which
  highdicom does not accept);
- ``remote``: a server already running elsewhere (e.g. a GPU machine), by URL and token.

The connection is checked once: when it fails (no such Python, server exits, wrong token) the state
becomes ``failed`` with the reason, and nothing is retried until the user presses *Connect* again, so an
offline user never gets a dialog at every click.

No Qt, no MRML: :meth:`ServerConnection.connect` blocks (it may start a process and wait for it), so the
widget runs it through :class:`LiverSAMLib.BackgroundCalls.CallQueue`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from .ServerClient import (
    AuthError,
    LiverSAMClient,
    LocalServerProcess,
    ServerUnavailable,
)

SETTINGS_GROUP = "LiverSAM/Server"
LOCAL, REMOTE = "local", "remote"
STOPPED, STARTING, READY, FAILED = "stopped", "starting", "ready", "failed"


class SettingsStore(Protocol):
    """What ``qt.QSettings`` offers and the connection needs (a dict adapter in tests)."""

    def value(self, key: str, default: Any = None) -> Any: ...

    def setValue(self, key: str, value: Any) -> None: ...  # noqa: N802 - QSettings' name


def default_server_python() -> str:
    """``$LIVERSAM_PYTHON``, else the Python of ``setup.sh``'s virtual environment when it exists, else ''."""
    configured = os.environ.get("LIVERSAM_PYTHON", "")
    if configured:
        return configured
    venv = Path(os.environ.get("LIVERSAM_VENV", Path.home() / ".cache" / "liversam" / "venv"))
    for candidate in (venv / "bin" / "python", venv / "Scripts" / "python.exe"):
        if candidate.is_file():
            return str(candidate)
    return ""


@dataclass
class ServerSettings:
    """The module's server settings (application-wide, not saved with the scene)."""

    mode: str = LOCAL
    python: str = ""
    url: str = ""
    token: str = ""
    model: str = "litemedsam"
    device: str = "auto"

    @classmethod
    def load(cls, store: SettingsStore) -> ServerSettings:
        values = {}
        for field in fields(cls):
            stored = store.value(f"{SETTINGS_GROUP}/{field.name}", None)
            if stored not in (None, ""):
                values[field.name] = str(stored)
        settings = cls(**values)
        if not settings.python:
            settings.python = default_server_python()
        return settings

    def save(self, store: SettingsStore) -> None:
        for field in fields(self):
            store.setValue(f"{SETTINGS_GROUP}/{field.name}", str(getattr(self, field.name)))

    def problem(self) -> str | None:
        """What is missing to connect, in words the user can act on, or None."""
        if self.mode == REMOTE:
            if not self.url.startswith(("http://", "https://")):
                return "Enter the LiverSAM server's URL (http://host:port) in the Server section."
            if not self.token:
                return "Enter the token the LiverSAM server printed (or its --token-file) in the Server section."
            return None
        if self.mode != LOCAL:
            return f"Unknown server mode '{self.mode}': choose 'local' or 'remote'."
        if not self.python:
            return (
                "No Python environment with LiverSAM is configured. Run 'bash setup.sh' in the LiverSAM "
                "checkout (it makes ~/.cache/liversam/venv), or choose that environment's python in the "
                "Server section."
            )
        resolved = shutil.which(self.python) if not os.path.isabs(self.python) else self.python
        if not resolved or not os.path.isfile(resolved):
            return f"Server Python '{self.python}' does not exist: choose the python of the LiverSAM environment."
        return None

    def serve_arguments(self) -> list[str]:
        """Extra ``liversam serve`` options for a local server."""
        arguments = []
        if self.model:
            arguments += ["--model", self.model]
        if self.device and self.device != "auto":
            arguments += ["--device", self.device]
        return arguments


class ServerConnection:
    """The server LiverSAM uses: started (local) or reached (remote) once, on demand; ``client`` when ready."""

    def __init__(self, settings: ServerSettings, startup_timeout_s: float = 120.0) -> None:
        self.settings = settings
        self.startup_timeout_s = float(startup_timeout_s)
        self.state = STOPPED
        self.message = "Not connected: the server starts when LiverSAM first needs it."
        self.info: dict[str, Any] = {}
        #: the models the server's machine can load (GET /v1/models: built-in and registered ones), as the server last
        #: listed them; kept when the server stops (they are the machine's, not the process's)
        self.models: list[dict[str, Any]] = []
        self._client: LiverSAMClient | None = None
        self._process: LocalServerProcess | None = None
        self._lock = threading.Lock()
        read_startup_environment()  # here, on the main thread: the server is started from the I/O thread

    @property
    def client(self) -> LiverSAMClient | None:
        return self._client if self.state == READY else None

    @property
    def started_here(self) -> bool:
        """True when this connection started the server process (and must stop it)."""
        return self._process is not None and self._process.running()

    def connect(self) -> LiverSAMClient:
        """Start or reach the server (blocking; call it off the main thread). Raises ServerUnavailable /
        AuthError with the reason, and remembers it (``state`` FAILED).

        The lock is not held while the server starts (up to ``startup_timeout_s``) or answers: :meth:`stop`,
        :meth:`reset` and :meth:`lost` run on Slicer's main thread, which would freeze until then; a
        :meth:`stop` meanwhile ends the starting process, and this call then fails."""
        with self._lock:
            if self.state == READY and self._client is not None:
                return self._client
            if self.state == STARTING:  # another thread is starting it: no second server
                raise ServerUnavailable("The LiverSAM server is still starting: try again in a moment.")
            problem = self.settings.problem()
            if problem:
                self._fail(problem)
                raise ServerUnavailable(problem)
            self.state, self.message = STARTING, "Starting the LiverSAM server..."
            settings = self.settings
            process = None
            if settings.mode == LOCAL:
                process = self._process = LocalServerProcess(
                    settings.python,
                    extra_args=settings.serve_arguments(),
                    startup_timeout=self.startup_timeout_s,
                    env=server_environment(),
                )
        try:
            client = process.start() if process is not None else LiverSAMClient(settings.url, settings.token)
            info = client.info()  # needs the token: a wrong one fails here, once
            models = list_models(client)
        except (ServerUnavailable, AuthError) as error:
            with self._lock:
                if process is not None and self._process is process:
                    self._stop_process()
                if self.state == STARTING:
                    self._fail(str(error))
            raise
        with self._lock:
            if self.state != STARTING or (process is not None and self._process is not process):
                if process is not None:
                    process.stop()  # stopped (or reset) while it started
                raise ServerUnavailable(f"The LiverSAM server was stopped while it started. {self.message}")
            self.info = info
            if models is not None:
                self.models = models
            self._client = client
            self.state = READY
            where = "local server" if settings.mode == LOCAL else settings.url
            model = self.info.get("model") or {}  # the server's info: {"model": {"name", "device", ...}, ...}
            self.message = "Connected to the {where}: model {model} on {device}.".format(
                where=where, model=model.get("name", "?"), device=model.get("device", "?")
            )
            return client

    def ensure(self) -> LiverSAMClient:
        """The client when ready; connects the first time; after a failure raises it again without retrying."""
        if self.state == FAILED:
            raise ServerUnavailable(self.message)
        return self.connect()

    def lost(self, error: BaseException) -> None:
        """The server stopped answering (it crashed, was killed, or the network went): say so once and offer
        a restart. Later requests fail with this message, without waiting on a dead server, until
        :meth:`reset` (the Connect button) starts or reaches it again. Nothing in the scene is changed."""
        with self._lock:
            exited = ""
            if self._process is not None and not self._process.running():
                code = self._process.process.poll() if self._process.process is not None else None
                exited = f" (the local server exited with code {code})" if code is not None else ""
            self._stop_process()
            where = "local LiverSAM server" if self.settings.mode == LOCAL else f"LiverSAM server at {self.settings.url}"
            self._fail(
                f"The {where} stopped answering{exited}: {error}. The segmentation was not changed. "
                "Press Connect to start it again (an unfinished propagation must be run again)."
            )

    def reset(self, settings: ServerSettings | None = None) -> None:
        """Stop the server started here, forget the failure; the next :meth:`ensure` connects again. The model list is
        kept unless the settings name another server or Python environment (another machine's or registry's list)."""
        self.stop()
        changed = settings is not None and settings != self.settings
        if settings is not None:
            old = self.settings
            if (settings.mode, settings.python, settings.url) != (old.mode, old.python, old.url):
                self.models = []
            self.settings = settings
        self.state, self.message = STOPPED, self.next_start_message(changed)

    def next_start_message(self, changed: bool = False) -> str:
        """The status while no server is running or reached: what happens at the next request (nothing failed)."""
        settings = self.settings
        if settings.mode == LOCAL:
            model = Path(settings.model).name if settings.model else "litemedsam"
            device = "" if settings.device in ("", "auto") else f" on {settings.device}"
            what = f"the local server starts with model '{model}'{device} at the next request"
        else:
            what = f"LiverSAM connects to {settings.url or 'the remote server'} at the next request"
        return f"{'Settings changed' if changed else 'Not connected'}: {what} (or press Connect)."

    def abort_requests(self) -> int:
        """Stop the client's requests under way (a CT upload: the server keeps nothing of it) and refuse its later ones
        except those that free the server's resources (:meth:`LiverSAMClient.abort`); any thread. The client is given
        up: the next :meth:`ensure` after :meth:`stop` or :meth:`reset` makes a new one. Returns how many were stopped."""
        client = self._client
        return client.abort() if client is not None else 0

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop the server this connection started (a remote server keeps running): the client's requests under way are
        stopped first (an upload to the local server would hold its shutdown up), then the process is asked to end and
        killed when it has not ended within ``wait_s``."""
        self.abort_requests()
        with self._lock:
            self._stop_process(wait_s)
            self._client = None
            if self.state != FAILED:
                self.state, self.message = STOPPED, "Stopped."

    def _stop_process(self, wait_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop(wait_s)

    def _fail(self, reason: str) -> None:
        self.state = FAILED
        self.message = reason
        self._client = None


def list_models(client: LiverSAMClient) -> list[dict[str, Any]] | None:
    """The models the server's machine can load (:meth:`LiverSAMClient.models`), or None when the server does not list
    them (an older server) or the list failed (logged: the connection does not depend on it)."""
    try:
        answer = client.models()
    except (ServerUnavailable, AuthError):
        raise
    except Exception as error:  # noqa: BLE001 - any other answer (a proxy's page, not JSON) leaves the list out
        logging.getLogger(__name__).warning("LiverSAM: the server did not list its models: %s", error)
        return None
    if not isinstance(answer, dict):
        return None
    models = answer.get("models")
    return [dict(m) for m in models if isinstance(m, dict) and m.get("name")] if isinstance(models, list) else None


#: Slicer's startup environment, read once on the main thread (:func:`read_startup_environment`): it is a Qt call
#: (qSlicerCoreApplication::startupEnvironment), and the server starts and DICOM SEG exports run on the I/O thread
_startup_environment: dict[str, str] | None = None


def read_startup_environment() -> dict[str, str] | None:
    """The environment Slicer was started with (None outside Slicer); main thread, the first time (the module's logic
    calls it as it is made). It never changes while Slicer runs."""
    global _startup_environment
    if _startup_environment is None:
        try:
            import slicer

            if getattr(slicer, "app", None) is None:
                return None
            _startup_environment = {str(k): str(v) for k, v in slicer.util.startupEnvironment().items()}
        except (ImportError, AttributeError):
            return None
    return _startup_environment


def _environment_before_slicer() -> dict[str, str]:
    """The environment Slicer was started with, when running inside Slicer: its launcher also puts Slicer's own
    libraries on the library path (``LD_LIBRARY_PATH`` with Slicer's libpython, ``PATH`` with its Python's
    ``bin``; SuperBuild/External_python.cmake), which another Python must not load. ``LIVERSAM_*`` variables set
    during the session are kept. Outside Slicer: this process's environment."""
    startup = read_startup_environment()
    if startup is None:
        return dict(os.environ)
    environment = dict(startup)
    environment.update({k: v for k, v in os.environ.items() if k.startswith("LIVERSAM_")})
    return environment


def server_environment() -> dict[str, str]:
    """The server's environment: Slicer's own Python variables and library paths removed, so the server's Python
    uses its own standard library and packages (Slicer's launcher sets PYTHONHOME / PYTHONPATH for PythonSlicer)."""
    environment = {
        k: v for k, v in _environment_before_slicer().items() if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE")
    }
    if os.environ.get("LIVERSAM_SERVER_PYTHONPATH"):  # a source checkout of the core (tests, developers)
        environment["PYTHONPATH"] = os.environ["LIVERSAM_SERVER_PYTHONPATH"]
    environment.setdefault("PYTHONIOENCODING", "utf-8")
    if sys.platform == "win32":
        environment.setdefault("PYTHONUTF8", "1")
    return environment
