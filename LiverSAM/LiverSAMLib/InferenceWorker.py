"""Model inference off the main thread: one persistent worker thread, results handed back by polling.

Why one persistent thread: the model, its device state (CUDA context, MPS) and the per-slice embedding
cache stay with the thread that created them; building that state again for every click costs about a
second, while a prompt change on an encoded slice costs a decoder pass (~0.1 s). Why polling: only the
main thread may touch the MRML scene, so the worker never calls back into Slicer. The widget calls
:meth:`InferenceWorker.poll` from a ``QTimer`` (every ~50 ms); the callbacks run there, on the main thread.

This module uses the standard library (and ``liversam.errors``) only, no Qt and no MRML: it is tested with
plain pytest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The core's exception (standard library only): raised inside a job by :meth:`JobContext.check_cancelled`
# or by the core's pipeline / propagation when the job's cancel flag is set.
from liversam.errors import Cancelled

logger = logging.getLogger(__name__)

__all__ = ["Cancelled", "InferenceWorker", "Job", "JobContext"]


@dataclass
class JobContext:
    """What a running job gets: a cancel flag and a progress reporter (thread-safe)."""

    cancel_event: threading.Event
    _progress: Callable[[int, int, str], None]

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()

    def progress(self, done: int, total: int, message: str = "") -> None:
        self._progress(done, total, message)


@dataclass
class Job:
    """One unit of work. ``function(context, *args)`` runs on the worker thread.

    ``coalesce_key``: a newer job with the same key replaces this one while it still waits (live updates:
    only the latest prompt state of a slice matters). Callbacks run on the thread that calls ``poll``.
    """

    function: Callable[..., Any]
    args: tuple = ()
    on_done: Callable[[Any], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    on_progress: Callable[[int, int, str], None] | None = None
    on_cancelled: Callable[[], None] | None = None
    coalesce_key: str | None = None
    name: str = "job"
    cancel_event: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancel_event.set()


_STOP = object()


class InferenceWorker:
    """A single persistent worker thread with a job queue, cancellation and main-thread callbacks."""

    def __init__(self, name: str = "LiverSAM inference") -> None:
        self._name = name
        self._jobs: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()  # (callback, args) to run on the polling thread
        self._lock = threading.Lock()
        self._pending: dict[str, Job] = {}  # coalesce_key -> waiting job
        self._current: Job | None = None
        self._thread: threading.Thread | None = None
        self.thread_ident: int | None = None  # the worker thread's ident once started (for tests/diagnostics)

    # --- lifecycle ----------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel what runs, drop what waits, stop the thread (the widget's ``cleanup``)."""
        self.cancel_all()
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join(timeout)
        self._thread = None

    # --- submitting -----------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue a job; with a ``coalesce_key`` a still-waiting job of the same key is dropped."""
        self._ensure_started()
        with self._lock:
            if job.coalesce_key is not None:
                previous = self._pending.get(job.coalesce_key)
                if previous is not None:
                    previous.cancel()
                self._pending[job.coalesce_key] = job
        self._jobs.put(job)
        return job

    def run(self, function: Callable[..., Any], *args, **callbacks) -> Job:
        """Shorthand: ``submit(Job(function, args, **callbacks))``."""
        return self.submit(Job(function=function, args=args, **callbacks))

    def cancel_all(self) -> None:
        """Cancel the running job (it stops at its next ``check_cancelled``) and every waiting job."""
        with self._lock:
            if self._current is not None:
                self._current.cancel()
            for job in self._pending.values():
                job.cancel()
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                item.cancel()
                if item.on_cancelled is not None:
                    self._events.put((item.on_cancelled, ()))

    @property
    def busy(self) -> bool:
        """True while a job runs or waits."""
        with self._lock:
            return self._current is not None or not self._jobs.empty()

    # --- main-thread side -------------------------------------------------------------------------------
    def poll(self, max_callbacks: int = 100) -> int:
        """Run pending callbacks on the calling (main) thread; returns how many ran."""
        count = 0
        while count < max_callbacks:
            try:
                callback, args = self._events.get_nowait()
            except queue.Empty:
                break
            try:
                callback(*args)
            except Exception:  # a failing callback must not stop the others
                logger.exception("LiverSAM: callback %s failed", getattr(callback, "__name__", callback))
            count += 1
        return count

    def wait_idle(self, timeout: float = 60.0, poll: bool = True) -> bool:
        """Block until no job runs or waits (tests, the self-test, batch use); runs callbacks if ``poll``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if poll:
                self.poll()
            if not self.busy and self._events.empty():
                return True
            time.sleep(0.01)
        return False

    # --- worker thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        self.thread_ident = threading.get_ident()
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job: Job = item
            with self._lock:
                if job.coalesce_key is not None and self._pending.get(job.coalesce_key) is job:
                    del self._pending[job.coalesce_key]
                if job.cancel_event.is_set():
                    if job.on_cancelled is not None:
                        self._events.put((job.on_cancelled, ()))
                    continue
                self._current = job
            self._execute(job)
            with self._lock:
                self._current = None

    def _execute(self, job: Job) -> None:
        def report(done: int, total: int, message: str = "") -> None:
            if job.on_progress is not None:
                self._events.put((job.on_progress, (done, total, message)))

        context = JobContext(cancel_event=job.cancel_event, _progress=report)
        try:
            result = job.function(context, *job.args)
        except Cancelled:
            if job.on_cancelled is not None:
                self._events.put((job.on_cancelled, ()))
            return
        except BaseException as error:  # reported to the main thread, never lost
            logger.debug("LiverSAM job %s failed", job.name, exc_info=True)
            if job.on_error is not None:
                self._events.put((job.on_error, (error,)))
            else:
                self._events.put((_log_error, (job.name, error)))
            return
        if job.cancel_event.is_set():
            if job.on_cancelled is not None:
                self._events.put((job.on_cancelled, ()))
            return
        if job.on_done is not None:
            self._events.put((job.on_done, (result,)))


def _log_error(name: str, error: BaseException) -> None:
    logger.error("LiverSAM %s failed: %s", name, error)
