"""KV memory accounting: blocks of `block_size` tokens against a budget shared by running sequences and the
prefix cache. Pure bookkeeping; what a block holds lives in kv_pool.KVPool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class HoldsBlocks(Protocol):
    blocks: int


class BlockBudget:
    def __init__(self, total_blocks: int, block_size: int) -> None:
        self.total = total_blocks
        self.block_size = block_size
        self.used = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def reserve(self, holder: HoldsBlocks, tokens: int, evict_one: Callable[[], bool]) -> bool:
        """Make `holder` own enough blocks for `tokens` tokens, calling `evict_one` (which frees cached blocks and
        returns False when there is nothing left to evict) while the budget is short. False: it does not fit."""
        extra = self.blocks_for(tokens) - holder.blocks
        if extra <= 0:
            return True
        while self.used + extra > self.total and evict_one():
            pass
        if self.used + extra > self.total:
            return False
        self.used += extra
        holder.blocks += extra
        return True

    def give_back(self, holder: HoldsBlocks) -> None:
        self.used -= holder.blocks
        holder.blocks = 0
