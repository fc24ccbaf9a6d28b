"""A session's embedding cache that asks the server's memory budget before it grows.

Each new slice embedding first asks ``over_budget(nbytes)``: how many bytes the sessions would hold beyond the
budget with it (after the server has evicted what it may for it, see :meth:`SessionStore.over_budget_with`). When
the answer is not 0 the cache gives up that many bytes of its own least recently used slices, or does not keep the
new one at all: a full budget makes slices be encoded again, never pushes the machine into swap.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from ..embedding_cache import HANDED_OUT_KEPT, SliceEmbeddingCache


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.element_size() * tensor.nelement()


class BudgetedEmbeddingCache(SliceEmbeddingCache):
    """:class:`SliceEmbeddingCache` of at most ``max_mb``, and smaller while ``over_budget`` says so."""

    def __init__(self, max_mb: float, over_budget: Callable[[int], int]) -> None:
        super().__init__(max_mb)
        self.cap_bytes = self.max_bytes
        self._over_budget = over_budget

    @property
    def held_bytes(self) -> int:
        """The bytes of every tensor the cache holds: the stored slices and the fp32 copies it handed out last."""
        with self._lock:
            handed = sum(tensor_nbytes(copy) for _, copy in self._handed.values())
            return self._bytes + handed

    def _new_bytes(self, tensor: torch.Tensor) -> tuple[int, int]:
        """(bytes ``tensor`` is stored in, bytes of the fp32 copy handed out for it that adds to those held)."""
        if tensor.dtype != torch.float32 or self.store_fp32_as == torch.float32:
            return tensor_nbytes(tensor), 0
        stored = tensor.nelement() * torch.empty((), dtype=self.store_fp32_as).element_size()
        # the copies kept are bounded: once there are that many, a new one replaces the oldest
        with self._lock:
            adds_copy = len(self._handed) < HANDED_OUT_KEPT
        return stored, tensor_nbytes(tensor) if adds_copy else 0

    def put(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        stored, copy = self._new_bytes(tensor)
        over = self._over_budget(stored + copy)  # outside the lock: the budget reads this cache's size too
        with self._lock:
            self.max_bytes = max(0, min(self.cap_bytes, self._bytes + stored - over))
        kept = super().put(key, tensor)
        self._trim_to_max_bytes()  # the new slice was not kept (max_bytes below its size): older ones still give way
        return kept

    def give_up(self, nbytes: int) -> int:
        """Drop the least recently used slices until ``nbytes`` are freed (or none is left); the bytes freed. (The next
        :meth:`put` asks the budget again, so the cache may grow back when there is room.)"""
        freed = 0
        with self._lock:
            while self._items and freed < nbytes:
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= tensor_nbytes(evicted)
                freed += tensor_nbytes(evicted)
        return freed

    def _trim_to_max_bytes(self) -> None:
        with self._lock:
            while self._items and self._bytes > self.max_bytes:
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= tensor_nbytes(evicted)
