"""Freed heap memory goes back to the operating system (glibc's malloc_trim)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from liversam.freed_memory import return_freed_memory_to_os

GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" \
    and "malloc" not in os.environ.get("LD_PRELOAD", "")


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not GLIBC_LINUX, reason="malloc_trim is glibc's allocator's; elsewhere the call does nothing")
def test_heap_blocks_freed_below_a_live_one_are_returned():
    # 100 KiB blocks come from the heap (below glibc's mmap threshold); the last one stays alive, so free()
    # alone cannot shrink the heap past it and the 200 MiB below it stay resident until they are trimmed.
    blocks = [bytearray(b"\x01" * (100 * 1024)) for _ in range(2048)]
    keep = blocks[-1]
    del blocks
    before = _resident_mib()
    assert return_freed_memory_to_os() is True
    after = _resident_mib()
    assert before - after > 100, f"resident {before:.0f} -> {after:.0f} MiB"
    assert keep[0] == 1


@pytest.mark.parametrize(("system", "libc", "preload"), [("Darwin", "", ""), ("Windows", "", ""), ("Linux", "musl", ""),
                                                       ("Linux", "glibc", "/usr/lib/libjemalloc.so.2")])
def test_without_glibc_s_allocator_nothing_is_asked(monkeypatch, system, libc, preload):
    import liversam.freed_memory as freed_memory

    monkeypatch.setattr(freed_memory.platform, "system", lambda: system)
    monkeypatch.setattr(freed_memory.platform, "libc_ver", lambda: (libc, ""))
    monkeypatch.setenv("LD_PRELOAD", preload)
    freed_memory.glibc_allocator.cache_clear()
    try:
        assert return_freed_memory_to_os() is False
    finally:
        freed_memory.glibc_allocator.cache_clear()  # the real C library again for later tests
