"""Iteration-level scheduling over one Runner. Every `step()` runs one decode call for all running sequences (one
token each), then at most one prefill call for newcomers (chunked: `prefill_chunk` tokens), so new sequences join
between decode steps and running streams keep flowing. A sequence leaves the moment it stops. KV memory is
accounted in blocks against the budget (kv_blocks.py); admission waits when it is full, and a running sequence
that cannot grow preempts the newest running one (recomputed later from its tokens). Finished sequences stay in
an LRU prefix cache (prefix_cache.py) that newcomers with the same leading tokens copy from.

Sampling: a row without per-request controls goes straight to the Sampler; one with logit_bias, penalties,
logprobs or a grammar is sampled from a controlled copy (sampler.controlled_logits, then the grammar mask), its
logprobs taken from the raw row. A request of n choices queues choice 0 only; when its prompt is computed the
other choices fork from its K/V (SlotTable.fork) and sample their first token from the same logits, then every
choice runs as a sequence of its own. Speculative rounds are for plain greedy rows only.

Fault isolation: whatever raises while the scheduler works for some requests (cancellation check, admission,
slot claim, a prefill/decode/draft/verify call, sampling, a sink) ends exactly those requests with an error,
puts slots and blocks back in order and lets the others go on. Only if that repair itself fails does the step
end every request (`fail_all`). Either way each request's sink gets its final call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from triton_models.engine.kv_blocks import BlockBudget
from triton_models.engine.prefix_cache import PrefixCache
from triton_models.engine.requests import FinishReason, Seq, TokenLogprob
from triton_models.engine.runner import Float32Array, Runner
from triton_models.engine.sampler import Sampler, controlled_logits, token_logprob
from triton_models.engine.settings import EngineConfig, EngineStats
from triton_models.engine.slots import SlotError, SlotTable
from triton_models.engine.speculative import SpeculativeDecoder

log = logging.getLogger(__name__)


class Scheduler:
    """Single-threaded: every method runs on the engine's thread (Engine hands it new sequences)."""

    def __init__(self, runner: Runner, config: EngineConfig, draft: Runner | None = None) -> None:
        self.runner = runner
        self.config = config
        self.eos_token_ids = frozenset(runner.metadata.eos_token_ids)
        pool = runner.pool
        self.capacity = min(pool.capacity, runner.metadata.context_length)
        self.budget = BlockBudget(config.kv_budget_tokens // config.block_size, config.block_size)
        self.prefix_cache = PrefixCache(config.prefix_cache, config.max_cached, config.block_size)
        self.speculative = (
            SpeculativeDecoder(draft, config.speculative_k, config.prefill_chunk)
            if draft is not None and config.speculative_k > 0
            else None
        )
        draft_pool = draft.pool if self.speculative is not None and draft is not None else None
        self.slots = SlotTable(pool, draft_pool, self.budget, self.prefix_cache)
        self.running: list[Seq] = []  # running[i].slot == i
        self.prefilling: list[Seq] = []  # admitted, prompt not fully computed yet; in admission order
        self.waiting: list[Seq] = []
        self.stats = EngineStats(
            kv_blocks_total=self.budget.total, kv_bytes_per_block=pool.bytes_per_token * config.block_size
        )

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    def step(self, arrivals: Sequence[Seq] = ()) -> bool:
        """Queue `arrivals`, then one iteration: cancellations, admission, one decode call, one prefill call.
        Returns False when there was nothing to do. Never raises for a request's sake (module docstring)."""
        self.waiting.extend(arrivals)
        if not self.has_work():
            return False
        try:
            self._drop_cancelled()
            self._admit()
            if self.running:
                self._decode()
            if self.prefilling:
                self._prefill()
        except Exception as exc:  # the containment itself failed: the state is not to be trusted any more
            log.exception("engine step failed and could not be contained; ending every request")
            self.fail_all(f"generation failed: {exc}")
        self._update_stats()
        return True

    def fail_all(self, message: str, arrivals: Sequence[Seq] = ()) -> None:
        """End every request with `message` and reset slots, blocks and the prefix cache."""
        seqs = [*self.running, *self.prefilling, *self.waiting, *arrivals]
        self.running, self.prefilling, self.waiting = [], [], []
        for seq in seqs:
            seq.done, seq.slot, seq.blocks, seq.kv_len, seq.draft_len = True, None, 0, 0, 0
        try:
            self.slots.reset()
        finally:
            for seq in seqs:
                seq.close(error=message)
            self._update_stats()

    def _update_stats(self) -> None:
        s = self.stats
        s.running, s.waiting, s.prefilling = len(self.running), len(self.waiting), len(self.prefilling)
        s.kv_blocks_used = self.budget.used
        s.kv_blocks_cached = self.prefix_cache.blocks

    # ---- ending requests ----------------------------------------------------------------------------------

    def _finish(self, seq: Seq, reason: FinishReason) -> None:
        if seq.done:
            return
        seq.done = True
        seq.kv_len = min(seq.kv_len, len(seq.tokens))  # speculation may have computed tokens never emitted
        if seq in self.running:
            self._leave_running(seq, keep_cache=reason != "cancelled")
        else:
            if seq in self.prefilling:
                self.prefilling.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            self.slots.release(seq)
        self.stats.finished += 1
        seq.close(reason)
        choices = seq.group
        if choices.unforked:  # choice 0 ended before its prompt was computed
            siblings, choices.unforked = choices.unforked, []
            for sibling in siblings:
                sibling.done = True
                self.stats.finished += 1
                sibling.close(reason)

    def _contain(self, seqs: Sequence[Seq], what: str, exc: Exception) -> None:
        """A fault while working for `seqs`: they end with the error, slots and blocks are put back in order,
        every other request goes on."""
        log.error("%s failed for sequence(s) %s: %r", what, [s.id for s in seqs], exc, exc_info=exc)
        victims = [s for s in seqs if not s.closed]
        try:
            for seq in victims:
                seq.done = True
                for queue in (self.running, self.prefilling, self.waiting):
                    if seq in queue:
                        queue.remove(seq)
                self.slots.detach(seq)
            self._restore_running_range()
        finally:  # if the repair fails, step() ends everyone else; these are out of the queues already
            self.stats.failed += len(victims)
            for seq in victims:
                seq.close(error=f"generation failed: {exc}")

    def _restore_running_range(self) -> None:
        """Running rows back into slots [0, n_running) after sequences left the list out of turn."""
        low = len(self.running)
        for i, seq in enumerate(self.running):
            if seq.slot != i:
                self.slots.place(seq, i, low)
            if self.slots.owners[i] is not seq:
                raise SlotError(f"running row {i} does not own its slot (scheduler invariant broken)")

    def _drop_cancelled(self) -> None:
        for seq in [*self.running, *self.prefilling, *self.waiting]:
            try:
                # A request that already had its final call (another choice failed) is over for every choice.
                if seq.group.closed or seq.sink.cancelled():
                    self._finish(seq, "cancelled")
            except Exception as exc:
                self._contain([seq], "cancellation", exc)

    # ---- admission --------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Move waiting sequences (priority, then arrival) into prefill while slots and blocks allow."""
        if not self.waiting:
            return
        self.waiting.sort(key=lambda s: (s.request.priority, s.arrival))
        while self.waiting and len(self.running) + len(self.prefilling) < self.config.max_running:
            seq = self.waiting[0]
            try:
                if not self.slots.reserve(seq, len(seq.tokens) + 1):
                    break  # wait for blocks; the queue order is kept (no overtaking by smaller requests)
                self.waiting.pop(0)
                self.slots.assign(seq, self.slots.claim(len(self.running)))
                self._lookup(seq)
                self.prefilling.append(seq)
            except Exception as exc:
                self._contain([seq], "admission", exc)

    def _lookup(self, seq: Seq) -> None:
        if not self.config.prefix_cache:
            return
        self.stats.prefix_queries += 1
        saved = self.slots.copy_prefix(seq)
        if saved:
            self.stats.prefix_hits += 1
            self.stats.prefill_tokens_saved += saved

    def _join_running(self, seq: Seq) -> None:
        self.slots.place(seq, len(self.running), len(self.running))
        self.running.append(seq)

    def _leave_running(self, seq: Seq, keep_cache: bool) -> None:
        index = seq.slot
        if index is None or index >= len(self.running) or self.running[index] is not seq:
            raise SlotError(f"sequence {seq.id} is not in its running row (scheduler invariant broken)")
        if keep_cache:
            self.slots.park(seq, len(self.running))
        else:
            self.slots.release(seq)
        last = self.running.pop()
        if last is not seq:
            self.running[index] = last
            self.slots.move(last, index)

    # ---- decode -----------------------------------------------------------------------------------------

    def _emit(self, seq: Seq, logits: Float32Array) -> bool:
        """Sample seq's next token; returns True if the sequence goes on. `logits` is only read (n choices
        sample from one prefill row)."""
        params = seq.sampling
        if seq.plain:
            return self._accept(seq, Sampler.sample(logits, params, seq.rng))
        row = controlled_logits(logits, params, seq.history)
        if seq.constraint is not None:
            seq.constraint.apply(row)
        token = Sampler.sample(row, params, seq.rng)
        logprob = None if params.top_logprobs is None else token_logprob(logits, token, params.top_logprobs)
        return self._accept(seq, token, logprob)

    def _accept(self, seq: Seq, token: int, logprob: TokenLogprob | None = None) -> bool:
        params = seq.sampling
        if seq.group.closed:  # another choice of this request failed: the request is over
            self._finish(seq, "cancelled")
            return False
        if token in self.eos_token_ids or token in params.stop_token_ids:
            self._finish(seq, "stop")
            return False
        if seq.constraint is not None:
            seq.constraint.advance(token)  # before the token leaves: a refused token is never streamed
        if seq.history is not None:
            seq.history.add(token)
        seq.tokens.append(token)
        seq.generated += 1
        self.stats.generated_tokens += 1
        seq.sink.token(token, seq.index, logprob)
        if seq.constraint is not None and seq.constraint.is_finished():
            self._finish(seq, "stop")  # the grammar is complete: nothing may follow
            return False
        if seq.generated >= params.max_tokens:
            self._finish(seq, "length")
            return False
        return True

    def _grow_or_preempt(self) -> None:
        """Every running sequence needs room for one more token; preempt the newest ones until it fits."""
        for seq in list(self.running):
            if seq.done or seq not in self.running:
                continue
            touched = [seq]
            try:
                while not self.slots.reserve(seq, seq.kv_len + 1):
                    victim = max(self.running, key=lambda s: s.arrival)
                    touched.append(victim)
                    self._preempt(victim)
                    if victim is seq:
                        break
            except Exception as exc:
                self._contain(touched, "KV growth", exc)

    def _preempt(self, seq: Seq) -> None:
        """Drop seq's KV and queue it again; on re-admission its prompt + emitted tokens are recomputed."""
        self._leave_running(seq, keep_cache=False)
        self.waiting.insert(0, seq)
        self.stats.preemptions += 1
        log.info("preempted sequence %d (%d tokens) to free KV blocks", seq.id, len(seq.tokens))

    def _decode(self) -> None:
        self._grow_or_preempt()
        rows = list(self.running)
        if not rows:
            return
        if len(rows) == 1 and self.speculative is not None:
            try:
                if self._speculate(rows[0]):
                    return
            except Exception as exc:
                self._contain(rows, "speculative round", exc)
                return
        ids = np.array([[s.tokens[-1]] for s in rows], dtype=np.int64)
        lengths = np.array([s.kv_len for s in rows], dtype=np.int32)  # after this step: kv_len + 1 tokens
        try:
            if len(rows) == 1 and rows[0].sampling.seed is not None and rows[0].sampling.temperature > 0.0:
                logits = self._forward_beside_scratch(ids, lengths)
            else:
                logits = self.runner.forward(0, ids, lengths, np.arange(len(rows), dtype=np.int64))
        except Exception as exc:
            self._contain(rows, "decode call", exc)
            return
        self.stats.decode_steps += 1
        for seq in rows:
            seq.kv_len += 1
        for b, seq in enumerate(rows):
            try:
                self._emit(seq, logits[b])
            except Exception as exc:
                self._contain([seq], "decode", exc)

    def _forward_beside_scratch(self, ids: npt.NDArray[np.int64], lengths: npt.NDArray[np.int32]) -> Float32Array:
        """A lone seeded, sampled row's step, run as a batch of two: the row (slot 0) and a one-token scratch row in
        slot 1 whose position 0 is saved and put back. onnxruntime's CPU kernels for a single row (GEMM with M = 1,
        MatMulNBits' GEMV) round differently from those for a batch, and int8 activations can turn that rounding
        into a different sample, so without this a seeded request alone would not give the tokens it gives batched
        with others. Greedy rows skip it (their argmax rarely sits on such a tie and lone steps stay cheapest)."""
        arrays = getattr(self.runner.pool, "arrays", None)
        if not arrays or arrays[0].shape[0] < 2:
            return self.runner.forward(0, ids, lengths, np.arange(1, dtype=np.int64))
        saved = [array[1, :, 0, :].copy() for array in arrays]
        try:
            return self.runner.forward(
                0,
                np.concatenate([ids, ids]),
                np.array([lengths[0], 0], dtype=np.int32),
                np.arange(1, dtype=np.int64),
            )
        finally:
            for array, part in zip(arrays, saved, strict=True):
                array[1, :, 0, :] = part

    def _speculate(self, seq: Seq) -> bool:
        """One speculative round (speculative.py) if it applies; False when it does not."""
        spec = self.speculative
        if spec is None or seq.sampling.temperature != 0.0 or not seq.plain or self.prefilling or self.waiting:
            return False  # newcomers first: a round is ~k times longer than a step
        config = self.config
        if seq.spec_acceptance < config.speculative_min_acceptance:
            # Drafts were mostly refused lately: plain steps (the output is the same either way), then a new try.
            seq.spec_paused += 1
            if seq.spec_paused <= config.speculative_retry_steps:
                self.stats.spec_paused_steps += 1
                return False
            seq.spec_paused, seq.spec_acceptance = 0, config.speculative_min_acceptance
        if seq.kv_len + spec.k + 1 > self.capacity or not self.slots.reserve(seq, seq.kv_len + spec.k + 1):
            return False
        result = spec.round(seq, self.runner)
        seq.spec_acceptance = 0.5 * seq.spec_acceptance + 0.5 * result.accepted / spec.k
        self.stats.spec_rounds += 1
        self.stats.spec_proposed += spec.k
        self.stats.spec_accepted += result.accepted
        self.stats.decode_steps += 1
        for token in result.tokens:
            if not self._accept(seq, token):
                break
        return True

    # ---- prefill ----------------------------------------------------------------------------------------

    def _prefill(self) -> None:
        head = self.prefilling[0]
        group = self._prefill_group(head)
        try:
            start = self.slots.free_run(len(group), len(self.running)) if len(group) > 1 else None
            if start is None:
                group = [head]
                logits = self._prefill_chunk(head)
            else:
                logits = self._prefill_batch(group, start)
        except Exception as exc:
            self._contain(group, "prefill call", exc)
            return
        for i, seq in enumerate(group):
            if seq.kv_len < len(seq.tokens):
                continue  # one chunk of a longer prompt
            try:
                self.prefilling.remove(seq)
                self._fork(seq, logits[i])
                if self._emit(seq, logits[i]):
                    self._join_running(seq)
            except Exception as exc:
                self._contain([seq], "prefill", exc)

    def _fork(self, seq: Seq, logits: Float32Array) -> None:
        """seq's prompt is computed: its request's other choices copy its K/V and sample their first token from
        the same logits, each with its own RNG. A choice without room now (running rows, blocks) waits and
        computes the prompt itself later."""
        choices = seq.group
        if not choices.unforked:
            return
        siblings, choices.unforked = choices.unforked, []
        for sibling in siblings:
            try:
                # + 1: seq joins the running rows too
                if len(self.running) + len(self.prefilling) + 1 < self.config.max_running and self.slots.reserve(
                    sibling, seq.kv_len + 1
                ):
                    self.slots.fork(seq, sibling, len(self.running))
                    self.stats.forks += 1
                    if self._emit(sibling, logits):
                        self._join_running(sibling)
                else:
                    self.waiting.append(sibling)
            except Exception as exc:
                self._contain([sibling], "fork", exc)

    def _prefill_group(self, head: Seq) -> list[Seq]:
        """Whole short prompts without cached prefixes, batched right-padded to the longest (head first)."""
        chunk = self.config.prefill_chunk
        if head.kv_len > 0 or len(head.tokens) > chunk:
            return [head]
        group = [head]
        for seq in self.prefilling[1:]:
            width = max(len(s.tokens) for s in [*group, seq])
            if seq.kv_len > 0 or width * (len(group) + 1) > chunk:
                break
            group.append(seq)
        return group

    def _prefill_batch(self, group: list[Seq], start: int) -> Float32Array:
        self.slots.regroup(group, start)  # nothing computed yet, so moving is only bookkeeping
        width = max(len(s.tokens) for s in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        for i, seq in enumerate(group):
            ids[i, : len(seq.tokens)] = seq.tokens
        lengths = np.array([len(s.tokens) - 1 for s in group], dtype=np.int32)
        # GroupQueryAttention treats the call as a first prompt (S == total length): rows are right-padded.
        index = np.array([i * width + len(s.tokens) - 1 for i, s in enumerate(group)], dtype=np.int64)
        logits = self.runner.forward(start, ids, lengths, index)
        self.stats.prefill_calls += 1
        for seq in group:
            self.stats.prefill_tokens += len(seq.tokens)
            seq.kv_len = len(seq.tokens)
        return logits

    def _prefill_chunk(self, seq: Seq) -> Float32Array:
        if seq.slot is None:
            raise SlotError(f"sequence {seq.id} is prefilling without a slot")
        start = seq.kv_len
        end = min(len(seq.tokens), start + self.config.prefill_chunk)
        ids = np.array([seq.tokens[start:end]], dtype=np.int64)
        logits = self.runner.forward(
            seq.slot, ids, np.array([end - 1], dtype=np.int32), np.array([end - start - 1], dtype=np.int64)
        )
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += end - start
        seq.kv_len = end
        return logits
