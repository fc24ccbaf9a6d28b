"""The training process keeps freed activations for reuse (liversam.training.allocator)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocate and fill six 16 MB arrays (the size of a four-slice decoder activation), free them, 20 times; print the
# minor page faults that took. Run in a child process: the setting is process-wide.
CHILD = """
import resource, sys
import numpy as np
if sys.argv[1] == "set":
    from liversam.training.allocator import keep_freed_memory_for_reuse
    assert keep_freed_memory_for_reuse()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    arrays = [np.ones(4 * 1024 * 1024, dtype=np.float32) for _ in range(6)]
    for a in arrays:
        a += 1.0
    del arrays, a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("set")
    # glibc's defaults: after the first free its dynamic threshold serves the arrays from the heap, but 96 MB of
    # free heap top is beyond its trim threshold and given back each round, so every round faults it in again.
    # (Measured on a 2-core EPYC virtual machine: 61,699 faults with the defaults, 3,087 with the setting.)
    assert default > 5 * 4096, default
    assert kept < default / 5, (kept, default)


def test_elsewhere_it_does_nothing(monkeypatch):
    from liversam.training import allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory_for_reuse() is False
