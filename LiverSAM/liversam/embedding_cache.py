"""A least-recently-used cache of slice embeddings, bounded in megabytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch


class SliceEmbeddingCache:
    """Maps a key (volume id, slice k, window, model) to an embedding tensor; evicts the least recently used.

    Thread-safe, so a background pre-encoder and the interactive thread can share it.
    """

    def __init__(self, max_mb: float = 1024.0) -> None:
        if max_mb <= 0:
            raise ValueError(f"cache size must be > 0 MB, got {max_mb}")
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(tensor: torch.Tensor) -> int:
        return tensor.element_size() * tensor.nelement()

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            tensor = self._items.get(key)
            if tensor is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return tensor

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        size = self._size(tensor)
        with self._lock:
            if key in self._items:
                self._bytes -= self._size(self._items.pop(key))
            if size > self.max_bytes:
                return  # larger than the whole cache: don't keep it
            self._items[key] = tensor
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= self._size(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def size_mb(self) -> float:
        return self._bytes / (1024 * 1024)

    def __len__(self) -> int:
        return len(self._items)
