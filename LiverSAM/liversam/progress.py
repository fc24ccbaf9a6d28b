"""Progress of long commands: a bar on a terminal, a line per stage in a log file or CI, nothing when quiet.

Every long operation of LiverSAM reports progress through one callback type, :data:`ProgressCallback`::

    progress(stage: str, done: int, total: int) -> None

``stage`` is a short human-readable label (``"propagating 'liver'"``, ``"segment 'tumor'"``), ``done`` and
``total`` count the stage's units (slices, cases, segments); ``done`` only grows within a stage, a new
``stage`` string starts a new stage, ``done`` may stop below ``total`` (a propagation that ends early), and
``segment_volume`` ends with ``progress("done", n, n)``.
Calls come from the thread doing the work and must return quickly. A server forwards the same three values
to its clients (e.g. as JSON ``{"stage": ..., "done": ..., "total": ...}`` events); the command line shows
them with :class:`ProgressReporter`.

Output goes to stderr: a tqdm bar (stage, done / total, time left) when stderr is a terminal, else one line
when a stage starts and one when it ends (plus one a minute in between), and nothing after
``configure(quiet=True)`` (``liversam ... --quiet``). :func:`progress_bar` is the same choice with tqdm's
signature, for loops that used tqdm directly.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

ProgressCallback = Callable[[str, int, int], None]

LINE_INTERVAL_S = 60.0  # log mode: at most one line a minute between a stage's start and end
TICK_INTERVAL_S = 1.0  # terminal: a stage without a count redraws its elapsed time this often

_settings = {"quiet": False}
#: the bars :func:`progress_bar` made that are not yet garbage (closed or not): see :func:`close_open_bars`
_bars: weakref.WeakSet = weakref.WeakSet()


def configure(quiet: bool = False) -> None:
    """Process-wide: ``quiet=True`` silences every progress display (the ``--quiet`` option)."""
    _settings["quiet"] = bool(quiet)


def is_quiet() -> bool:
    return _settings["quiet"]


def _is_terminal(stream: IO[str]) -> bool:
    """A terminal a bar can be drawn on: a tty that reports a width (a pty of size 0 x 0, as ``script`` or ``docker
    exec -t`` may give, drew only empty lines: lines are printed there instead)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # a tty without a size to read: as before
        return True


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def _plural(unit: str, count: int | None) -> str:
    """tqdm's units are singular ("case", "slice", "batch"); a log line reads "4 cases", "1/4 cases", "1 case",
    "38 batches"."""
    return unit if count == 1 or unit.endswith("s") else unit + ("es" if unit.endswith(("ch", "sh", "x")) else "s")


class LineProgress:
    """tqdm's interface (iterate, ``update``, ``set_postfix``, ``close``) printing whole lines, for logs."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        file: IO[str] | None = None,
        interval_s: float = LINE_INTERVAL_S,
        **_: Any,
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.unit = unit
        self.n = 0
        self.file = file or sys.stderr
        self.interval_s = interval_s
        self.started = time.perf_counter()
        self._last_line = self.started
        self._closed = False
        self._postfix = ""
        self._write(f"{desc}: started" + (f", {total} {_plural(unit, total)}" if total else ""))

    def _write(self, text: str) -> None:
        print(f"[liversam] {text}", file=self.file, flush=True)

    def _status(self, time_left: bool = True) -> str:
        """The status text, e.g. "3/10 slices, about 5 s left (loss=0.1)"; empty for a stage without a count that
        counted nothing."""
        elapsed = time.perf_counter() - self.started
        if not self.total and not self.n:
            return f"({self._postfix})" if self._postfix else ""
        text = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text += f" {_plural(self.unit, self.total or self.n)}"
        if time_left and self.total and 0 < self.n < self.total:
            text += f", about {_format_seconds(elapsed / self.n * (self.total - self.n))} left"
        return text + (f" ({self._postfix})" if self._postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last_line >= self.interval_s and (not self.total or self.n < self.total):
            self._last_line = now
            self._write(f"{self.desc}: {self._status()}")

    def set_postfix(self, ordered_dict: dict | None = None, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self, ended: str = "done") -> None:
        """The stage's last line: ``ended`` is "done", or how it stopped (:func:`ending_of`)."""
        if not self._closed:
            self._closed = True
            elapsed = _format_seconds(time.perf_counter() - self.started)
            status = self._status(time_left=False)
            joint = " " if status.startswith("(") else ", "  # "done (loss=0.1) in", "done, 3/10 slices in"
            self._write(f"{self.desc}: {ended}{joint + status if status else ''} after {elapsed}"
                        if ended != "done" else f"{self.desc}: done{joint + status if status else ''} in {elapsed}")

    def __iter__(self) -> Iterator:
        assert self.iterable is not None, "LineProgress without an iterable cannot be iterated"
        ended = "done"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        except GeneratorExit:  # the loop was left before the iterable ended: an error or Ctrl-C in its body (said
            ended = "stopped"  # after this line by the command), or a break; which one a generator cannot know
            raise
        except BaseException as exc:
            ended = ending_of(type(exc))
            raise
        finally:
            self.close(ended)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: Any) -> None:
        self.close(ending_of(exc_type))


