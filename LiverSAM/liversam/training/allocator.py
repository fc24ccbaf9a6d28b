"""Keep the C allocator's freed memory for reuse in a training process (glibc only).

A decoder training step allocates and frees the same large activations (16 MB each for four slices) many
times. glibc hands allocations above its mmap threshold straight to the kernel and returns them on free, and
trims the heap's free top beyond its trim threshold, so each new activation page-faults its memory in again
(six 16 MB tensors allocated and freed 20 times: 490,996 minor page faults with glibc's defaults, 28,692 with the
thresholds below). On a 2-core AVX-512 EPYC (a virtual machine, where a page fault is dear) the training step ran
at 10.5 slices per second with glibc's defaults and 11.8 with these thresholds, for 30-80 MB more peak memory
(docs/PERFORMANCE.md, session 14).

The setting is process-wide, so only a process that does nothing but train calls it: ``liversam train`` (which
LiverSAMTrain runs in a process of its own) and ``benchmarks/run_benchmarks.py`` just before its training
measurement (after every other timing). The server never does.
"""

from __future__ import annotations

import ctypes
import logging

from ..freed_memory import glibc_allocator

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above half its largest heap (32 MB on 64-bit systems), so that is the value;
# an activation below 32 MB then comes from the heap. Setting either threshold stops glibc's own adjustment of
# both, so the trim threshold alone would send every allocation above 128 kB to mmap (measured: 6 slices per
# second).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def keep_freed_memory_for_reuse() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both were set. Does nothing (False)
    on other C libraries and systems, or where another allocator is preloaded (``LD_PRELOAD``: glibc's
    ``mallopt`` would accept the values and change nothing)."""
    libc = glibc_allocator()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    log.debug("allocator thresholds for training %s", "set" if done else "not set")
    return done
