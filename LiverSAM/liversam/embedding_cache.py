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

#: The dtype fp32 embeddings are kept in by default (the mask-agreement check's verdicts name it).
FP32_STORAGE = torch.float16
#: fp32 copies of the slices handed out last that are kept, so that each is handed out as the same object
#: (the slice in use, and the next ones a read-ahead stores meanwhile).
HANDED_OUT_KEPT = 3


class SliceEmbeddingCache:
    """Maps a key (volume id, slice k, window, model) to an embedding tensor; evicts the least recently used.

    Thread-safe, so a background pre-encoder and the interactive thread can share it. ``store_fp32_as``: the
    dtype fp32 tensors are kept in (``torch.float32`` keeps them as they are); other dtypes are kept as given.
    """

    def __init__(self, max_mb: float = 1024.0, store_fp32_as: torch.dtype = FP32_STORAGE) -> None:
        if max_mb <= 0:
            raise ValueError(f"cache size must be > 0 MB, got {max_mb}")
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.store_fp32_as = store_fp32_as
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, torch.dtype]] = OrderedDict()
        self._bytes = 0
        # The last few tensors handed out in fp32 (key -> the stored tensor it came from, it): asking for one of
        # these slices again returns the same object, as before the fp16 storage, so that the prompt decoder's
        # memo of a slice's transposed embedding (by identity) holds across the prompts of one slice, also while
        # a background read-ahead stores the next slices. Read-only, like every tensor the cache hands out.
        self._handed: OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
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
            return self._handed_out(key, *item)

    def _handed_out(self, key: Hashable, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``stored`` in ``dtype`` (the stored tensor itself when they agree); the same object as last time
        when ``key`` is among the last :data:`HANDED_OUT_KEPT` handed out and is still stored as it was then.
        Called under the lock."""
        if stored.dtype == dtype:
            return stored
        handed = self._handed.get(key)
        if handed is not None and handed[0] is stored:
            self._handed.move_to_end(key)
            return handed[1]
        tensor = stored.to(dtype)
        self._handed[key] = (stored, tensor)
        self._handed.move_to_end(key)
        while len(self._handed) > HANDED_OUT_KEPT:
            self._handed.popitem(last=False)
        return tensor

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
            return self._handed_out(key, stored, dtype)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._handed.clear()
            self._bytes = 0

    @property
    def size_mb(self) -> float:
        return self._bytes / (1024 * 1024)

    def __len__(self) -> int:
        return len(self._items)
