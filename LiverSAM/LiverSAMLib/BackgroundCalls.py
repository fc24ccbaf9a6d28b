"""Server calls off Slicer's main thread: one I/O thread runs them, a QTimer delivers their results.

The model runs in the LiverSAM server, so the only thing left to do off the main thread is waiting for
HTTP answers. Slicer never releases Python's GIL while it idles in the Qt event loop (PythonQt thread
support is off), so a Python thread only runs while the main thread runs Python. :meth:`CallQueue.poll`
therefore *waits* on the result queue for a few milliseconds (``queue.get(timeout=...)`` releases the
GIL): each tick of the widget's QTimer gives the I/O thread that long to send a request or read an answer,
and the views stay responsive because the tick never waits longer.

Every callback runs in :meth:`CallQueue.poll`, i.e. on the main thread, where MRML may be touched.
:meth:`CallQueue.invalidate` (scene closed, module cleaned up) drops the results of every call submitted
before it, so nothing computed for a closed scene is ever written into the new one.

Standard library only; tested with pytest.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Call:
    """One blocking call (``function()``) and what to do with its outcome on the main thread."""

    function: Callable[[], Any]
    on_done: Callable[[Any], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    key: str | None = None
    epoch: int = 0
    name: str = ""


class CallQueue:
    """Runs calls one after another on a daemon thread; ``poll()`` hands their outcomes back in order.

    ``key``: a newer call with the same key replaces an older one that has not started yet (a burst of
    prompt changes sends only the latest state).
    """

    def __init__(self, poll_wait_s: float = 0.004) -> None:
        self.poll_wait_s = float(poll_wait_s)
        self._pending: list[Call] = []
        self._condition = threading.Condition()
        self._results: queue.Queue[tuple[Call, bool, Any]] = queue.Queue()
        self._epoch = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="LiverSAM server calls", daemon=True)
        self._thread.start()

    # --- main thread ---------------------------------------------------------------------------------
    def submit(
        self,
        function: Callable[[], Any],
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        key: str | None = None,
        name: str = "",
    ) -> Call:
        call = Call(function, on_done, on_error, key, self._epoch, name)
        with self._condition:
            if self._closed:
                raise RuntimeError("the call queue is closed")
            if key is not None:
                self._pending = [c for c in self._pending if c.key != key]
            self._pending.append(call)
            self._condition.notify()
        return call

    def poll(self, wait_s: float | None = None) -> int:
        """Deliver finished calls' outcomes (main thread). Waits up to ``wait_s`` for the first one, which
        lets the I/O thread run. Returns how many callbacks ran."""
        delivered = 0
        wait = self.poll_wait_s if wait_s is None else float(wait_s)
        if wait > 0 and self.idle():
            wait = 0.0  # no call to wait for: the widget's timer ticks with the module open never block Slicer
        while True:
            try:
                call, ok, value = self._results.get(timeout=wait) if wait > 0 else self._results.get_nowait()
            except queue.Empty:
                return delivered
            wait = 0.0
            if call.epoch != self._epoch:
                logger.info("LiverSAM: dropped the result of '%s' (the scene was closed meanwhile)", call.name)
                continue
            callback = call.on_done if ok else call.on_error
            if callback is not None:
                try:
                    callback(value)
                except Exception:  # a failing callback must not stop the others
                    logger.exception("LiverSAM: callback of '%s' failed", call.name)
            elif not ok:
                logger.error("LiverSAM: %s failed: %s", call.name or "server call", value)
            delivered += 1

    def invalidate(self) -> None:
        """Forget every call submitted so far: pending ones never run, running ones' results are dropped."""
        with self._condition:
            self._epoch += 1
            self._pending = []

    @property
    def epoch(self) -> int:
        return self._epoch

    def idle(self) -> bool:
        """True when no call is waiting or running and every outcome has been delivered."""
        with self._condition:
            return not self._pending and not self._running and self._results.empty()

    def close(self, wait_s: float = 0.0) -> bool:
        """Stop the I/O thread: pending calls never run; the running one ends by itself (its result is not delivered).
        Waits up to ``wait_s`` for the thread to end (the wait releases the GIL); True when it has ended."""
        with self._condition:
            self._closed = True
            self._pending = []
            self._condition.notify()
        if wait_s > 0 and self._thread is not threading.current_thread():
            self._thread.join(wait_s)
        return not self._thread.is_alive()

    # --- I/O thread --------------------------------------------------------------------------------------
    _running = False

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                call = self._pending.pop(0)
                self._running = True
            try:
                value, ok = call.function(), True
            except BaseException as error:  # delivered to on_error on the main thread
                value, ok = error, False
            with self._condition:
                self._running = False
            self._results.put((call, ok, value))


def run_with_deadline(function: Callable[[], Any], timeout_s: float, name: str = "") -> bool:
    """Run ``function()`` on a daemon thread of its own and wait at most ``timeout_s`` for it (main thread).

    For the module's cleanup: the I/O thread may be busy for minutes (a CT upload, a slice waiting for the model), so
    what must happen before Slicer exits or reloads the module cannot queue behind it. The wait releases the GIL, so
    the thread runs meanwhile (also in Slicer); a thread still running at the deadline is left behind (it must bound
    its own calls). True when ``function`` ended in time; its exception is logged, not raised.
    """
    finished = threading.Event()

    def run() -> None:
        try:
            function()
        except Exception as error:  # best effort: the caller has nothing to do with it
            logger.warning("LiverSAM: %s failed: %s", name or "cleanup", error)
        finally:
            finished.set()

    threading.Thread(target=run, name=f"LiverSAM {name or 'cleanup'}", daemon=True).start()
    return finished.wait(max(0.0, float(timeout_s)))
