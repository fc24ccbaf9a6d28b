"""The sessions' memory budget: how much of the machine's memory they may hold together, and what they hold.

A session holds its CT array, its embedding cache (as it grows) and its masks: the ones the client uploaded and the
full-volume masks of the job results the server keeps. :class:`HeldBytes` counts exactly those arrays' bytes. The
default budget is half of the machine's memory (or of the container's limit when it is lower), leaving the rest to
the model (about 1.5 GB), the operating system and the other programs of a shared machine. Nothing here imports
torch or FastAPI: ``liversam serve`` checks its options with it before it loads anything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GIB = 1024**3
MIB = 1024**2
#: The share of the machine's memory the sessions may hold together by default.
DEFAULT_SHARE_OF_MACHINE = 0.5
#: The default budget when the machine's memory cannot be read.
FALLBACK_BUDGET_GB = 4.0
#: Files that hold a container's memory limit (cgroup v2, then v1); "max" or a huge number means none.
CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


@dataclass(frozen=True)
class HeldBytes:
    """Bytes held by one session (or, added up, by all of them)."""

    ct: int = 0
    embeddings: int = 0
    masks: int = 0

    @property
    def total(self) -> int:
        return self.ct + self.embeddings + self.masks

    def __add__(self, other: HeldBytes) -> HeldBytes:
        return HeldBytes(self.ct + other.ct, self.embeddings + other.embeddings, self.masks + other.masks)


def distinct_nbytes(arrays: Iterable[np.ndarray]) -> int:
    """The bytes of ``arrays``, each array counted once (a job's result masks are also its session's masks)."""
    return sum(array.nbytes for array in {id(array): array for array in arrays}.values())


def physical_memory_bytes() -> int | None:
    """The machine's RAM: POSIX ``sysconf`` (Linux, macOS), else psutil (a dependency of the ``server`` extra; what
    Windows, which has no ``sysconf``, answers with), else None. A size that is not positive (``sysconf`` answers -1
    when it does not know) is no answer."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page_size > 0:
            return pages * page_size
    try:
        import psutil
    except ImportError:
        return None
    with contextlib.suppress(AttributeError, OSError, RuntimeError, ValueError):
        total = int(psutil.virtual_memory().total)
        return total if total > 0 else None
    return None


def container_memory_limit_bytes() -> int | None:
    """The memory limit of the container (cgroup) this process runs in, None without one."""
    for path in CGROUP_LIMIT_FILES:
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip()
            return None if text == "max" else int(text)
    return None


def machine_memory_bytes() -> int | None:
    """The memory this process can use at most: the RAM, or the container's limit when that is lower."""
    known = [size for size in (physical_memory_bytes(), container_memory_limit_bytes()) if size and size > 0]
    return min(known) if known else None


def default_session_memory_gb() -> float:
    """Half of :func:`machine_memory_bytes` in GiB (:data:`FALLBACK_BUDGET_GB` when it cannot be read)."""
    total = machine_memory_bytes()
    return round(total * DEFAULT_SHARE_OF_MACHINE / GIB, 1) if total else FALLBACK_BUDGET_GB


def mb(nbytes: int) -> float:
    return round(nbytes / MIB, 1)
