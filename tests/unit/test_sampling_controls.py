"""The engine's per-request sampling controls (logit_bias, penalties, logprobs, stop ids, grammar, n choices, seeds)
against a fake model whose logits are a pure function of the token history, so every expected value is recomputed
here independently of the engine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.unit.test_scheduler import METADATA, VOCAB, assert_invariants
from triton_models.engine import (
    Engine,
    EngineConfig,
    EngineSampling,
    FinishReason,
    GenerationRequest,
    KVPool,
    RequestRejected,
    Sampler,
    TokenLogprob,
)
from triton_models.engine import scheduler as scheduler_module
from triton_models.engine.requests import TokenHistory
from triton_models.engine.sampler import controlled_logits, token_logprob

EOS = METADATA.eos_token_ids[0]


def row_for(history: list[int]) -> np.ndarray:
    """The fake model's logits after `history`: random but fixed per history; EOS is never likely."""
    digest = hashlib.sha256(np.asarray(history, dtype=np.int64).tobytes()).digest()
    row = np.random.default_rng(int.from_bytes(digest[:8], "little")).normal(0.0, 2.0, VOCAB).astype(np.float32)
    row[EOS] = -30.0
    return row


class HistoryRunner:
    """Runner stand-in: stores ids as 'keys' in the real KVPool and returns row_for(the stored history), so a wrong
    slot copy (a fork, a move) changes the output."""

    def __init__(self, pool: KVPool, row: object = row_for) -> None:
        self.metadata = METADATA
        self.pool = pool
        self.row = row
        self.calls: list[tuple[int, int, int]] = []

    def forward(self, slot0: int, ids: np.ndarray, seqlens_k: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        rows, width = ids.shape
        self.calls.append((slot0, rows, width))
        keys = self.pool.arrays[0]
        first_prompt = width > 1 and width == int(seqlens_k.max()) + 1
        out = np.zeros((rows * width, VOCAB), dtype=np.float32)
        for b in range(rows):
            total = int(seqlens_k[b]) + 1
            past = 0 if first_prompt else total - width
            keys[slot0 + b, 0, past:total, 0] = ids[b, : total - past]
            history = [int(t) for t in keys[slot0 + b, 0, :total, 0]]
            for s in range(total - past):
                out[b * width + s] = self.row(history[: past + s + 1])  # type: ignore[operator]
        return out[logits_index]


def make(row: object = row_for, grammar: object = None, **overrides: int | bool) -> tuple[Engine, HistoryRunner]:
    config = EngineConfig(**{"max_running": 4, "kv_budget_tokens": 4096, "prefill_chunk": 32, **overrides})  # type: ignore[arg-type]
    runner = HistoryRunner(KVPool(1, 1, 16, 2 * config.max_running + config.max_cached, METADATA.context_length), row)
    return Engine(runner, config, grammar=grammar), runner  # type: ignore[arg-type]


@dataclass
class Events:
    """Everything a sink hears, per choice."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)
    finishes: list[tuple[int, FinishReason, bool]] = field(default_factory=list)
    error: str | None = None
    cancel: bool = False

    def token(self, token_id: int, index: int = 0, logprob: TokenLogprob | None = None) -> None:
        assert not self.finishes or not self.finishes[-1][2], "token after the final call"
        self.tokens.setdefault(index, []).append(token_id)
        self.logprobs.setdefault(index, []).append(logprob)

    def finish(self, reason: FinishReason, index: int = 0, last: bool = True) -> None:
        assert all(i != index for i, _, _ in self.finishes), "choice finished twice"
        self.finishes.append((index, reason, last))

    def fail(self, message: str) -> None:
        self.error = message

    def cancelled(self) -> bool:
        return self.cancel

    def reason(self, index: int = 0) -> FinishReason:
        return next(r for i, r, _ in self.finishes if i == index)


def submit(engine: Engine, prompt: list[int], n: int = 1, **sampling: object) -> Events:
    sink = Events()
    params = EngineSampling(**{"max_tokens": 12, **sampling})  # type: ignore[arg-type]
    engine.submit(GenerationRequest(prompt, params, n=n), sink)
    return sink


def run(engine: Engine) -> None:
    while engine.has_work():
        engine.step()
        assert_invariants(engine)


def generate(prompt: list[int], n: int = 1, engine: Engine | None = None, **sampling: object) -> Events:
    engine = engine or make()[0]
    sink = submit(engine, prompt, n, **sampling)
    run(engine)
    return sink


PROMPT = [5, 9, 13, 2, 40]


def greedy_reference(prompt: list[int], max_tokens: int, adjust: object = None, model: object = row_for) -> list[int]:
    history, out = list(prompt), list[int]()
    for _ in range(max_tokens):
        row = model(history)  # type: ignore[operator]
        if adjust is not None:
            row = adjust(row, out)  # type: ignore[operator]
        token = int(np.argmax(row))
        out.append(token)
        history.append(token)
    return out


# ---- the plain path --------------------------------------------------------------------------------------


def test_a_plain_row_is_sampled_as_it_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_copy(*args: object) -> None:
        raise AssertionError("a plain row went through the controls")

    monkeypatch.setattr(scheduler_module, "controlled_logits", no_copy)
    monkeypatch.setattr(scheduler_module, "token_logprob", no_copy)
    sink = generate(PROMPT)
    assert sink.tokens[0] == greedy_reference(PROMPT, 12) and sink.finishes == [(0, "length", True)]
    assert sink.logprobs[0] == [None] * 12
    assert EngineSampling(max_tokens=1, temperature=0.7, top_k=3, top_p=0.5, seed=1).plain
    assert not EngineSampling(max_tokens=1, top_logprobs=0).plain


# ---- logit_bias and penalties ----------------------------------------------------------------------------


def test_a_large_negative_bias_on_the_greedy_token_changes_the_output() -> None:
    plain = greedy_reference(PROMPT, 12)
    banned = plain[0]
    biased = generate(PROMPT, logit_bias=((banned, -100.0),)).tokens[0]
    assert biased[0] != banned and banned not in biased

    def ban(row: np.ndarray, out: list[int]) -> np.ndarray:
        row = row.copy()
        row[banned] -= 100.0
        return row

    assert biased == greedy_reference(PROMPT, 12, ban)


def test_a_large_positive_bias_forces_a_token() -> None:
    assert generate(PROMPT, logit_bias=((17, 100.0),)).tokens[0] == [17] * 12


def _sticky(history: list[int]) -> np.ndarray:
    """A model that always prefers 5, then 6, then 7."""
    row = np.full(VOCAB, -10.0, dtype=np.float32)
    row[[5, 6, 7]] = [3.0, 2.5, 2.0]
    return row


def test_frequency_and_presence_penalties_reduce_repeats() -> None:
    plain = generate(PROMPT, engine=make(_sticky)[0]).tokens[0]
    frequency = generate(PROMPT, engine=make(_sticky)[0], frequency_penalty=1.0).tokens[0]
    presence = generate(PROMPT, engine=make(_sticky)[0], presence_penalty=2.0).tokens[0]
    assert plain == [5] * 12
    assert max(frequency.count(t) for t in set(frequency)) <= 5 and set(frequency) == {5, 6, 7}
    # presence: 5, then 6 (5: 1.0 < 2.5), 7 (6: 0.5 < 2.0), then 5 for good (every penalty is the same 2.0)
    assert presence == [5, 6, 7] + [5] * 9
    frequency_params = EngineSampling(max_tokens=12, frequency_penalty=1.0)
    assert frequency == greedy_reference(
        PROMPT, 12, lambda row, out: _naive_controls(row, frequency_params, PROMPT, out), model=_sticky
    )


def _naive_controls(row: np.ndarray, params: EngineSampling, prompt: list[int], out: list[int]) -> np.ndarray:
    """The same controls, recounted from scratch (the engine keeps its counts incrementally)."""
    row = row.astype(np.float32).copy()
    for token, bias in params.logit_bias:
        row[token] += bias
    p = params.repetition_penalty
    for token in set(prompt) | set(out):
        row[token] = row[token] / p if row[token] > 0 else row[token] * p
    for token in set(out):
        row[token] -= params.presence_penalty + params.frequency_penalty * out.count(token)
    return row


def test_controlled_logits_match_a_naive_recount() -> None:
    rng = np.random.default_rng(0)
    params = EngineSampling(
        max_tokens=40,
        presence_penalty=0.7,
        frequency_penalty=-0.4,
        repetition_penalty=1.3,
        logit_bias=((3, 5.0), (8, -7.5)),
    )
    prompt = [int(t) for t in rng.integers(1, VOCAB, 10)]
    history = TokenHistory(prompt, params.max_tokens)
    out: list[int] = []
    for _ in range(40):
        row = rng.normal(0, 3, VOCAB).astype(np.float32)
        got = controlled_logits(row, params, history)
        np.testing.assert_allclose(got, _naive_controls(row, params, prompt, out), rtol=1e-6, atol=1e-5)
        token = int(rng.integers(1, 12))  # few distinct tokens: counts grow
        out.append(token)
        history.add(token)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    params = EngineSampling(max_tokens=4, repetition_penalty=2.0)
    history = TokenHistory([1, 2], params.max_tokens)
    row = np.zeros(VOCAB, dtype=np.float32)
    row[[1, 2, 3]] = [4.0, -4.0, 4.0]
    got = controlled_logits(row, params, history)
    assert got[[1, 2, 3]].tolist() == [2.0, -8.0, 4.0] and row[1] == 4.0  # a copy


# ---- logprobs --------------------------------------------------------------------------------------------


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - row.max() - np.log(np.exp(row - row.max()).sum())


@pytest.mark.parametrize("top", [0, 1, 5, 20])
def test_logprobs_are_the_log_softmax_of_the_raw_row(top: int) -> None:
    # The bias changes which tokens come out, never their logprobs: those are of the raw row.
    sink = generate(PROMPT, top_logprobs=top, logit_bias=((11, 3.0),), temperature=0.8, seed=4)
    history = list(PROMPT)
    for token, lp in zip(sink.tokens[0], sink.logprobs[0], strict=True):
        assert lp is not None
        expected = _log_softmax(row_for(history))
        assert lp.logprob == pytest.approx(expected[token], abs=1e-5)
        assert len(lp.top_ids) == len(lp.top_logprobs) == top
        assert list(lp.top_ids) == [int(i) for i in np.argsort(-expected, kind="stable")[:top]]
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        np.testing.assert_allclose(lp.top_logprobs, expected[list(lp.top_ids)], atol=1e-5)
        history.append(token)


def test_top_logprobs_ties_go_by_id() -> None:
    row = np.zeros(VOCAB, dtype=np.float32)
    row[[9, 4, 30]] = 1.0
    lp = token_logprob(row, 30, 4)
    assert lp.top_ids[:3] == (4, 9, 30) and lp.top_ids[3] == 0


# ---- stop ids --------------------------------------------------------------------------------------------


def test_a_stop_token_id_ends_with_stop_and_is_not_emitted() -> None:
    plain = greedy_reference(PROMPT, 12)
    cut = next(i for i in range(1, 12) if plain[i] not in plain[:i])
    sink = generate(PROMPT, stop_token_ids=frozenset({plain[cut], VOCAB - 1 if plain[cut] != VOCAB - 1 else 1}))
    assert sink.tokens.get(0, []) == plain[:cut] and sink.finishes == [(0, "stop", True)]


# ---- grammar ---------------------------------------------------------------------------------------------


class EvenTokens:
    """A fake grammar: only even ids (EOS allowed once `length` tokens are in), complete after `length` tokens."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.consumed: list[int] = []

    def apply(self, logits: np.ndarray) -> None:
        logits[1::2] = -np.inf
        if len(self.consumed) < self.length:
            logits[EOS] = -np.inf

    def advance(self, token_id: int) -> None:
        if token_id % 2:
            raise ValueError(f"token {token_id} is not allowed")
        self.consumed.append(token_id)

    def is_finished(self) -> bool:
        return len(self.consumed) >= self.length


class EvenCompiler:
    def __init__(self) -> None:
        self.made: list[EvenTokens] = []
        self.texts: list[str] = []

    def constraint(self, grammar: str) -> EvenTokens:
        if grammar == "bad":
            raise ValueError("invalid JSON schema: nope")
        self.texts.append(grammar)
        self.made.append(EvenTokens(int(grammar)))
        return self.made[-1]


def test_a_grammar_restricts_tokens_and_ends_with_stop_when_complete() -> None:
    compiler = EvenCompiler()
    built: list[int] = []

    def factory() -> EvenCompiler:
        built.append(1)
        return compiler

    engine, _ = make(grammar=factory)
    assert generate(PROMPT, engine=engine).tokens[0] == greedy_reference(PROMPT, 12)
    assert built == [], "the compiler was built without a constrained request"
    sink = generate(PROMPT, engine=engine, grammar="5", temperature=1.0, seed=3)
    assert len(sink.tokens[0]) == 5 and all(t % 2 == 0 for t in sink.tokens[0])
    assert sink.finishes == [(0, "stop", True)] and compiler.made[0].consumed == sink.tokens[0]
    # max_tokens first: "length"
    sink = generate(PROMPT, engine=engine, grammar="50", max_tokens=6)
    assert len(sink.tokens[0]) == 6 and all(t % 2 == 0 for t in sink.tokens[0]) and sink.reason() == "length"
    assert built == [1]
    with pytest.raises(RequestRejected, match="invalid JSON schema: nope"):
        submit(engine, PROMPT, grammar="bad")
    # Each choice has its own grammar state.
    sink = generate(PROMPT, n=3, engine=engine, grammar="4", temperature=1.0, seed=5)
    assert sorted(i for i, _, _ in sink.finishes) == [0, 1, 2] and len(compiler.made) == 5
    assert [len(sink.tokens[i]) for i in range(3)] == [4, 4, 4]


def test_a_grammar_without_a_compiler_is_refused() -> None:
    engine, _ = make()
    with pytest.raises(RequestRejected, match="grammar"):
        submit(engine, PROMPT, grammar="{}")


# ---- n choices ---------------------------------------------------------------------------------------------


def test_n_choices_share_one_prefill_and_finish_independently() -> None:
    engine, runner = make()
    prompt = [int(t) for t in np.random.default_rng(1).integers(1, VOCAB, 20)]
    sink = submit(engine, prompt, n=3, temperature=1.0, seed=11, max_tokens=10)
    run(engine)
    assert engine.stats.prefill_tokens == len(prompt) and engine.stats.forks == 2
    assert [c for c in runner.calls if c[2] > 1] == [runner.calls[0]]  # one prefill call, then decode steps
    assert sorted(i for i, _, _ in sink.finishes) == [0, 1, 2]
    assert [last for _, _, last in sink.finishes] == [False, False, True] and sink.error is None
    assert len({tuple(sink.tokens[i]) for i in range(3)}) == 3, "choices sampled the same tokens"
    # Each choice is the reference sampling of its own RNG over the prompt's history (a wrong KV copy shows).
    for i in range(3):
        rng = np.random.default_rng(11 if i == 0 else [11, i])
        history, expected = list(prompt), []
        for _ in range(10):
            token = Sampler.sample(row_for(history), EngineSampling(max_tokens=10, temperature=1.0), rng)
            expected.append(token)
            history.append(token)
        assert sink.tokens[i] == expected


def test_seeded_choice_0_equals_the_lone_answer() -> None:
    lone = generate(PROMPT, temperature=1.0, top_p=0.9, seed=42)
    pair = generate(PROMPT, n=2, temperature=1.0, top_p=0.9, seed=42)
    assert pair.tokens[0] == lone.tokens[0] and pair.tokens[1] != lone.tokens[0]


def test_choices_without_room_compute_their_prompt_later_with_the_same_result() -> None:
    roomy = generate(PROMPT, n=4, temperature=1.0, seed=8)
    engine, _ = make(max_running=2)
    tight = generate(PROMPT, n=4, engine=engine, temperature=1.0, seed=8)
    assert engine.stats.forks == 1 and engine.stats.prefill_tokens > len(PROMPT)
    assert tight.tokens == roomy.tokens and sorted(i for i, _, _ in tight.finishes) == [0, 1, 2, 3]


def test_cancelling_a_request_cancels_all_its_choices() -> None:
    engine, _ = make()
    sink = submit(engine, PROMPT, n=3, temperature=1.0, max_tokens=100)
    other = submit(engine, PROMPT, max_tokens=20)
    for _ in range(3):
        engine.step()
    sink.cancel = True
    engine.step()
    assert sorted((i, r) for i, r, _ in sink.finishes) == [(0, "cancelled"), (1, "cancelled"), (2, "cancelled")]
    assert [s.group.sink for s in engine.scheduler.running] == [other]
    run(engine)
    assert other.finishes == [(0, "length", True)]


def test_cancelled_before_the_prompt_is_computed_ends_every_choice() -> None:
    engine, _ = make()
    sink = submit(engine, PROMPT, n=2)
    sink.cancel = True
    run(engine)
    assert sorted((i, r, last) for i, r, last in sink.finishes) == [(0, "cancelled", False), (1, "cancelled", True)]


def test_a_fault_in_one_choice_fails_the_request_once_and_stops_the_others() -> None:
    engine, _ = make()
    sink = submit(engine, PROMPT, n=3, temperature=1.0, max_tokens=50)
    engine.step()
    victim = engine.scheduler.running[1]
    engine.scheduler._contain([victim], "test", RuntimeError("boom"))
    run(engine)
    assert sink.error == "generation failed: boom" and sink.finishes == []
    assert not engine.has_work() and engine.scheduler.budget.used == sum(
        e.blocks for e in engine.scheduler.prefix_cache.values()
    )


def test_n_is_bounded() -> None:
    engine, _ = make(max_choices=3)
    with pytest.raises(RequestRejected, match=r"n must be in \[1, 3\]"):
        submit(engine, PROMPT, n=4)


# ---- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": float("nan")}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \(0, 2\]"),
        ({"logit_bias": ((VOCAB, 1.0),)}, r"logit_bias token id 64 is outside \[0, 64\)"),
        ({"logit_bias": ((3, 101.0),)}, r"logit_bias values must be in \[-100, 100\]"),
        ({"logit_bias": tuple((i % VOCAB, 1.0) for i in range(301))}, "at most 300"),
        ({"top_logprobs": 21}, r"top_logprobs must be in \[0, 20\]"),
        ({"stop_token_ids": frozenset({-1})}, r"stop_token_ids has ids outside \[0, 64\)"),
    ],
)
def test_invalid_controls_are_rejected(sampling: dict[str, object], message: str) -> None:
    engine, _ = make()
    with pytest.raises(RequestRejected, match=message):
        submit(engine, PROMPT, 1, **sampling)


