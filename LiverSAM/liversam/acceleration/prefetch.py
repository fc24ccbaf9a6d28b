"""Encode the neighbours of the slice the user works on, on a background thread.

While the radiologist places a box on slice k (seconds), the worker encodes k, k+1, k-1, k+2, k-2, ...
so that moving to a neighbouring slice, or propagating from k, finds its embeddings already cached. The
worker shares the predictor's thread-safe embedding cache and encoder lock: an interactive request for a
slice the worker is encoding simply waits for that one encode instead of starting a second.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def neighbour_order(k: int, radius: int, num_slices: int, direction: int = 0) -> list[int]:
    """Slices to encode around ``k``, nearest first: k, then k+-1, k+-2, ... up to ``radius`` away.

    ``direction`` > 0 puts k+d before k-d (the user is moving up), < 0 the reverse, 0 alternates starting
    upwards. Slices outside 0..num_slices-1 are left out.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0 slices, got {radius}")
    order = [k] if 0 <= k < num_slices else []
    for d in range(1, radius + 1):
        pair = (k - d, k + d) if direction < 0 else (k + d, k - d)
        order.extend(s for s in pair if 0 <= s < num_slices)
    return order


class BackgroundPrefetcher:
    """Pre-encode slices near the current one on a daemon worker thread.

    ``predictor`` is a :class:`liversam.predictor.SlicePredictor` (anything with ``embedding(k)``,
    ``is_cached(k)`` and ``volume.num_slices``). Call :meth:`focus` whenever the user moves to a slice; the
    plan for the previous slice is dropped at the next slice boundary. ``radius``: how many slices on each
    side to encode (each costs one encoder run). Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        predictor,
        radius: int = 3,
        on_encoded: Callable[[int], None] | None = None,
        start: bool = True,
    ) -> None:
        if radius < 0:
            raise ValueError(f"radius must be >= 0 slices, got {radius}")
        self.predictor = predictor
        self.radius = int(radius)
        self.on_encoded = on_encoded
        self.encoded: list[int] = []  # slices this prefetcher actually sent to the encoder, in order
        self.errors: list[tuple[int, BaseException]] = []
        self._cond = threading.Condition()
        self._plan: list[int] = []
        self._generation = 0
        self._last_focus: int | None = None
        self._busy = False
        self._paused = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="LiverSAM-prefetch", daemon=True)
        if start:
            self._thread.start()

    # --- control (any thread) ---------------------------------------------------------------------------

    def focus(self, k: int, radius: int | None = None) -> None:
        """The user is now on slice ``k``: (re)plan to encode k and its neighbours, nearest first."""
        with self._cond:
            direction = (
                0
                if self._last_focus is None
                else (1 if k > self._last_focus else -1 if k < self._last_focus else 0)
            )
            self._last_focus = int(k)
            r = self.radius if radius is None else int(radius)
            self._plan = neighbour_order(int(k), r, self.predictor.volume.num_slices, direction)
            self._generation += 1
            self._cond.notify_all()

    def pause(self) -> None:
        """Stop starting new encodes (the one running finishes), e.g. while a propagation uses the CPU."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def cancel(self) -> None:
        """Drop the remaining plan (the encode in progress, if any, finishes)."""
        with self._cond:
            self._plan = []
            self._generation += 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the plan is done (or paused with nothing running); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or (not self._busy and (not self._plan or self._paused)), timeout
            )

    @property
    def pending(self) -> list[int]:
        with self._cond:
            return list(self._plan)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker (after the encode in progress) and wait for it up to ``timeout`` seconds."""
        with self._cond:
            self._closed = True
            self._plan = []
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundPrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- worker ----------------------------------------------------------------------------------------------

    def _next(self) -> int | None:
        """Pop the next uncached slice of the plan (None: closed). Waits while idle or paused."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._paused or not self._plan:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                    continue
                k = self._plan.pop(0)
                if self.predictor.is_cached(k):
                    continue
                self._busy = True
                return k

    def _run(self) -> None:
        while True:
            k = self._next()
            if k is None:
                break
            try:
                if not self.predictor.is_cached(k):
                    self.predictor.embedding(k)
                    self.encoded.append(k)
                    if self.on_encoded is not None:
                        self.on_encoded(k)
            except Exception as exc:  # keep the worker alive; the interactive path will report it
                log.warning("Background encoding of slice %d failed: %s", k, exc)
                self.errors.append((k, exc))
        with self._cond:
            self._busy = False
            self._cond.notify_all()
