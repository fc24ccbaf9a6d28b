"""The training process keeps freed activations for reuse (liversam.training.allocator)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Allocate and fill six 16 MB tensors (the size of a four-slice decoder activation), free them, 20 times; print the
# minor page faults that took. Torch tensors, as in training (numpy would ask for huge pages). Run in a child
# process: the setting is process-wide.
CHILD = """
import resource, sys
import torch
if sys.argv[1] == "set":
    from liversam.training.allocator import keep_freed_memory_for_reuse
    assert keep_freed_memory_for_reuse()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    tensors = [torch.ones(4 * 1024 * 1024) for _ in range(6)]
    for t in tensors:
        t += 1.0
    del tensors, t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
# What would change the allocator's behaviour in the child other than the setting under test.
ALLOCATOR_ENVIRONMENT = ("LD_PRELOAD", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENVIRONMENT and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("set")
    # glibc's defaults: after the first free its dynamic threshold serves the tensors from the heap, but the free
    # heap top beyond its trim threshold (32 MB then) is given back each round and faulted in again the next.
    assert kept < default / 5, (kept, default)


def test_elsewhere_it_does_nothing(monkeypatch):
    from liversam.training import allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory_for_reuse() is False
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator.keep_freed_memory_for_reuse() is False
