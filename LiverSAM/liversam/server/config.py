"""Server settings and tokens."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LiverSAMError
from .memory import GIB, default_session_memory_gb

API_PREFIX = "/v1"


class ServerConfigError(LiverSAMError):
    """The server cannot start with these options."""


@dataclass
class ServerConfig:
    """What one ``liversam serve`` process allows. Sizes are voxels / bytes; times are seconds."""

    tokens: list[str]
    host: str = "127.0.0.1"
    model: str = "litemedsam"
    device: str = "auto"
    accelerate: str = "auto"
    max_sessions: int = 4
    max_voxels: int = 512 * 512 * 1000
    idle_timeout_s: float = 3600.0
    cache_mb: float = 1024.0  # embedding cache per session
    max_json_bytes: int = 2 * 1024 * 1024
    max_jobs: int = 64  # finished jobs kept (with their results); older ones are forgotten
    data_roots: list[Path] = field(default_factory=list)  # where open-path may read; empty: see allow_any_path
    threads: int = 0
    #: what the sessions may hold together (CTs, embedding caches, masks, kept job results), GiB; None: half the
    #: machine's memory (:func:`liversam.server.memory.default_session_memory_gb`)
    session_memory_gb: float | None = None

    def __post_init__(self) -> None:
        if not self.tokens or any(len(t) < 16 for t in self.tokens):
            raise ServerConfigError("every server token must have at least 16 characters.")
        if self.max_sessions < 1 or self.max_voxels < 1 or self.idle_timeout_s <= 0 or self.cache_mb <= 0:
            raise ServerConfigError("--max-sessions, --max-voxels, --idle-timeout and --cache-mb must be positive.")
        if self.session_memory_gb is None:
            self.session_memory_gb = default_session_memory_gb()
        if not (math.isfinite(self.session_memory_gb) and self.session_memory_gb > 0):
            raise ServerConfigError(f"--session-memory-gb must be a positive number of GiB, got {self.session_memory_gb}; "
                                    "leave it out for half of the machine's memory.")
        self.data_roots = [Path(root).expanduser().resolve() for root in self.data_roots]

    @property
    def session_memory_bytes(self) -> int:
        return int(self.session_memory_gb * GIB)

    @property
    def allow_any_path(self) -> bool:
        """Without --data-root, a loopback server (same machine, same user) may open any path it can read."""
        return not self.data_roots and is_loopback(self.host)

    def owner_of(self, token: str) -> str | None:
        """The owner id (a hash, never the token) of a valid token; None for an invalid one."""
        found = None
        for known in self.tokens:  # compare with every token in constant time
            if secrets.compare_digest(known.encode(), token.encode()):
                found = known
        return token_id(found) if found is not None else None


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_tokens(path: Path) -> list[str]:
    """Tokens from a file, one a line (blank lines and ``#`` comments skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServerConfigError(f"Token file '{path}' cannot be read: {exc}.") from exc
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise ServerConfigError(f"Token file '{path}' holds no token; put one token per line, or delete it.")
    return tokens


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` readable by this user only (mode 0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
