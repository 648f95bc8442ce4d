"""KV memory: per-layer K/V buffers [slots, n_kv, capacity, head_dim] in one anonymous memory mapping.

A slot is one sequence's cache, right-padded; the graph (graph.py) writes new K/V into it in place
(GroupQueryAttention with past and present bound to the same memory), so no step copies the cache. Pages are
committed by the kernel only when first written and handed back (madvise DONTNEED) when a slot is released, so
resident memory follows the tokens in use, in 16-token pages: the operating system's page table is the block
table.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import numpy as np

_PAGE = mmap.PAGESIZE


class KVPool:
    """K/V memory for `slots` sequences of up to `capacity` tokens."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, slots: int, capacity: int) -> None:
        # Round capacity up so that every (array, slot) region starts on a page boundary (madvise needs it).
        token_bytes = head_dim * 4
        step = _PAGE // math.gcd(_PAGE, n_kv * token_bytes)
        self.capacity = -(-capacity // step) * step
        self.slots = slots
        self.n_arrays = 2 * n_layers
        self.region_bytes = n_kv * self.capacity * token_bytes  # one slot of one array
        self.tokens_per_page = max(1, _PAGE // token_bytes)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._map = mmap.mmap(-1, self.n_arrays * slots * self.region_bytes, flags=flags)
        base = np.frombuffer(self._map, dtype=np.float32).reshape(self.n_arrays, slots, n_kv, self.capacity, head_dim)
        self.arrays = [base[i] for i in range(self.n_arrays)]  # [key_0, value_0, key_1, ...]
        self.bytes_per_token = self.n_arrays * n_kv * token_bytes

    def copy(self, src: int, dst: int, length: int) -> None:
        if length > 0 and src != dst:
            for a in self.arrays:
                a[dst, :, :length] = a[src, :, :length]

    def release(self, slot: int) -> None:
        """Give the slot's pages back to the OS (they read as zeros afterwards)."""
        for i in range(self.n_arrays):
            self._map.madvise(mmap.MADV_DONTNEED, (i * self.slots + slot) * self.region_bytes, self.region_bytes)

    def close(self) -> None:
        self.arrays = []
        with contextlib.suppress(BufferError):  # numpy views may still exist; the mapping then dies with them
            self._map.close()
