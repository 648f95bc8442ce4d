"""engine.Engine's scheduling (engine/scheduler.py) with a fake model whose next token is a function of the whole KV
history.

The fake writes each token into the real KVPool at its position and reads the slot back to decide the next
token, so a wrong slot move, prefix copy, chunk boundary or preemption changes the output. Every scheduled run
is compared with a plain reference loop over the true token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from llmesh.model_artifact import ModelMetadata
from triton_models.engine import (
    Engine,
    EngineConfig,
    EngineSampling,
    FinishReason,
    GenerationRequest,
    KVPool,
    RequestRejected,
)

VOCAB = 64
EOS = 0


def next_token(history: list[int]) -> int:
    value = sum((i + 1) * t for i, t in enumerate(history)) + 7 * len(history)
    return value % 61 + 1 if value % 101 else EOS  # EOS now and then


def reference(prompt: list[int], max_tokens: int) -> tuple[list[int], FinishReason]:
    history, out = list(prompt), []
    while len(out) < max_tokens:
        token = next_token(history)
        if token == EOS:
            return out, "stop"
        out.append(token)
        history.append(token)
    return out, "length"


METADATA = ModelMetadata(
    variant="fake",
    context_length=256,
    vocab_size=VOCAB,
    num_layers=1,
    num_kv_heads=1,
    head_dim=16,
    eos_token_ids=(EOS,),
    bos_token=None,
    eos_token=None,
    chat_template=None,
    ort_threads=1,
)


class FakeRunner:
    """Runner (engine.runner) stand-in: stores token ids as 'keys' and derives logits from the stored history."""

    def __init__(self, pool: KVPool) -> None:
        self.metadata = METADATA
        self.pool = pool
        self.calls: list[tuple[int, int, int]] = []  # (slot0, rows, new tokens per row)

    def forward(self, slot0: int, ids: np.ndarray, seqlens_k: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        rows, width = ids.shape
        self.calls.append((slot0, rows, width))
        keys = self.pool.arrays[0]
        first_prompt = width > 1 and width == int(seqlens_k.max()) + 1
        out = np.zeros((rows * width, VOCAB), dtype=np.float32)
        for b in range(rows):
            total = int(seqlens_k[b]) + 1
            past = 0 if first_prompt else total - width
            new = total - past
            keys[slot0 + b, 0, past:total, 0] = ids[b, :new]
            history = [int(t) for t in keys[slot0 + b, 0, :total, 0]]
            for s in range(new):
                out[b * width + s, next_token(history[: past + s + 1])] = 10.0
        return out[logits_index]


@dataclass
class Recorder:
    tokens: list[int]
    reason: FinishReason | None = None
    cancel: bool = False
    error: str | None = None

    def token(self, token_id: int, index: int = 0, logprob: object = None) -> None:
        self.tokens.append(token_id)

    def finish(self, reason: FinishReason, index: int = 0, last: bool = True) -> None:
        assert self.reason is None, "finished twice"
        self.reason = reason

    def fail(self, message: str) -> None:
        self.error = message

    def cancelled(self) -> bool:
        return self.cancel


def make_engine(**overrides: int | bool) -> tuple[Engine, FakeRunner]:
    config = EngineConfig(**{"max_running": 4, "kv_budget_tokens": 4096, "prefill_chunk": 32, **overrides})  # type: ignore[arg-type]
    pool = KVPool(1, 1, 16, 2 * config.max_running + config.max_cached, METADATA.context_length)
    runner = FakeRunner(pool)
    return Engine(runner, config), runner


def prompt(seed: int, length: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, VOCAB, length)]


def submit(engine: Engine, tokens: list[int], max_tokens: int, priority: int = 0) -> Recorder:
    sink = Recorder([])
    engine.submit(GenerationRequest(tokens, EngineSampling(max_tokens=max_tokens), priority=priority), sink)
    return sink


def run(engine: Engine, check: bool = True) -> None:
    while engine.has_work():
        engine.step()
        if check:
            assert_invariants(engine)


def assert_invariants(engine: Engine) -> None:
    s = engine.scheduler
    assert 0 <= s.budget.used <= s.budget.total
    owned = sum(q.blocks for q in [*s.running, *s.prefilling, *s.waiting])
    assert s.budget.used == owned + sum(e.blocks for e in s.prefix_cache.values())
    for i, seq in enumerate(s.running):
        assert seq.slot == i and s.slots.owners[i] is seq
    for seq in s.prefilling:
        assert seq.slot is not None and s.slots.owners[seq.slot] is seq
    for entry in s.prefix_cache.values():
        assert s.slots.owners[entry.slot] is entry


def test_outputs_equal_the_reference_under_batching_chunking_and_leaving() -> None:
    engine, _ = make_engine()
    prompts = [prompt(i, n) for i, n in enumerate([5, 40, 3, 70, 12, 9, 33, 1])]
    sinks = [submit(engine, p, 30) for p in prompts]
    run(engine)
    for p, sink in zip(prompts, sinks, strict=True):
        assert (sink.tokens, sink.reason) == reference(p, 30)


def test_newcomers_join_between_decode_steps_and_running_streams_keep_flowing() -> None:
    engine, runner = make_engine(prefill_chunk=8)
    first = submit(engine, prompt(1, 4), 200)
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 1
    before = len(first.tokens)
    late = submit(engine, prompt(2, 40), 5)  # 40 tokens: prefilled in 5 chunks of 8
    steps = 0
    while not late.tokens:
        engine.step()
        steps += 1
    # Every step while the newcomer prefilled also decoded one token for the running stream.
    assert len(first.tokens) - before == steps
    assert len(engine.scheduler.running) == 2
    engine.step()
    assert runner.calls[-1][1:] == (2, 1), "the newcomer did not join the decode batch"
    run(engine)
    assert (late.tokens, late.reason) == reference(prompt(2, 40), 5)


def test_a_finished_sequence_leaves_the_batch_at_once() -> None:
    engine, runner = make_engine()
    short, long = submit(engine, prompt(3, 6), 1), submit(engine, prompt(4, 6), 50)
    engine.step()  # prefill both; `short` is done after its first token
    assert short.reason is not None and [s.request.sampling.max_tokens for s in engine.scheduler.running] == [50]
    engine.step()
    assert runner.calls[-1][1] == 1  # the next decode call has one row
    run(engine)
    assert long.reason is not None


def test_cancellation_frees_blocks_at_once_and_spares_the_others() -> None:
    engine, _ = make_engine(prefix_cache=False)
    a, b = submit(engine, prompt(5, 30), 100), submit(engine, prompt(6, 30), 100)
    for _ in range(3):
        engine.step()
    used = engine.scheduler.budget.used
    b_blocks = next(s.blocks for s in engine.scheduler.running if s.sink is b)
    b.cancel = True
    engine.step()
    assert b.reason == "cancelled"
    # One step later: b's blocks are gone (a may have grown by at most one block).
    assert engine.scheduler.budget.used <= used - b_blocks + 1
    assert [s.sink for s in engine.scheduler.running] == [a]
    run(engine)
    assert (a.tokens, a.reason) == reference(prompt(5, 30), 100)
    assert engine.scheduler.budget.used == 0


def test_cancelled_while_waiting_never_runs() -> None:
    engine, runner = make_engine()
    sink = submit(engine, prompt(7, 10), 10)
    sink.cancel = True
    run(engine)
    assert sink.reason == "cancelled" and sink.tokens == [] and runner.calls == []


def test_prefix_cache_reuses_blocks_and_gives_the_same_tokens() -> None:
    engine, runner = make_engine(block_size=16)
    system = prompt(8, 64)
    first = submit(engine, system + prompt(9, 5), 10)
    run(engine)
    calls_before = len(runner.calls)
    question = system + prompt(10, 7)
    second = submit(engine, question, 10)
    run(engine)
    assert engine.stats.prefix_hits >= 1 and engine.stats.prefill_tokens_saved >= 64
    # Only the 7 new tokens were prefilled: the first call after the hit computed 7 positions, not 71.
    assert runner.calls[calls_before][2] == 7
    assert (second.tokens, second.reason) == reference(question, 10)
    assert first.reason is not None


def test_prefix_cache_is_lru_within_its_entry_limit() -> None:
    engine, _ = make_engine(max_cached=2)
    for i in range(4):
        submit(engine, prompt(20 + i, 40), 3)
        run(engine)
    assert len(engine.scheduler.prefix_cache) == 2


def test_kv_budget_holds_with_64_requests_and_preempted_ones_finish_correctly() -> None:
    # 64 requests of up to 100 tokens each against a budget of 1024 tokens: admission waits, and growing
    # sequences preempt the newest (recomputed later). Every output still equals the reference.
    engine, _ = make_engine(max_running=16, kv_budget_tokens=1024, prefill_chunk=64)
    prompts = [prompt(100 + i, 5 + i % 30) for i in range(64)]
    sinks = [submit(engine, p, 60) for p in prompts]
    peak = 0
    while engine.has_work():
        engine.step()
        assert_invariants(engine)
        peak = max(peak, engine.scheduler.budget.used)
    assert peak <= engine.scheduler.budget.total
    for p, sink in zip(prompts, sinks, strict=True):
        assert (sink.tokens, sink.reason) == reference(p, 60)
    assert engine.stats.preemptions > 0


def test_priority_orders_admission() -> None:
    engine, _ = make_engine(max_running=1)
    order: list[str] = []
    free = submit(engine, prompt(30, 5), 3, priority=3)
    paid = submit(engine, prompt(31, 5), 3, priority=2)
    enterprise = submit(engine, prompt(32, 5), 3, priority=1)
    while engine.has_work():
        engine.step()
        for name, sink in (("free", free), ("paid", paid), ("enterprise", enterprise)):
            if sink.reason is not None and name not in order:
                order.append(name)
    assert order == ["enterprise", "paid", "free"]


def test_request_larger_than_the_kv_budget_is_rejected() -> None:
    engine, _ = make_engine(kv_budget_tokens=64)
    with pytest.raises(RequestRejected, match="KV cache budget"):
        submit(engine, prompt(40, 50), 20)


def test_model_failure_ends_every_sequence_with_an_error_and_the_engine_recovers() -> None:
    engine, runner = make_engine()
    sinks = [submit(engine, prompt(50 + i, 8), 10) for i in range(3)]
    real = runner.forward

    def explode(*args: object) -> np.ndarray:
        raise RuntimeError("onnxruntime exploded")

    runner.forward = explode  # type: ignore[method-assign]
    engine.step()
    assert all(s.error == "generation failed: onnxruntime exploded" for s in sinks)
    assert engine.scheduler.budget.used == 0 and not engine.has_work()
    runner.forward = real  # type: ignore[method-assign]
    again = submit(engine, prompt(60, 8), 5)
    run(engine)
    assert (again.tokens, again.reason) == reference(prompt(60, 8), 5)


class WrongDraft(FakeRunner):
    """A draft that never proposes what the target picks (its choice shifted by one token id)."""

    def forward(self, slot0: int, ids: np.ndarray, seqlens_k: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        logits = super().forward(slot0, ids, seqlens_k, logits_index)
        return np.roll(logits, 1, axis=1)


def _speculative_engine(draft_class: type[FakeRunner]) -> tuple[Engine, FakeRunner]:
    config = EngineConfig(max_running=4, kv_budget_tokens=4096, prefill_chunk=32, draft="d", speculative_k=4)
    slots = 2 * config.max_running + config.max_cached
    runner = FakeRunner(KVPool(1, 1, 16, slots, METADATA.context_length))
    draft = draft_class(KVPool(1, 1, 16, slots, METADATA.context_length))
    return Engine(runner, config, draft), runner


def test_a_sequence_whose_drafts_are_refused_stops_speculating_and_tries_again_later() -> None:
    tokens = prompt(21, 12)
    expected, reason = reference(tokens, 120)
    engine, _ = _speculative_engine(WrongDraft)
    sink = submit(engine, tokens, 120)
    run(engine)
    assert (sink.tokens, sink.reason) == (expected, reason)  # the same output either way
    stats = engine.stats
    assert stats.spec_accepted == 0 and stats.spec_paused_steps > 0
    # Two refused rounds pause it; then one retry per 16 plain steps.
    assert stats.spec_rounds <= 2 + len(expected) // 16 + 1


def test_a_sequence_whose_drafts_are_accepted_keeps_speculating() -> None:
    tokens = prompt(22, 12)
    expected, reason = reference(tokens, 60)
    engine, _ = _speculative_engine(FakeRunner)
    sink = submit(engine, tokens, 60)
    run(engine)
    assert (sink.tokens, sink.reason) == (expected, reason)
    assert engine.stats.spec_paused_steps == 0 and engine.stats.spec_accepted > 0
