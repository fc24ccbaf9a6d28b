"""A least-recently-used cache of slice embeddings, bounded in megabytes.

fp32 embeddings are kept in fp16 (half the memory: 2 MiB instead of 4 for a LiteMedSAM slice) and handed back
in fp32. The rounding (relative 2^-11) is far below what the bf16 prompt decoder rounds its input to (2^-8);
:meth:`SliceEmbeddingCache.put` returns the rounded tensor, so a slice's first use and every later one see the
same embedding (docs/PERFORMANCE.md, session 23).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch


class SliceEmbeddingCache:
    """Maps a key (volume id, slice k, window, model) to an embedding tensor; evicts the least recently used.

    Thread-safe, so a background pre-encoder and the interactive thread can share it. ``store_fp32_as``: the
    dtype fp32 tensors are kept in (``torch.float32`` keeps them as they are); other dtypes are kept as given.
    """

    def __init__(self, max_mb: float = 1024.0, store_fp32_as: torch.dtype = torch.float16) -> None:
        if max_mb <= 0:
            raise ValueError(f"cache size must be > 0 MB, got {max_mb}")
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.store_fp32_as = store_fp32_as
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, torch.dtype]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(tensor: torch.Tensor) -> int:
        return tensor.element_size() * tensor.nelement()

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The tensor stored under ``key`` in the dtype it was put in (None when absent)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
        stored, dtype = item
        return stored.to(dtype)  # the stored tensor itself when the dtypes agree

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """Keep ``tensor`` under ``key``; returns it as :meth:`get` will (rounded when fp32 is kept smaller),
        also when it is larger than the whole cache and not kept."""
        dtype = tensor.dtype
        stored = tensor.to(self.store_fp32_as) if dtype == torch.float32 else tensor
        size = self._size(stored)
        with self._lock:
            if key in self._items:
                self._bytes -= self._size(self._items.pop(key)[0])
            if size <= self.max_bytes:  # larger than the whole cache: not kept
                self._items[key] = (stored, dtype)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (evicted, _) = self._items.popitem(last=False)
                    self._bytes -= self._size(evicted)
        return stored.to(dtype)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def size_mb(self) -> float:
        return self._bytes / (1024 * 1024)

    def __len__(self) -> int:
        return len(self._items)
