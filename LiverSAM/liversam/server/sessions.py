"""CT sessions: one per opened CT, owned by the token that opened it, bounded in number and in memory, expiring when
idle.

A session keeps the CT, its :class:`liversam.predictor.SlicePredictor` (created on the inference thread at the first
model call, with an embedding cache of its own bounded in MB and by the server's memory budget) and named masks
(uploaded by the client, or written by the session's finished jobs).

Memory: the sessions together hold at most ``memory_limit_bytes`` (CT arrays, embedding caches, masks and the job
results the server keeps, :mod:`.memory`). Opening a CT that would go over it evicts the least recently used idle
sessions (no job running) of any owner first, and is refused (:class:`ServerFull`, 503) when that cannot make room;
an uploaded mask does the same (never evicting its own session), and a finished job's masks are always kept
(:meth:`SessionStore.keep_job_masks`). A CT being read counts with the copy reading makes, from the moment room
is made for it (:meth:`SessionStore.make_room`, ``reserve``). A cache that grows over it evicts other sessions idle for
:data:`IDLE_BEFORE_A_CACHE_EVICTS_S` or more, else gives up its own oldest slices. A closed session's memory is freed
on a thread of its own, never on the caller's (the event loop): dropping a 1 GB cache takes about 100 ms.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..freed_memory import return_freed_memory_to_os
from ..predictor import SlicePredictor
from ..preprocess import WindowSettings
from ..volume import CTVolume
from .budgeted_cache import BudgetedEmbeddingCache
from .memory import HeldBytes, distinct_nbytes, mb

#: A growing embedding cache evicts only sessions nobody has used for this long: two users working at once must not
#: evict each other's CT slice by slice (each would then upload it again and evict the other's in turn).
IDLE_BEFORE_A_CACHE_EVICTS_S = 300.0


class SessionNotFound(LookupError):
    pass


class ServerFull(RuntimeError):
    pass


@dataclass
class Session:
    id: str
    owner: str
    volume: CTVolume
    window: WindowSettings
    cache_mb: float
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    active_jobs: int = 0
    closed: bool = False
    #: ``over_budget(nbytes)`` of the server's memory budget for this session's cache (None: no budget)
    over_budget: Callable[[int], int] | None = None
    _predictor: SlicePredictor | None = None

    def predictor(self, model) -> SlicePredictor:
        """The session's predictor (inference thread only)."""
        if self._predictor is None or self._predictor.model is not model:
            cache = BudgetedEmbeddingCache(self.cache_mb, self.over_budget) if self.over_budget else None
            self._predictor = SlicePredictor(
                model, self.volume, window=self.window, cache_mb=self.cache_mb, cache=cache
            )
        return self._predictor

    def is_cached(self, k: int) -> bool:
        predictor = self._predictor
        return predictor is not None and predictor.is_cached(k)

    @property
    def cached_slices(self) -> int:
        return len(self._predictor.cache) if self._predictor is not None else 0

    def held(self, result_masks: Iterable[np.ndarray] = ()) -> HeldBytes:
        """The bytes this session holds: its CT, its embeddings, its masks and ``result_masks`` (its kept job
        results), each array counted once."""
        predictor = self._predictor
        cache = predictor.cache if predictor is not None else None
        embeddings = getattr(cache, "held_bytes", None)
        if embeddings is None:
            embeddings = round(cache.size_mb * 2**20) if cache is not None else 0
        masks = distinct_nbytes([*list(self.masks.values()), *result_masks])
        return HeldBytes(ct=self.volume.array_kji.nbytes, embeddings=embeddings, masks=masks)

    def release(self) -> None:
        """Drop the embeddings and the masks (the session is gone; its CT goes with the last reference to it)."""
        self.closed = True
        if self._predictor is not None:
            self._predictor.cache.clear()
        self._predictor = None
        self.masks.clear()


def _no_results(session: Session) -> list[np.ndarray]:
    return []


