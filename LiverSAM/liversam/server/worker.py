"""The one thread that owns the model and runs every model call.

Work is taken in priority order: interactive predictions (:data:`INTERACTIVE`) before jobs (:data:`JOB`),
and background pre-encoding only when nothing else waits, one slice at a time, so a click never waits
for more than the encode in progress: a running job lets the waiting predictions run between two of its slices
(:meth:`InferenceWorker.run_waiting_interactive`). The model is loaded by this thread on first use, never at import.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import LiverSAMError, ModelError

log = logging.getLogger(__name__)

INTERACTIVE = 0
JOB = 1


class InferenceWorker:
    """``submit(fn, priority)`` runs ``fn(model)`` on the worker thread and returns a Future of its result."""

    def __init__(self, load_model: Callable[[], Any]) -> None:
        self._load_model = load_model
        self._model: Any = None
        self.model_error: str | None = None
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int, Callable[[Any], Any], Future]] = []
        self._seq = itertools.count()
        # key (session id) -> (embed(model, k) callable, slices still to encode), round-robin between keys
        self._prefetch: OrderedDict[str, tuple[Callable[[Any, int], None], list[int]]] = OrderedDict()
        self._closed = False
        self.state = "idle"
        self._thread = threading.Thread(target=self._run, name="liversam-inference", daemon=True)
        self._thread.start()

    @property
    def model(self) -> Any:
        """The loaded model, or None before the first model call."""
        return self._model

    def _ensure_model(self) -> Any:
        """The model, loaded now if it is not yet. A load that fails raises :class:`ModelError` (any other exception
        of the loader becomes one: the requests answer 503 saying so, not 500), keeps its full message in
        ``model_error`` (the API gives it without the server's paths) and logs it: once, not again for each request
        that tries again and fails the same way."""
        if self._model is None:
            self.state = "loading model"
            try:
                self._model = self._load_model()
            except Exception as exc:
                error = exc if isinstance(exc, ModelError) else ModelError(
                    str(exc) if isinstance(exc, LiverSAMError) else f"loading it failed: {type(exc).__name__}: {exc}")
                message = str(error)
                if message != self.model_error:
                    log.error("The model cannot be loaded: %s", message, exc_info=error is not exc)
                else:
                    log.debug("The model still cannot be loaded (the same error as logged before).")
                self.model_error = message
                if error is exc:
                    raise
                raise error from exc
            if self.model_error is not None:
                log.info("The model is loaded now (it failed before).")
            self.model_error = None
        return self._model

    def submit(self, fn: Callable[[Any], Any], priority: int = JOB) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference worker is stopped")
            heapq.heappush(self._queue, (priority, next(self._seq), fn, future))
            self._cond.notify_all()
        return future

    def plan_prefetch(self, key: str, embed: Callable[[Any, int], None], ks: list[int]) -> None:
        """Replace ``key``'s plan: encode ``ks`` (nearest first) when the worker is otherwise idle."""
        with self._cond:
            self._prefetch.pop(key, None)
            if ks:
                self._prefetch[key] = (embed, list(ks))
            self._cond.notify_all()

    def drop_prefetch(self, key: str) -> None:
        with self._cond:
            self._prefetch.pop(key, None)

    def pending_prefetch(self, key: str) -> list[int]:
        with self._cond:
            plan = self._prefetch.get(key)
            return list(plan[1]) if plan else []

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            for _, _, _, future in self._queue:
                future.cancel()
            self._queue.clear()
            self._prefetch.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _next(self) -> tuple[Callable[[Any], Any], Future | None] | None:
        with self._cond:
            while not self._closed:
                if self._queue:
                    _, _, fn, future = heapq.heappop(self._queue)
                    return fn, future
                if self._prefetch:
                    key, (embed, plan) = next(iter(self._prefetch.items()))
                    k = plan.pop(0)
                    self._prefetch.pop(key)
                    if plan:  # back of the line: sessions take turns
                        self._prefetch[key] = (embed, plan)
                    return functools.partial(embed, k=k), None
                self.state = "idle"
                self._cond.wait()
            return None

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            self._execute(*item)
            # not kept while waiting for the next one: the work's closure holds its session (a closed session's CT
            # and embeddings stayed in memory until another user's next click)
            del item

    def _execute(self, fn: Callable[[Any], Any], future: Future | None) -> None:
        if future is not None and not future.set_running_or_notify_cancel():
            return
        self.state = "busy" if future is not None else "pre-encoding"
        try:
            result = fn(self._ensure_model())
        except BaseException as exc:  # delivered to the waiting request; the thread lives on
            if future is not None:
                future.set_exception(exc)
            else:
                log.warning("background encoding failed: %s", exc)
            return
        if future is not None:
            future.set_result(result)

    def run_waiting_interactive(self) -> int:
        """Run the interactive requests waiting now, from inside a job (its check between two slices; worker thread
        only, elsewhere nothing happens). A long propagation would otherwise hold every other user's click until it
        ends; this way a click waits for at most one slice of it. Returns how many ran."""
        if threading.current_thread() is not self._thread:
            return 0
        ran, state = 0, self.state
        while True:
            with self._cond:
                if self._closed or not self._queue or self._queue[0][0] != INTERACTIVE:
                    break
                _, _, fn, future = heapq.heappop(self._queue)
            self._execute(fn, future)
            ran += 1
        self.state = state
        return ran
