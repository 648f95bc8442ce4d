"""The slot table: who holds each KV slot (a sequence or a prefix-cache entry), and every operation that puts K/V
into a slot, moves it or gives it back, with the block budget and the prefix cache kept in step.

Layout: running sequences occupy slots [0, n_running) (one decode call binds that range); everything else
(sequences being prefilled, cache entries) sits above, placed highest first. The rare moves that keep it so (a
sequence joins or leaves the running range) copy one owner's used tokens, never the whole pool. Callers pass
`low` = n_running, the first slot that is not a running row.
"""

from __future__ import annotations

import numpy as np

from triton_models.engine.kv_blocks import BlockBudget
from triton_models.engine.kv_pool import KVPool
from triton_models.engine.prefix_cache import CacheEntry, PrefixCache
from triton_models.engine.requests import Seq

Owner = Seq | CacheEntry


class SlotError(RuntimeError):
    """A slot operation found the table in a state the scheduler should never produce."""


class SlotTable:
    def __init__(self, pool: KVPool, draft_pool: KVPool | None, budget: BlockBudget, prefix_cache: PrefixCache) -> None:
        self.pool = pool
        # The draft model's KV, slot for slot with the target's; caught up lazily (seq.draft_len), so only
        # releasing a sequence touches it: cache hits, moves and preemptions need no mirroring.
        self.draft_pool = draft_pool
        self.budget = budget
        self.prefix_cache = prefix_cache
        self.owners: list[Owner | None] = [None] * pool.slots

    # ---- finding room ---------------------------------------------------------------------------------

    def free_slot(self, low: int, below: int | None = None) -> int | None:
        """A free slot at or above `low` (highest first: the low range is where running rows go)."""
        for slot in range(len(self.owners) - 1, low - 1, -1):
            if self.owners[slot] is None and (below is None or slot < below):
                return slot
        return None

    def free_run(self, count: int, low: int) -> int | None:
        """Start of `count` consecutive free slots at or above `low` (highest first)."""
        run = 0
        for slot in range(len(self.owners) - 1, low - 1, -1):
            run = run + 1 if self.owners[slot] is None else 0
            if run == count:
                return slot
        return None

    def claim(self, low: int) -> int:
        """A free slot at or above `low`, evicting cached prefixes if needed (not yet assigned to anyone)."""
        slot = self.free_slot(low)
        while slot is None and self.evict_oldest():
            slot = self.free_slot(low)
        if slot is None:
            raise SlotError("no free KV slot (scheduler invariant broken)")
        return slot

    def reserve(self, seq: Seq, tokens: int) -> bool:
        """Make `seq` own enough blocks for `tokens` tokens, evicting cached prefixes if needed."""
        return self.budget.reserve(seq, tokens, self.evict_oldest)

    # ---- owners -----------------------------------------------------------------------------------------

    def assign(self, seq: Seq, slot: int) -> None:
        seq.slot = slot
        self.owners[slot] = seq

    def fork(self, src: Seq, seq: Seq, low: int) -> None:
        """Give `seq` (another choice of src's request, its blocks reserved already) a slot holding a copy of
        src's computed K/V, like a prefix-cache hit that reuses the whole prompt."""
        if src.slot is None:
            raise SlotError(f"sequence {src.id} has no slot to fork from")
        slot = self.claim(low)
        self.assign(seq, slot)
        self.pool.copy(src.slot, slot, src.kv_len)
        seq.kv_len = src.kv_len

    def regroup(self, seqs: list[Seq], start: int) -> None:
        """Give `seqs`, none with K/V computed yet, the consecutive slots start, start + 1, ... (bookkeeping only)."""
        for seq in seqs:
            if seq.slot is not None:
                self.owners[seq.slot] = None
        for i, seq in enumerate(seqs):
            self.assign(seq, start + i)

    def release(self, seq: Seq) -> None:
        """Give back seq's slot (both models' pages) and blocks."""
        seq.draft_len = 0
        if seq.slot is not None:
            self.pool.release(seq.slot)
            if self.draft_pool is not None:
                self.draft_pool.release(seq.slot)
            self.owners[seq.slot] = None
            seq.slot = None
        self.budget.give_back(seq)
        seq.kv_len = 0

    def detach(self, seq: Seq) -> None:
        """Release seq whatever state an interrupted operation left it in (it may own a slot it does not point
        at, or point at one it does not own)."""
        for slot, owner in enumerate(self.owners):
            if owner is seq:
                self.owners[slot] = None
                self.pool.release(slot)
        if seq.slot is not None and self.owners[seq.slot] is not seq:
            seq.slot = None
        self.release(seq)

    def reset(self) -> None:
        """Forget every owner and cached prefix and give all pages back (after a fault that left no trust in the
        table); the caller has already ended the sequences."""
        self.owners = [None] * len(self.owners)
        self.prefix_cache.clear()
        self.budget.used = 0
        for slot in range(len(self.owners)):
            self.pool.release(slot)
            if self.draft_pool is not None:
                self.draft_pool.release(slot)

    def move(self, owner: Owner, dst: int) -> None:
        src = owner.slot
        if src is None or self.owners[dst] is not None:
            raise SlotError(f"cannot move slot {src} into slot {dst} (scheduler invariant broken)")
        length = owner.kv_len if isinstance(owner, Seq) else int(owner.tokens.size)
        self.pool.copy(src, dst, length)
        self.pool.release(src)
        self.owners[src] = None
        self.owners[dst] = owner
        if isinstance(owner, CacheEntry):
            self.prefix_cache.moved(owner, dst)
        else:
            owner.slot = dst
            owner.draft_len = 0  # the draft's KV is not moved; it is recomputed when needed

    def vacate(self, slot: int, low: int) -> None:
        """Move whatever non-running owner sits in `slot` elsewhere (a cache entry with nowhere to go is evicted)."""
        owner = self.owners[slot]
        if owner is None:
            return
        target = self.free_slot(low)
        if target is None or target == slot:
            if isinstance(owner, CacheEntry):
                self.evict(owner)
                return
            raise SlotError("no free KV slot to vacate into (scheduler invariant broken)")
        self.move(owner, target)

    def place(self, seq: Seq, dst: int, low: int) -> None:
        """Put seq's K/V into slot `dst`, moving out whoever is there."""
        if seq.slot != dst:
            self.vacate(dst, low)
            self.move(seq, dst)

    # ---- prefix cache -----------------------------------------------------------------------------------

    def park(self, seq: Seq, low: int) -> None:
        """Turn a finished sequence's slot into a cache entry (its blocks move with it), or release it."""
        cache = self.prefix_cache
        if not cache.keeps(seq.kv_len):
            self.release(seq)
            return
        while cache.full():
            self.evict_oldest()
        src = seq.slot
        if src is None:
            raise SlotError("a sequence without a slot cannot be cached")
        entry = CacheEntry(np.asarray(seq.tokens[: seq.kv_len], dtype=np.int64), src, seq.blocks)
        if src < low:  # a running row: its slot must be given back to the running range
            target = self.free_slot(low)
            if target is None:
                self.release(seq)
                return
            self.pool.copy(src, target, seq.kv_len)
            self.pool.release(src)
            self.owners[src] = None
            entry.slot = target
        self.owners[entry.slot] = entry
        cache.add(entry)
        seq.slot, seq.blocks, seq.kv_len = None, 0, 0

    def evict(self, entry: CacheEntry) -> None:
        self.prefix_cache.remove(entry)
        self.pool.release(entry.slot)
        self.owners[entry.slot] = None
        self.budget.used -= entry.blocks

    def evict_oldest(self) -> bool:
        """Evict the least recently used entry; False when the cache is empty."""
        entry = self.prefix_cache.oldest()
        if entry is None:
            return False
        self.evict(entry)
        return True

    def copy_prefix(self, seq: Seq) -> int:
        """Copy the longest cached prefix (whole blocks, leaving >= 1 token to compute) into seq's slot; returns
        the tokens reused (seq.kv_len)."""
        entry, length = self.prefix_cache.longest_prefix(np.asarray(seq.tokens, dtype=np.int64))
        if entry is None:
            return 0
        if seq.slot is None:
            raise SlotError("a sequence without a slot cannot reuse a prefix")
        self.pool.copy(entry.slot, seq.slot, length)
        seq.kv_len = length
        return length