# ---- speculative decoding ----------------------------------------------------------------------------------


def test_speculation_runs_only_for_plain_greedy_rows() -> None:
    config = EngineConfig(max_running=4, kv_budget_tokens=4096, prefill_chunk=32, speculative_k=3)

    def pool() -> KVPool:
        return KVPool(1, 1, 16, 2 * config.max_running + config.max_cached, METADATA.context_length)

    engine = Engine(HistoryRunner(pool()), config, HistoryRunner(pool()))  # type: ignore[arg-type]
    plain = generate(PROMPT, engine=engine)
    assert engine.stats.spec_rounds > 0 and plain.tokens[0] == greedy_reference(PROMPT, 12)
    rounds = engine.stats.spec_rounds
    for controls in ({"top_logprobs": 2}, {"logit_bias": ((1, 0.5),)}, {"presence_penalty": 0.1}):
        generate(PROMPT, engine=engine, **controls)
        assert engine.stats.spec_rounds == rounds, controls


# ---- seeds on a real (tiny) graph ----------------------------------------------------------------------------


def _tiny_engine(config: EngineConfig) -> Engine:
    import onnxruntime as ort

    from llmesh.model_artifact import ModelMetadata
    from tests.unit.test_graph import CFG, _random_gguf_layout
    from triton_models.engine import ModelRunner
    from triton_models.graph import build_graph

    model = build_graph(_random_gguf_layout(np.random.default_rng(3)), CFG.context_length, pad_single_row=False)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata(
        variant="tiny",
        context_length=CFG.context_length,
        vocab_size=CFG.vocab_size,
        num_layers=CFG.n_layers,
        num_kv_heads=CFG.n_kv_heads,
        head_dim=CFG.head_dim,
        eos_token_ids=(0,),
        bos_token=None,
        eos_token=None,
        chat_template=None,
        ort_threads=1,
    )
    slots = 2 * config.max_running + config.max_cached
    pool = KVPool(CFG.n_layers, CFG.n_kv_heads, CFG.head_dim, slots, CFG.context_length)
    return Engine(ModelRunner(session, metadata, pool), config)


