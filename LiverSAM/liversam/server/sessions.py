"""CT sessions: one per opened CT, owned by the token that opened it, bounded in number, expiring when idle.

A session keeps the CT, its :class:`liversam.predictor.SlicePredictor` (created on the inference thread at
the first model call, with an embedding cache of its own bounded in MB) and named masks (uploaded by the
client, or written by the session's finished jobs).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..freed_memory import return_freed_memory_to_os
from ..predictor import SlicePredictor
from ..preprocess import WindowSettings
from ..volume import CTVolume


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
    _predictor: SlicePredictor | None = None

    def predictor(self, model) -> SlicePredictor:
        """The session's predictor (inference thread only)."""
        if self._predictor is None or self._predictor.model is not model:
            self._predictor = SlicePredictor(model, self.volume, window=self.window, cache_mb=self.cache_mb)
        return self._predictor

    def is_cached(self, k: int) -> bool:
        predictor = self._predictor
        return predictor is not None and predictor.is_cached(k)

    @property
    def cached_slices(self) -> int:
        return len(self._predictor.cache) if self._predictor is not None else 0

    def release(self) -> None:
        """Drop the CT, the embeddings and the masks (the session is gone)."""
        self.closed = True
        if self._predictor is not None:
            self._predictor.cache.clear()
        self._predictor = None
        self.masks.clear()
        return_freed_memory_to_os()  # a long-running server gives a closed session's memory back


class SessionStore:
    """Sessions by id. ``on_evict(session)`` runs for every session closed, expired or evicted."""

    def __init__(self, max_sessions: int, idle_timeout_s: float, on_evict: Callable[[Session], None]) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.on_evict = on_evict
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, owner: str, volume: CTVolume, window: WindowSettings, cache_mb: float) -> Session:
        """A new session; idle sessions past the TTL go first, then the least recently used idle one."""
        self.expire()
        evicted = None
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                idle = [s for s in self._sessions.values() if s.active_jobs == 0]
                if not idle:
                    raise ServerFull(
                        f"the server already holds {self.max_sessions} sessions, all running jobs; close one "
                        "(DELETE /v1/sessions/{id}) or retry later"
                    )
                evicted = min(idle, key=lambda s: s.last_used)
                del self._sessions[evicted.id]
            session = Session(secrets.token_urlsafe(12), owner, volume, window, cache_mb)
            self._sessions[session.id] = session
        if evicted is not None:
            self.on_evict(evicted)
        return session

    def get(self, session_id: str, owner: str) -> Session:
        """The caller's session (another token's session is reported as unknown, like a missing one)."""
        self.expire()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:
                raise SessionNotFound(
                    f"unknown session '{session_id}': it does not exist, was closed or evicted (idle for "
                    f"{self.idle_timeout_s:.0f} s or least recently used), or belongs to another token; open the CT again"
                )
            session.last_used = time.monotonic()
            return session

    def remove(self, session_id: str, owner: str) -> None:
        session = self.get(session_id, owner)
        with self._lock:
            self._sessions.pop(session.id, None)
        self.on_evict(session)

    def expire(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._sessions.values()
                     if s.active_jobs == 0 and now - s.last_used > self.idle_timeout_s]
            for session in stale:
                del self._sessions[session.id]
        for session in stale:
            self.on_evict(session)
        return [s.id for s in stale]

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            self.on_evict(session)