def ending_of(exc_type: type[BaseException] | None) -> str:
    """How a stage ended, for its last line: "done", "interrupted" (Ctrl-C) or "stopped" (an error, said after)."""
    if exc_type is None or issubclass(exc_type, GeneratorExit):
        return "done"
    return "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "stopped"


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, file: IO[str] | None = None, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` on a terminal, :class:`LineProgress` in a log, a silent tqdm when quiet.

    Accepts tqdm's keyword arguments (``desc``, ``total``, ``unit``, ``leave``, ...).
    """
    from tqdm.auto import tqdm

    stream = file or sys.stderr
    if disable or is_quiet():
        return tqdm(iterable, disable=True, **kwargs)
    bar = (
        tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
        if _is_terminal(stream)
        else LineProgress(iterable, file=stream, **kwargs)
    )
    _bars.add(bar)
    return bar


def close_open_bars(ended: str = "interrupted") -> None:
    """Close every bar :func:`progress_bar` made that is still open; the command line calls it before its last word
    on a Ctrl-C or an error. A bar left open by the exception (a cache being built, an epoch) was otherwise closed
    when the exception's frames were freed, after that word: a terminal bar was drawn again below "interrupted", a
    log's stage never said how it ended. ``ended``: the log line's ending (:func:`ending_of`)."""
    for bar in list(_bars):
        try:
            if isinstance(bar, LineProgress):
                bar.close(ended)
            else:
                bar.close()
        except Exception:  # noqa: BLE001 - a closed stream: the display is not worth an error
            pass
    _bars.clear()


class ProgressReporter:
    """A :data:`ProgressCallback` that shows each stage with :func:`progress_bar` (one bar per stage).

    Use as ``progress=ProgressReporter()`` and call :meth:`close` (or use ``with``) when the work ends.
    """

    def __init__(self, unit: str = "slices", file: IO[str] | None = None, disable: bool = False) -> None:
        self.unit = unit
        self.file = file
        self.disable = disable
        self._stage: str | None = None
        self._bar: Any = None
        self._ticker: _Ticker | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        """``total`` 0: a stage without a count (its start, its end and how long it took)."""
        if stage == "done":  # segment_volume's final call: the work has ended
            self.close()
            return
        if stage != self._stage:
            self.close()
            self._stage = stage
            counted = int(total) > 0
            self._bar = progress_bar(
                total=int(total) if counted else None, desc=stage, unit=self.unit, file=self.file,
                disable=self.disable, **({} if counted else {"bar_format": "{desc}: {elapsed}"}),
            )
            if not counted and hasattr(self._bar, "refresh") and not getattr(self._bar, "disable", True):
                self._ticker = _Ticker(self._bar)  # a terminal bar is drawn only when updated: keep its clock going
        bar = self._bar
        if bar is not None and done > bar.n:
            bar.update(int(done) - bar.n)

    def close(self, ended: str = "done") -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        if isinstance(self._bar, LineProgress):
            self._bar.close(ended)
        elif self._bar is not None:
            self._bar.close()
        self._bar = None
        self._stage = None

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: Any) -> None:
        self.close(ending_of(exc_type))


class _Ticker:
    """Redraws a tqdm bar every :data:`TICK_INTERVAL_S` from a daemon thread until :meth:`stop`.

    A stage without a count (the dense CRF, writing) gets no updates, and tqdm redraws only on an update, so its
    elapsed time stood at 00:00 until the stage ended. ``refresh`` takes tqdm's own lock.
    """

    def __init__(self, bar: Any, interval_s: float | None = None) -> None:
        self._bar = bar
        self._interval_s = TICK_INTERVAL_S if interval_s is None else interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liversam-progress-tick", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._bar.refresh()
            except Exception:  # noqa: BLE001 - a closed stream: the display is not worth an error
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5.0)