def test_a_seeded_request_gives_the_same_tokens_alone_and_beside_others() -> None:
    engine = _tiny_engine(EngineConfig(max_running=8, kv_budget_tokens=2048, prefill_chunk=64))
    rng = np.random.default_rng(0)
    request = GenerationRequest(
        [7, 3, 22, 41, 5], EngineSampling(max_tokens=20, temperature=12.0, top_p=0.95, seed=1234, top_logprobs=3)
    )
    [alone] = engine.generate([request])
    others = [
        GenerationRequest(
            [int(t) for t in rng.integers(1, 96, int(rng.integers(2, 12)))],
            EngineSampling(max_tokens=int(rng.integers(5, 30)), temperature=float(rng.uniform(5.0, 15.0))),
        )
        for _ in range(3)
    ]
    beside = engine.generate([others[0], request, *others[1:]])[1]
    assert len(set(alone.token_ids)) > 5, "the tiny model is too sure of itself for this check"
    assert (beside.token_ids, beside.finish_reason) == (alone.token_ids, alone.finish_reason)
    for a, b in zip(alone.logprobs, beside.logprobs, strict=True):
        assert a.top_ids == b.top_ids and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # The seed matters: another one gives other tokens.
    [reseeded] = engine.generate(
        [GenerationRequest(request.prompt_ids, EngineSampling(max_tokens=20, temperature=12.0, top_p=0.95, seed=99))]
    )
    assert reseeded.token_ids != alone.token_ids
    engine.close()