class SessionStore:
    """Sessions by id. ``on_evict(session)`` runs for every session closed, expired or evicted, on the store's release
    thread (then the freed memory is given back to the operating system). ``result_masks(session)``: the masks of
    the session's job results the server keeps (counted in the memory budget)."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float,
        on_evict: Callable[[Session], None],
        memory_limit_bytes: int | None = None,
        result_masks: Callable[[Session], list[np.ndarray]] = _no_results,
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.on_evict = on_evict
        self.memory_limit_bytes = memory_limit_bytes
        self.result_masks = result_masks
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        #: bytes held back in the budget for CTs being read (see :meth:`make_room`)
        self._reserved = 0
        self._releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="liversam-release")

    def __len__(self) -> int:
        return len(self._sessions)

    # --- memory -------------------------------------------------------------------------------------------------
    def held(self) -> HeldBytes:
        """The bytes every open session holds together."""
        with self._lock:
            return self._held_by(list(self._sessions.values()))

    def _held_by(self, sessions: Iterable[Session]) -> HeldBytes:
        return sum((s.held(self.result_masks(s)) for s in sessions), HeldBytes())

    def _committed(self) -> int:
        """What the budget counts as taken: the sessions' bytes and those held back for CTs being read. Under the
        lock."""
        return self._held_by(self._sessions.values()).total + self._reserved

    def unreserve(self, nbytes: int) -> None:
        """Give back ``nbytes`` held back by :meth:`make_room` (``reserve``) once the CT is read (or was not)."""
        with self._lock:
            self._reserved -= nbytes

    def _least_recently_used_idle(
        self, bytes_needed: int, slots_needed: int, keep: str | None = None, idle_for_s: float = 0.0
    ) -> list[Session] | None:
        """The least recently used idle sessions (no job running; not ``keep``; unused for ``idle_for_s``) that free
        ``bytes_needed`` bytes and ``slots_needed`` places together, fewest first; None when all of them would not.
        Under the lock."""
        now = time.monotonic()
        idle = sorted(
            (
                s
                for s in self._sessions.values()
                if s.active_jobs == 0 and s.id != keep and now - s.last_used >= idle_for_s
            ),
            key=lambda s: s.last_used,
        )
        chosen: list[Session] = []
        freed = 0
        for session in idle:
            if freed >= bytes_needed and len(chosen) >= slots_needed:
                break
            chosen.append(session)
            freed += session.held(self.result_masks(session)).total
        return chosen if freed >= bytes_needed and len(chosen) >= slots_needed else None

    def _evict_for_new(self, nbytes: int) -> list[Session]:
        """Unlink the sessions a new one of ``nbytes`` needs gone (count and budget), or raise ServerFull. Under the
        lock."""
        limit = self.memory_limit_bytes
        if limit is not None and nbytes > limit:
            raise ServerFull(
                f"this CT needs {mb(nbytes)} MB, more than the server's whole session memory budget of {mb(limit)} MB "
                "(liversam serve --session-memory-gb): crop or resample the CT, or start the server with a larger "
                "--session-memory-gb"
            )
        held = self._committed()
        bytes_needed = held + nbytes - limit if limit is not None else 0
        slots_needed = len(self._sessions) + 1 - self.max_sessions
        evicted = self._least_recently_used_idle(bytes_needed, slots_needed)
        if evicted is None:
            raise ServerFull(self._full_message(nbytes, held))
        self._unlink_all(evicted)
        return evicted

    def _full_message(self, nbytes: int, held: int) -> str:
        busy = sum(1 for s in self._sessions.values() if s.active_jobs > 0)
        held_text = (
            f"its sessions hold {mb(held)} MB of their {mb(self.memory_limit_bytes)} MB memory budget "
            "(--session-memory-gb)"
            if self.memory_limit_bytes is not None
            else ""
        )
        return (
            f"the server cannot open another CT ({mb(nbytes)} MB): it holds {len(self._sessions)} of at most "
            f"{self.max_sessions} sessions (--max-sessions){', ' + held_text if held_text else ''}, and {busy} of "
            "them are running jobs, so evicting the idle ones would not make room. Close a session you no longer need "
            "(DELETE /v1/sessions/{id}), retry when a job has ended, or ask the server's operator to raise "
            "--session-memory-gb (or --max-sessions)"
        )

    def make_room(self, nbytes: int, transient: int = 0, reserve: int = 0) -> Future:
        """Evict what a new session of ``nbytes`` needs gone now (before its CT is read), or raise ServerFull. The
        Future is done when the evicted sessions' memory is freed (on the release thread). ``transient``: what reading
        the CT holds besides it for a moment (read_ct's second copy), made room for too when idle sessions can give
        it; a CT that fits only without it still opens (the copy is gone once it is read). ``reserve``: bytes held
        back in the budget from this decision on (the CT being read, and its copy), so that the caches, masks and
        opens deciding meanwhile count them, until the caller gives them back (:meth:`unreserve`); nothing is held
        back when ServerFull is raised."""
        with self._lock:
            try:
                evicted = self._evict_for_new(nbytes + transient)
            except ServerFull:
                if not transient:
                    raise
                evicted = self._evict_for_new(nbytes)
            self._reserved += reserve
        return self._release_later(evicted)

    # --- masks arriving in a session ---------------------------------------------------------------------------
    def _mask_growth(self, session: Session, sizes: dict[str, int]) -> int:
        """How many bytes more ``session`` holds once new masks of ``sizes`` (name: bytes) replace (or join) its masks
        of those names: a replaced mask frees its bytes unless another mask or a kept job result still holds it.
        Under the lock."""
        results = self.result_masks(session)
        before = distinct_nbytes([*session.masks.values(), *results])
        kept = distinct_nbytes([*(a for n, a in session.masks.items() if n not in sizes), *results])
        return kept + sum(sizes.values()) - before

    def _over_with_masks(self, session: Session, sizes: dict[str, int]) -> tuple[int, int]:
        """(bytes the sessions hold now, bytes they would hold beyond the budget with the new masks). Under the
        lock, with a budget."""
        held = self._committed()
        return held, held + self._mask_growth(session, sizes) - self.memory_limit_bytes

    def _check_open(self, session: Session) -> None:
        """SessionNotFound when ``session`` was closed or evicted meanwhile. Under the lock."""
        if self._sessions.get(session.id) is not session:
            self._owned(session.id, session.owner)  # raises: the same message as for an unknown id
            raise SessionNotFound(f"session '{session.id}' was closed meanwhile; open the CT again")

    def _evict_for_masks(self, session: Session, sizes: dict[str, int], what: str) -> list[Session]:
        """Unlink the least recently used idle sessions (never ``session``, never one running a job) the new masks
        need gone, as an open does, or raise ServerFull naming ``what``. Under the lock."""
        self._check_open(session)
        if self.memory_limit_bytes is None:
            return []
        held, over = self._over_with_masks(session, sizes)
        if over <= 0:
            return []
        evicted = self._least_recently_used_idle(over, 0, keep=session.id)
        if evicted is None:
            raise ServerFull(self._mask_full_message(what, sum(sizes.values()), held))
        self._unlink_all(evicted)
        return evicted

    def _mask_full_message(self, what: str, nbytes: int, held: int) -> str:
        busy = sum(1 for s in self._sessions.values() if s.active_jobs > 0)
        return (
            f"the server cannot keep {what} ({mb(nbytes)} MB): its {len(self._sessions)} sessions hold {mb(held)} MB "
            f"of their {mb(self.memory_limit_bytes)} MB memory budget (--session-memory-gb), {busy} of them running "
            "jobs, "
            "so evicting the idle ones (never this session) would not make room; nothing of the mask was kept. Close a "
            "session you no longer need (DELETE /v1/sessions/{id}), retry when a job has ended, or ask the server's "
            "operator to raise --session-memory-gb"
        )

    def make_room_for_masks(self, session: Session, sizes: dict[str, int], what: str) -> Future:
        """Before a mask upload is read: evict what masks of ``sizes`` (name: bytes) need gone, or raise ServerFull.
        The Future is done when the evicted sessions' memory is freed."""
        with self._lock:
            evicted = self._evict_for_masks(session, sizes, what)
        return self._release_later(evicted)

    def add_masks(self, session: Session, masks: dict[str, np.ndarray], what: str) -> Future:
        """Store uploaded ``masks`` in ``session`` within the budget, evicting idle sessions as an open does, or raise
        ServerFull (nothing stored)."""
        with self._lock:
            evicted = self._evict_for_masks(session, {name: m.nbytes for name, m in masks.items()}, what)
            session.masks.update(masks)
        return self._release_later(evicted)

    def drop_mask(self, session: Session, name: str) -> bool:
        """Forget ``session``'s mask ``name``; False when it holds none of that name. Its memory goes with the last
        reference to it (a job that was started with it keeps it until the job ends)."""
        with self._lock:
            return session.masks.pop(name, None) is not None

    def keep_job_masks(
        self, session: Session, masks: dict[str, np.ndarray], drop_older_results: Callable[[], None]
    ) -> str | None:
        """Store a finished job's ``masks`` in ``session``: always (a finished propagation is never lost). To stay
        within the budget it gives up, in this order, each step only while the budget is exceeded: the session's
        older job results that hold masks it no longer keeps or is replacing (``drop_older_results``; a result of
        its current masks frees nothing and stays), the least
        recently used idle sessions of any owner (as an open; never this one), then this session's own embedding
        slices (encoded again when needed). None when the budget holds, else a message with the overshoot (logged
        and reported)."""
        limit = self.memory_limit_bytes
        sizes = {name: m.nbytes for name, m in masks.items()}
        with self._lock:
            if limit is None or self._sessions.get(session.id) is not session:
                session.masks.update(masks)  # no budget, or a closed session (its masks go with it)
                return None
            evicted: list[Session] = []
            if self._over_with_masks(session, sizes)[1] > 0:
                drop_older_results()
            over = self._over_with_masks(session, sizes)[1]
            if over > 0:
                evicted = self._least_recently_used_idle(over, 0, keep=session.id) or []
            if not evicted and over > 0:
                cache = session._predictor.cache if session._predictor is not None else None
                if isinstance(cache, BudgetedEmbeddingCache):
                    cache.give_up(over)
                over = self._over_with_masks(session, sizes)[1]
                if over > 0:
                    evicted = self._least_recently_used_idle(over, 0, keep=session.id) or []
            self._unlink_all(evicted)
            session.masks.update(masks)
            held = self._committed()
            message = None
            if held > limit:
                message = (
                    f"the job's masks ({mb(sum(sizes.values()))} MB) were kept although the server's "
                    f"{len(self._sessions)} sessions now hold {mb(held)} MB of their {mb(limit)} MB memory budget "
                    f"(--session-memory-gb), {mb(held - limit)} MB over: the other sessions are running jobs or "
                    "evicting them would not make room. The next CT opened or slice encoded evicts idle sessions or "
                    "gives up embeddings to return within it; close sessions you no longer need, or ask the server's "
                    "operator to raise --session-memory-gb"
                )
        self._release_later(evicted)
        return message

    def over_budget_with(self, session_id: str, nbytes: int) -> int:
        """For a session's growing cache: how many bytes over the budget the sessions would be with ``nbytes`` more,
        after evicting other sessions idle for :data:`IDLE_BEFORE_A_CACHE_EVICTS_S` if that makes room (0). A closed
        session may keep nothing (``nbytes``)."""
        if self.memory_limit_bytes is None:
            return 0
        with self._lock:
            if session_id not in self._sessions:
                return nbytes
            over = self._committed() + nbytes - self.memory_limit_bytes
            if over <= 0:
                return 0
            evicted = self._least_recently_used_idle(
                over, 0, keep=session_id, idle_for_s=IDLE_BEFORE_A_CACHE_EVICTS_S
            )
            if evicted is None:
                return over
            self._unlink_all(evicted)
        self._release_later(evicted)
        return 0

    # --- release ------------------------------------------------------------------------------------------------
    def _unlink_all(self, sessions: list[Session]) -> None:
        """Take ``sessions`` out of the store and mark them closed (a job being started for one is refused). Under the
        lock. (No loop variable of the caller keeps a session alive: the list is its last holder.)"""
        for session in sessions:
            del self._sessions[session.id]
            session.closed = True

    def _release_later(self, sessions: list[Session]) -> Future:
        """Free ``sessions``' memory on the release thread. The list is the last holder of the sessions: once it is
        handed over, the CTs are dropped there too, not on the caller's thread."""
        if sessions:
            try:
                return self._releaser.submit(self._release, sessions)
            except RuntimeError:  # the server is stopping (the release thread has ended): free them here
                self._release(sessions)
        done: Future = Future()
        done.set_result(None)
        return done

    def _release(self, sessions: list[Session]) -> None:
        while sessions:
            self.on_evict(sessions.pop())
        return_freed_memory_to_os()  # a long-running server gives a closed session's memory back

    def wait_for_releases(self) -> None:
        """Wait until every release handed to the release thread so far has run."""
        with contextlib.suppress(RuntimeError):  # none after the server stopped
            self._releaser.submit(int).result()

    # --- sessions -----------------------------------------------------------------------------------------------
    def add(self, owner: str, volume: CTVolume, window: WindowSettings, cache_mb: float) -> Session:
        """A new session; idle sessions past the TTL go first, then the least recently used idle ones, as many as the
        count and the memory budget need."""
        self.expire()
        session = Session(secrets.token_urlsafe(12), owner, volume, window, cache_mb)
        if self.memory_limit_bytes is not None:
            # the session's cache asks the budget before it grows (the partial holds the id: no reference cycle)
            session.over_budget = functools.partial(self.over_budget_with, session.id)
        with self._lock:
            evicted = self._evict_for_new(volume.array_kji.nbytes)
            self._sessions[session.id] = session
        self._release_later(evicted)
        return session

    def _owned(self, session_id: str, owner: str) -> Session:
        """The caller's session (another token's session is reported as unknown, like a missing one). Under the
        lock."""
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise SessionNotFound(
                f"unknown session '{session_id}': it does not exist, was closed or evicted (idle for "
                f"{self.idle_timeout_s:.0f} s, least recently used, or to keep to the server's memory budget), or "
                "belongs to another token; open the CT again"
            )
        return session

    def get(self, session_id: str, owner: str) -> Session:
        """The caller's session, marked as used now."""
        self.expire()
        with self._lock:
            session = self._owned(session_id, owner)
            session.last_used = time.monotonic()
            return session

    def remove(self, session_id: str, owner: str) -> Future:
        """Close the caller's session; the Future is done when its memory is freed."""
        with self._lock:
            closing = [self._owned(session_id, owner)]
            self._unlink_all(closing)
        return self._release_later(closing)

    def expire(self) -> list[str]:
        """Close the sessions idle (no job running) for longer than the idle timeout; their ids."""
        now = time.monotonic()
        with self._lock:
            stale = [
                s
                for s in self._sessions.values()
                if s.active_jobs == 0 and now - s.last_used > self.idle_timeout_s
            ]
            self._unlink_all(stale)
        ids = [s.id for s in stale]
        self._release_later(stale)
        return ids

    def close_all(self) -> None:
        """Close every session and free their memory now (the server is stopping)."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._unlink_all(sessions)
        self._release_later(sessions)
        self._releaser.shutdown(wait=True)
