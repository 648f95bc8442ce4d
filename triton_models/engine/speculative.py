"""Greedy speculative decoding for a lone running sequence: a small draft model proposes k tokens one by one, the
target checks all of them in one call (S = k + 1), and the agreeing prefix plus the target's own next token are
emitted. The output is exactly the target's greedy output, bit for bit, as long as the graph computes a row the
same whatever the number of tokens in its call: the graph makes single-row steps take the attention kernels of
S > 1 calls for that (graph.py, _SingleRowPadding). Only the number of target calls changes.

The draft keeps its own KV in its own pool, slot for slot with the target's, and is caught up lazily
(seq.draft_len): after a prefill, a prefix-cache hit, a move or a preemption it recomputes what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from triton_models.engine.requests import Seq
from triton_models.engine.runner import Runner


@dataclass(frozen=True)
class Round:
    tokens: list[int]  # to emit in order: the accepted drafts, then the target's own next token
    accepted: int  # draft tokens the target agreed with (of k)


class SpeculativeDecoder:
    def __init__(self, draft: Runner, k: int, prefill_chunk: int) -> None:
        self.draft = draft
        self.k = k
        self.prefill_chunk = prefill_chunk

    def round(self, seq: Seq, target: Runner) -> Round:
        """One round for `seq`, whose blocks must already cover kv_len + k + 1 tokens. Advances seq.kv_len past
        the fed token and the accepted drafts (the rest of the verified positions is overwritten later)."""
        draft, k = self.draft, self.k
        slot = seq.slot
        if slot is None:
            raise RuntimeError("speculative round for a sequence without a slot")
        while seq.draft_len < seq.kv_len:  # catch the draft up (after prefill, a cache hit or a move)
            end = min(seq.kv_len, seq.draft_len + self.prefill_chunk)
            ids = np.array([seq.tokens[seq.draft_len : end]], dtype=np.int64)
            draft.forward(slot, ids, np.array([end - 1], dtype=np.int32), np.array([end - seq.draft_len - 1]))
            seq.draft_len = end
        proposals: list[int] = []
        last = seq.tokens[-1]
        for _ in range(k):
            logits = draft.forward(
                slot, np.array([[last]], dtype=np.int64), np.array([seq.draft_len], dtype=np.int32), np.array([0])
            )
            seq.draft_len += 1
            last = int(np.argmax(logits[0]))
            proposals.append(last)
        ids = np.array([[seq.tokens[-1], *proposals]], dtype=np.int64)
        logits = target.forward(slot, ids, np.array([seq.kv_len + k], dtype=np.int32), np.arange(k + 1, dtype=np.int64))
        choices = logits.argmax(axis=1)
        accepted = 0
        while accepted < k and proposals[accepted] == int(choices[accepted]):
            accepted += 1
        seq.kv_len += 1 + accepted  # the fed token and the accepted drafts
        seq.draft_len = min(seq.draft_len, seq.kv_len)
        return Round([*proposals[:accepted], int(choices[accepted])], accepted)
