"""Finished sequences' KV kept for reuse: an LRU index from token prefixes to the slots that hold them.

Only the index lives here; the slots and their blocks are the slot table's (slots.py), which evicts through it.
A newcomer whose leading tokens (whole blocks) match an entry copies those K/V instead of recomputing them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Int64Array = npt.NDArray[np.int64]


@dataclass(eq=False)
class CacheEntry:
    tokens: Int64Array  # exactly the tokens whose K/V the slot holds
    slot: int
    blocks: int


class PrefixCache:
    def __init__(self, enabled: bool, max_entries: int, block_size: int) -> None:
        self.enabled = enabled
        self.max_entries = max_entries
        self.block_size = block_size
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()  # slot -> entry, least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[CacheEntry]:
        return iter(self._entries.values())

    def values(self) -> Iterator[CacheEntry]:
        return iter(self._entries.values())

    @property
    def blocks(self) -> int:
        return sum(e.blocks for e in self._entries.values())

    def keeps(self, kv_len: int) -> bool:
        """Whether a finished sequence with `kv_len` computed tokens is worth an entry."""
        return self.enabled and self.max_entries > 0 and kv_len >= self.block_size

    def full(self) -> bool:
        return len(self._entries) >= self.max_entries

    def oldest(self) -> CacheEntry | None:
        return next(iter(self._entries.values()), None)

    def clear(self) -> None:
        self._entries.clear()

    def add(self, entry: CacheEntry) -> None:
        self._entries[entry.slot] = entry

    def remove(self, entry: CacheEntry) -> None:
        del self._entries[entry.slot]

    def moved(self, entry: CacheEntry, dst: int) -> None:
        """Re-key an entry whose K/V moved to slot `dst`; it becomes the first to evict (a move is not a use)."""
        del self._entries[entry.slot]
        entry.slot = dst
        self._entries[dst] = entry
        self._entries.move_to_end(dst, last=False)

    def longest_prefix(self, prompt: Int64Array) -> tuple[CacheEntry | None, int]:
        """The entry sharing the most whole blocks with `prompt` (leaving >= 1 token to compute) and that length;
        a hit counts as a use."""
        best, best_len = None, 0
        for entry in self._entries.values():
            n = min(entry.tokens.size, prompt.size - 1)
            if n < self.block_size:
                continue
            diff = np.flatnonzero(entry.tokens[:n] != prompt[:n])
            common = int(diff[0]) if diff.size else n
            usable = common // self.block_size * self.block_size
            if usable > best_len:
                best, best_len = entry, usable
        if best is not None:
            self._entries.move_to_end(best.slot)
        return best, best_len
