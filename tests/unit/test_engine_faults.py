"""Fault isolation in the engine (engine/scheduler.py): a fault while working for some requests ends exactly those
with one final error event, the others finish as if nothing happened, and the engine keeps serving.

Faults are injected with a Runner that raises on chosen graph calls and with monkeypatched admission,
cancellation, slot-claim and sink failures. Outputs are checked against test_scheduler's reference model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.unit.test_scheduler import METADATA, FakeRunner, assert_invariants, prompt, reference, run
from triton_models.engine import (
    STOPPED_MESSAGE,
    Engine,
    EngineConfig,
    EngineSampling,
    EngineStopped,
    FinishReason,
    GenerationRequest,
    KVPool,
)

Call = tuple[int, int, int]  # (slot0, rows, new tokens per row)


class FaultyRunner(FakeRunner):
    """FakeRunner that raises on the calls `fault` picks (it sees the call about to run and the calls so far)."""

    def __init__(self, pool: KVPool, name: str = "target") -> None:
        super().__init__(pool)
        self.name = name
        self.fault: Callable[[Call, list[Call]], bool] = lambda call, calls: False

    def forward(self, slot0: int, ids: np.ndarray, seqlens_k: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        call = (slot0, ids.shape[0], ids.shape[1])
        if self.fault(call, self.calls):
            self.fault = lambda call, calls: False  # once
            raise RuntimeError(f"{self.name} call failed")
        return super().forward(slot0, ids, seqlens_k, logits_index)


@dataclass
class Events:
    """A sink that records everything; `raise_on` makes the named method raise (before recording)."""

    tokens: list[int] = field(default_factory=list)
    finals: list[tuple[str, str]] = field(default_factory=list)  # ("finish", reason) | ("fail", message)
    cancel: bool = False
    raise_on: set[str] = field(default_factory=set)

    def _maybe_raise(self, method: str) -> None:
        if method in self.raise_on:
            raise RuntimeError(f"sink.{method} broke")

    def token(self, token_id: int, index: int = 0, logprob: object = None) -> None:
        self._maybe_raise("token")
        self.tokens.append(token_id)

    def finish(self, reason: FinishReason, index: int = 0, last: bool = True) -> None:
        self._maybe_raise("finish")
        self.finals.append(("finish", reason))

    def fail(self, message: str) -> None:
        self._maybe_raise("fail")
        self.finals.append(("fail", message))

    def cancelled(self) -> bool:
        self._maybe_raise("cancelled")
        return self.cancel


def make(draft: bool = False, **overrides: int | bool) -> tuple[Engine, FaultyRunner, FaultyRunner | None]:
    config = EngineConfig(
        **{"max_running": 4, "kv_budget_tokens": 4096, "prefill_chunk": 32, **overrides}  # type: ignore[arg-type]
    )
    slots = 2 * config.max_running + config.max_cached

    def pool() -> KVPool:
        return KVPool(1, 1, 16, slots, METADATA.context_length)

    runner = FaultyRunner(pool())
    drafter = FaultyRunner(pool(), "draft") if draft else None
    return Engine(runner, config, drafter), runner, drafter


def steady(seed: int, length: int, max_tokens: int) -> list[int]:
    """A prompt (from `seed` on) whose reference output runs to max_tokens without an EOS."""
    while reference(tokens := prompt(seed, length), max_tokens)[1] != "length":
        seed += 1000
    return tokens


def submit(engine: Engine, tokens: list[int], max_tokens: int) -> Events:
    sink = Events()
    engine.submit(GenerationRequest(tokens, EngineSampling(max_tokens=max_tokens)), sink)
    return sink


def assert_completed(sink: Events, tokens: list[int], max_tokens: int) -> None:
    expected, reason = reference(tokens, max_tokens)
    assert (sink.tokens, sink.finals) == (expected, [("finish", reason)])


def assert_failed(sink: Events, message: str) -> None:
    assert sink.finals == [("fail", f"generation failed: {message}")]


def assert_serves(engine: Engine) -> None:
    """The engine is idle, holds no blocks but cached ones, and a new request runs to the reference output."""
    assert not engine.has_work()
    assert_invariants(engine)
    later = prompt(999, 20)
    sink = submit(engine, later, 12)
    run(engine)
    assert_completed(sink, later, 12)


def test_decode_call_failure_fails_its_rows_and_spares_the_prefilling_newcomer() -> None:
    engine, runner, _ = make()
    prompts = [steady(1, 6, 30), steady(2, 9, 30), prompt(3, 40)]
    a, b = submit(engine, prompts[0], 30), submit(engine, prompts[1], 30)
    for _ in range(3):
        engine.step()
    c = submit(engine, prompts[2], 10)  # 40 tokens: prefilled in two chunks while a and b decode
    runner.fault = lambda call, calls: call == (0, 2, 1)  # the next two-row decode call
    run(engine)
    assert_failed(a, "target call failed")
    assert_failed(b, "target call failed")
    assert len(a.tokens) == len(b.tokens) == 3  # what they had before the fault
    assert_completed(c, prompts[2], 10)
    assert engine.stats.failed == 2
    assert_serves(engine)


def test_chunked_prefill_failure_fails_only_that_prompt() -> None:
    engine, runner, _ = make(prefill_chunk=8)
    short, long = prompt(4, 5), prompt(5, 30)
    a = submit(engine, short, 40)
    engine.step()
    b = submit(engine, long, 5)
    runner.fault = lambda call, calls: call[1:] == (1, 8) and sum(c[1:] == (1, 8) for c in calls) == 1  # 2nd chunk
    run(engine)
    assert_failed(b, "target call failed")
    assert b.tokens == []
    assert_completed(a, short, 40)
    assert_serves(engine)


def test_batched_prefill_failure_fails_the_batch_and_spares_running_streams() -> None:
    engine, runner, _ = make()
    first = prompt(6, 10)
    a = submit(engine, first, 20)
    engine.step()
    group = [submit(engine, prompt(7 + i, 4), 5) for i in range(3)]
    runner.fault = lambda call, calls: call[1:] == (3, 4)  # the batched prefill of three 4-token prompts
    run(engine)
    for sink in group:
        assert_failed(sink, "target call failed")
    assert_completed(a, first, 20)
    assert_serves(engine)


def test_admission_failure_fails_that_request_and_the_queue_moves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _, _ = make()
    prompts = [prompt(10 + i, 8) for i in range(4)]
    sinks = [submit(engine, p, 6) for p in prompts]
    slots = engine.scheduler.slots
    real = slots.claim
    claims: list[int] = []

    def claim(low: int) -> int:
        claims.append(low)
        if len(claims) == 2:
            raise RuntimeError("claim broke")
        return real(low)

    monkeypatch.setattr(slots, "claim", claim)
    run(engine)
    assert_failed(sinks[1], "claim broke")
    assert sinks[1].tokens == []
    for i in (0, 2, 3):
        assert_completed(sinks[i], prompts[i], 6)
    assert_serves(engine)


def test_prefix_lookup_failure_during_admission(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _, _ = make(block_size=16)
    system = prompt(20, 48)
    first = submit(engine, [*system, 1, 2], 4)
    run(engine)
    real = engine.scheduler.slots.copy_prefix
    monkeypatch.setattr(
        engine.scheduler.slots, "copy_prefix", lambda seq: 1 / 0 if seq.tokens[:48] == system else real(seq)
    )
    hit, other = submit(engine, [*system, 3, 4], 4), submit(engine, prompt(21, 5), 4)
    run(engine)
    assert_failed(hit, "division by zero")
    assert_completed(other, prompt(21, 5), 4)
    assert first.finals and engine.scheduler.budget.used == engine.scheduler.prefix_cache.blocks
    monkeypatch.undo()
    assert_serves(engine)


def test_persistent_admission_failure_ends_every_queued_request() -> None:
    """Queued requests never hang: each gets its final error even if admission always fails."""
    engine, _, _ = make(max_running=2)
    sinks = [submit(engine, prompt(30 + i, 6), 4) for i in range(6)]

    def claim(low: int) -> int:
        raise RuntimeError("no slots today")

    engine.scheduler.slots.claim = claim  # type: ignore[method-assign]
    run(engine)
    for sink in sinks:
        assert_failed(sink, "no slots today")
    del engine.scheduler.slots.claim  # back to the class's method
    assert_serves(engine)


def test_cancellation_check_failure_fails_only_that_request() -> None:
    engine, _, _ = make()
    prompts = [steady(40 + i, 7, 25) for i in range(3)]
    sinks = [submit(engine, p, 25) for p in prompts]
    for _ in range(4):
        engine.step()
    sinks[1].raise_on.add("cancelled")
    run(engine)
    assert_failed(sinks[1], "sink.cancelled broke")
    assert_completed(sinks[0], prompts[0], 25)
    assert_completed(sinks[2], prompts[2], 25)
    assert_serves(engine)


def test_a_sink_that_raises_on_a_token_ends_only_its_own_request() -> None:
    engine, _, _ = make()
    prompts = [steady(50 + i, 5, 20) for i in range(3)]
    sinks = [submit(engine, p, 20) for p in prompts]
    for _ in range(3):
        engine.step()
    sinks[0].raise_on.add("token")  # the first running row: its leaving moves the last row into slot 0
    run(engine)
    assert_failed(sinks[0], "sink.token broke")
    for i in (1, 2):
        assert_completed(sinks[i], prompts[i], 20)
    assert_serves(engine)


def test_a_final_call_that_raises_is_followed_by_one_error() -> None:
    engine, _, _ = make()
    sink = submit(engine, prompt(60, 5), 3)
    sink.raise_on.add("finish")
    run(engine)
    assert sink.finals == [("fail", "generation failed: sink.finish broke")]
    assert_serves(engine)


def test_preemption_failure_fails_the_sequences_it_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _, _ = make(max_running=4, kv_budget_tokens=96, block_size=16, max_cached=0)
    prompts = [steady(70 + i, 14, 40) for i in range(3)]
    sinks = [submit(engine, p, 40) for p in prompts]

    def preempt(seq: object) -> None:
        raise RuntimeError("preemption broke")

    monkeypatch.setattr(engine.scheduler, "_preempt", preempt)
    while engine.has_work() and not any(s.finals for s in sinks):
        engine.step()
        assert_invariants(engine)
    monkeypatch.undo()
    run(engine)
    failed = [s for s in sinks if s.finals[0][0] == "fail"]
    # The grower and its victim (the newest) fail; whoever was not touched finishes correctly.
    assert failed and sinks[2] in failed
    for p, sink in zip(prompts, sinks, strict=True):
        if sink not in failed:
            assert_completed(sink, p, 40)
        else:
            assert sink.finals == [("fail", "generation failed: preemption broke")]
    assert_serves(engine)


@pytest.mark.parametrize("which", ["draft", "target"])
def test_speculative_round_failure_fails_the_lone_stream_and_speculation_still_matches(which: str) -> None:
    engine, runner, drafter = make(draft=True, speculative_k=3)
    assert drafter is not None
    lone = steady(80, 6, 30)
    sink = submit(engine, lone, 30)
    for _ in range(3):
        engine.step()
    assert engine.stats.spec_rounds > 0
    broken = drafter if which == "draft" else runner
    broken.fault = lambda call, calls: call[1:] == (1, 4) if which == "target" else True
    run(engine)
    assert_failed(sink, f"{which} call failed")
    again = submit(engine, lone, 30)  # speculative output is the plain greedy output
    run(engine)
    assert_completed(again, lone, 30)


def test_a_fault_the_repair_cannot_contain_ends_every_request_once(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, runner, _ = make()
    sinks = [submit(engine, prompt(90 + i, 5), 20) for i in range(3)]
    for _ in range(3):
        engine.step()
    waiting = submit(engine, prompt(94, 5), 5)

    def restore() -> None:
        raise RuntimeError("repair broke")

    monkeypatch.setattr(engine.scheduler, "_restore_running_range", restore)
    runner.fault = lambda call, calls: call == (0, 3, 1)
    engine.step()
    for sink in [*sinks, waiting]:
        assert len(sink.finals) == 1 and sink.finals[0][0] == "fail"
    assert sinks[0].finals == [("fail", "generation failed: target call failed")]
    assert waiting.finals == [("fail", "generation failed: repair broke")]
    monkeypatch.undo()
    assert engine.scheduler.budget.used == 0 and len(engine.scheduler.prefix_cache) == 0
    assert_serves(engine)


def test_run_loop_serves_until_stopped_then_refuses_requests() -> None:
    engine, _, _ = make()
    stop = threading.Event()
    steps: list[bool] = []
    thread = threading.Thread(target=engine.run, args=(stop, steps.append), daemon=True)
    thread.start()
    tokens = prompt(100, 6)
    sinks = [submit(engine, tokens, 5) for _ in range(2)]
    deadline = time.monotonic() + 10
    while not all(s.finals for s in sinks) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and True in steps and steps[-1] is False  # idle before it stopped
    for sink in sinks:
        assert_completed(sink, tokens, 5)
    with pytest.raises(EngineStopped):
        submit(engine, tokens, 5)


def test_stopping_the_run_loop_ends_open_and_queued_requests() -> None:
    engine, _, _ = make(max_running=1)
    stop = threading.Event()
    sinks = [submit(engine, prompt(105 + i, 6), 50) for i in range(3)]

    def after_step(worked: bool) -> None:
        stop.set()  # after the first step: one request running, two waiting

    engine.run(stop, after_step)
    for sink in sinks:
        assert sink.finals == [("fail", STOPPED_MESSAGE)]
    assert engine.scheduler.budget.used == 0 and not engine.has_work()


def test_run_loop_that_dies_fails_every_open_request() -> None:
    engine, _, _ = make()
    sinks = [submit(engine, prompt(110 + i, 6), 50) for i in range(2)]

    def after_step(worked: bool) -> None:
        raise RuntimeError("observer broke")

    with pytest.raises(RuntimeError, match="observer broke"):
        engine.run(threading.Event(), after_step)
    for sink in sinks:
        assert sink.finals == [("fail", STOPPED_MESSAGE)]
    assert engine.scheduler.budget.used == 0
