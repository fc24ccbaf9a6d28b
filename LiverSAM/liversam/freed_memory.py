"""Give memory that the process has freed back to the operating system (glibc's allocator only).

glibc keeps freed blocks of its heap mapped (a 2 MiB slice embedding is served from the heap once the allocator
has raised its mmap threshold), so the resident size stays at its high-water mark after the embedding cache is
cleared, and the next big allocation (the writer's output array) lands on top of it. ``malloc_trim(0)`` hands the
free pages back. On a 595-slice CT this moved the writer's peak from 2493 to 2179 MiB (docs/PERFORMANCE.md,
session 23). Elsewhere (macOS, Windows, musl, or another allocator preloaded) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from functools import cache


@cache
def glibc_allocator() -> ctypes.CDLL | None:
    """The C library when glibc's malloc serves this process (Linux, glibc, no jemalloc / tcmalloc / mimalloc in
    ``LD_PRELOAD``: with one of those, glibc's ``mallopt`` and ``malloc_trim`` would be called and change
    nothing); None otherwise."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory_to_os() -> bool:
    """Release the heap's free pages (glibc only); True when the C library was asked to."""
    libc = glibc_allocator()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
