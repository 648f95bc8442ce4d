"""triton_models.engine on the real built model: answers, continuous batching, prefix cache, cancellation,
KV budget and sampling (the scheduler's logic is checked exactly with a fake model in test_scheduler.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmesh.model_artifact import ChatTokenizer
from triton_models.engine import (
    Engine,
    EngineConfig,
    EngineSampling,
    GenerationRequest,
    RequestRejected,
    Sampler,
)

# Runs the built ONNX model.
pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one sentence."


def chat(tokenizer: ChatTokenizer, question: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))


def greedy(engine: Engine, prompt: list[int], max_tokens: int = 24) -> list[int]:
    [result] = engine.generate([GenerationRequest(prompt, EngineSampling(max_tokens=max_tokens))])
    return result.token_ids


@pytest.fixture
def small_engine(model_version_dir: Path) -> Iterator[Engine]:
    """A private engine with a tiny KV budget and prefill chunk (exercises waiting, preemption, chunking)."""
    engine = Engine.from_model_dir(
        model_version_dir, EngineConfig(max_running=8, kv_budget_tokens=512, prefill_chunk=32, max_cached=4)
    )
    yield engine
    engine.close()


@pytest.mark.parametrize("fixture", ["engine", "int8_engine"])
def test_answers_and_stops_on_eos(fixture: str, request: pytest.FixtureRequest, chat_tokenizer: ChatTokenizer) -> None:
    engine: Engine = request.getfixturevalue(fixture)
    [result] = engine.generate([GenerationRequest(chat(chat_tokenizer, QUESTION), EngineSampling(max_tokens=40))])
    assert result.finish_reason == "stop"
    assert "Paris" in chat_tokenizer.decode(result.token_ids)
    assert not set(result.token_ids) & engine.eos_token_ids


def test_max_tokens_gives_length(engine: Engine, chat_tokenizer: ChatTokenizer) -> None:
    [result] = engine.generate([GenerationRequest(chat(chat_tokenizer, "Count to 50."), EngineSampling(max_tokens=5))])
    assert result.finish_reason == "length" and len(result.token_ids) == 5


def test_batched_and_joined_greedy_equals_one_at_a_time(engine: Engine, chat_tokenizer: ChatTokenizer) -> None:
    prompts = [chat(chat_tokenizer, q) for q in (QUESTION, "Write a haiku about the sea.", "Name three colors.")]
    alone = [greedy(engine, p) for p in prompts]
    # Two start together; the third joins while they decode.
    sinks: list[list[int]] = [[], [], []]
    results = [None, None, None]

    class Sink:
        def __init__(self, i: int) -> None:
            self.i = i

        def token(self, t: int, index: int = 0, logprob: object = None) -> None:
            sinks[self.i].append(t)

        def finish(self, reason: str, index: int = 0, last: bool = True) -> None:
            results[self.i] = reason  # type: ignore[call-overload]

        def fail(self, message: str) -> None:
            raise AssertionError(message)

        def cancelled(self) -> bool:
            return False

    for i in (0, 1):
        engine.submit(GenerationRequest(prompts[i], EngineSampling(max_tokens=24)), Sink(i))
    for _ in range(4):
        engine.step()
    assert len(engine.scheduler.running) == 2
    engine.submit(GenerationRequest(prompts[2], EngineSampling(max_tokens=24)), Sink(2))
    while engine.has_work():
        engine.step()
    assert sinks == alone and None not in results


def test_prefix_cache_hit_gives_identical_logits(engine: Engine, chat_tokenizer: ChatTokenizer) -> None:
    system = "You are a careful assistant. " * 12
    first = chat_tokenizer.encode(
        chat_tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
    )
    second = chat_tokenizer.encode(
        chat_tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
        )
    )
    expected = engine.score(second)  # computed from scratch
    greedy(engine, first, 4)  # finishes -> its KV blocks stay in the prefix cache
    hits, saved = engine.stats.prefix_hits, engine.stats.prefill_tokens_saved
    captured: list[np.ndarray] = []
    forward = engine.runner.forward

    def recording(*args):  # type: ignore[no-untyped-def]
        out = forward(*args)
        captured.append(out)
        return out

    engine.runner.forward = recording  # type: ignore[method-assign]
    try:
        greedy(engine, second, 1)
    finally:
        engine.runner.forward = forward  # type: ignore[method-assign]
    assert engine.stats.prefix_hits == hits + 1 and engine.stats.prefill_tokens_saved - saved >= 64
    error = float(np.abs(captured[-1][0] - expected).max())
    print(f"\nprefix-cache hit vs full prefill: max abs logit error {error:.2e}")
    assert error < 1e-3


def test_cancellation_frees_blocks_and_the_other_stream_goes_on(
    small_engine: Engine, chat_tokenizer: ChatTokenizer
) -> None:
    class Sink:
        def __init__(self) -> None:
            self.tokens: list[int] = []
            self.reason = ""
            self.cancel = False

        def token(self, t: int, index: int = 0, logprob: object = None) -> None:
            self.tokens.append(t)

        def finish(self, reason: str, index: int = 0, last: bool = True) -> None:
            self.reason = reason

        def fail(self, message: str) -> None:
            raise AssertionError(message)

        def cancelled(self) -> bool:
            return self.cancel

    prompt = chat(chat_tokenizer, "Count from 1 to 100.")
    a, b = Sink(), Sink()
    small_engine.submit(GenerationRequest(prompt, EngineSampling(max_tokens=30)), a)
    small_engine.submit(GenerationRequest(prompt, EngineSampling(max_tokens=30)), b)
    for _ in range(5):
        small_engine.step()
    blocks_b = next(s.blocks for s in small_engine.scheduler.running if s.sink is b)
    used = small_engine.scheduler.budget.used
    b.cancel = True
    small_engine.step()
    assert b.reason == "cancelled" and small_engine.scheduler.budget.used <= used - blocks_b + 1
    while small_engine.has_work():
        small_engine.step()
    assert a.reason == "length" and len(a.tokens) == 30


def test_kv_budget_with_many_requests_waits_preempts_and_stays_correct(
    small_engine: Engine, engine: Engine, chat_tokenizer: ChatTokenizer
) -> None:
    prompts = [chat(chat_tokenizer, f"Write the number {i} in words.") for i in range(12)]
    expected = [greedy(engine, p, 16) for p in prompts]
    requests = [GenerationRequest(p, EngineSampling(max_tokens=16)) for p in prompts]
    results: list[list[int]] = [[] for _ in prompts]
    for i, r in enumerate(requests):
        small_engine.submit(r, _ListSink(results[i]))
    while small_engine.has_work():
        small_engine.step()
        assert small_engine.scheduler.budget.used <= small_engine.scheduler.budget.total
    assert results == expected


class _ListSink:
    def __init__(self, out: list[int]) -> None:
        self.out = out

    def token(self, t: int, index: int = 0, logprob: object = None) -> None:
        self.out.append(t)

    def finish(self, reason: str, index: int = 0, last: bool = True) -> None:
        pass

    def fail(self, message: str) -> None:
        raise AssertionError(message)

    def cancelled(self) -> bool:
        return False


def test_seeded_sampling_is_reproducible(engine: Engine, chat_tokenizer: ChatTokenizer) -> None:
    prompt = chat(chat_tokenizer, "Tell me a story.")

    def sample(seed: int) -> list[int]:
        params = EngineSampling(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=seed)
        return engine.generate([GenerationRequest(prompt, params)])[0].token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], EngineSampling(max_tokens=4), "empty"),
        ([1, 2], EngineSampling(max_tokens=0), "max_tokens must be positive"),
        ([1] * 2000, EngineSampling(max_tokens=49), "exceeds the model's context length of 2048"),
        ([1, 99999999], EngineSampling(max_tokens=4), "outside"),
        ([1, 2], EngineSampling(max_tokens=4, temperature=-1), "temperature"),
        ([1, 2], EngineSampling(max_tokens=4, top_p=0.0), "top_p"),
        ([1, 2], EngineSampling(max_tokens=4, top_k=-3), "top_k"),
    ],
)
def test_invalid_requests(engine: Engine, prompt: list[int], params: EngineSampling, message: str) -> None:
    with pytest.raises(RequestRejected, match=message):
        engine.validate(GenerationRequest(prompt, params))


def test_context_limit_is_inclusive(engine: Engine) -> None:
    engine.validate(GenerationRequest([1] * 2000, EngineSampling(max_tokens=48)))


def test_sampler() -> None:
    logits = np.array([0.0, 5.0, 1.0, 4.9], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert Sampler.sample(logits, EngineSampling(max_tokens=1), rng) == 1
    # top_k=1 is greedy whatever the temperature; top_p tiny keeps only the best token.
    assert {Sampler.sample(logits, EngineSampling(max_tokens=1, temperature=5.0, top_k=1), rng) for _ in range(20)} == {
        1
    }
    assert {
        Sampler.sample(logits, EngineSampling(max_tokens=1, temperature=5.0, top_p=0.01), rng) for _ in range(20)
    } == {1}
    # top_k=2 never leaves the two best.
    assert {
        Sampler.sample(logits, EngineSampling(max_tokens=1, temperature=50.0, top_k=2), rng) for _ in range(50)
    } <= {1, 3}


def _nucleus_by_full_sort(logits: np.ndarray, params: EngineSampling, u: float) -> int:
    """The nucleus the plain way: sort the whole vocabulary (what Sampler avoids for large vocabularies)."""
    probs = np.exp(logits.astype(np.float64) / params.temperature - logits.max() / params.temperature)
    probs /= probs.sum()
    order = np.lexsort((np.arange(probs.size), -probs))
    probs = probs[order]
    keep = min(int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1, probs.size)
    probs = probs[:keep] / probs[:keep].sum()
    return int(order[min(int(np.searchsorted(np.cumsum(probs), u)), probs.size - 1)])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_on_a_large_vocabulary_matches_a_full_sort(top_p: float) -> None:
    rng = np.random.default_rng(1)
    for trial in range(20):
        # Peaked and flat distributions over a Gemma-sized vocabulary: the nucleus spans 1 to ~100k tokens.
        logits = (rng.standard_normal(262_144) * (8.0 if trial % 2 else 0.5)).astype(np.float32)
        params = EngineSampling(max_tokens=1, temperature=0.7, top_p=top_p)
        expected = _nucleus_by_full_sort(logits, params, np.random.default_rng(trial).random())
        assert Sampler.sample(logits, params, np.random.default_rng(trial)) == expected


def test_speculative_decoding_equals_plain_greedy(
    engine: Engine, chat_tokenizer: ChatTokenizer, model_version_dir: Path
) -> None:
    """The fp32 variant drafts with the int8 one (4 tokens per round); its greedy output must not change."""
    import dataclasses

    assert engine.draft is not None and engine.config.speculative_k > 0
    plain = Engine.from_model_dir(model_version_dir, dataclasses.replace(engine.config, speculative_k=0))
    before = engine.stats.spec_proposed, engine.stats.spec_accepted
    for question in ("Write a short story about a dragon.", "Explain how a steam engine works.", QUESTION):
        prompt = chat(chat_tokenizer, question)
        assert greedy(engine, prompt, 48) == greedy(plain, prompt, 48)
    plain.close()
    proposed, accepted = engine.stats.spec_proposed - before[0], engine.stats.spec_accepted - before[1]
    print(f"\nspeculative acceptance {accepted}/{proposed}")
    assert proposed > 0 and accepted / proposed > 0.5


def test_a_json_schema_grammar_shapes_the_answer(small_engine: Engine, chat_tokenizer: ChatTokenizer) -> None:
    import json

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    grammar = json.dumps({"json_schema": schema})
    assert small_engine._grammar is None  # nothing compiled until a request asks for a grammar
    prompt = chat(chat_tokenizer, "What is the capital of France? Answer as JSON.")
    [free, constrained] = small_engine.generate(
        [
            GenerationRequest(prompt, EngineSampling(max_tokens=60)),
            GenerationRequest(prompt, EngineSampling(max_tokens=60, grammar=grammar)),
        ]
    )
    text = chat_tokenizer.decode(constrained.token_ids)
    assert constrained.finish_reason == "stop", text
    value = json.loads(text)
    assert set(value) == {"city", "country"} and all(isinstance(v, str) and len(v) <= 20 for v in value.values())
    assert free.token_ids != constrained.token_ids  # the grammar changed the answer (compact, these two keys)
    with pytest.raises(RequestRejected, match="json_schema must be"):
        small_engine.generate([GenerationRequest(prompt, EngineSampling(max_tokens=5, grammar='{"json_schema": 3}'))])


def test_n_choices_with_logprobs_on_the_model(small_engine: Engine, chat_tokenizer: ChatTokenizer) -> None:
    prompt = chat(chat_tokenizer, "Tell me a story about a cat.")
    sampling = EngineSampling(max_tokens=8, temperature=0.9, seed=3, top_logprobs=2)
    before = small_engine.stats.prefill_tokens
    [pair] = small_engine.generate([GenerationRequest(prompt, sampling, n=2)])
    assert small_engine.stats.prefill_tokens - before == len(prompt)  # the prompt is computed once
    [lone] = small_engine.generate([GenerationRequest(prompt, sampling)])
    assert pair.choices[0].token_ids == lone.token_ids and len(pair.choices) == 2
    for choice in pair.choices:
        assert len(choice.logprobs) == len(choice.token_ids) and all(len(lp.top_ids) == 2 for lp in choice.logprobs)
        assert all(lp.logprob <= 0.0 for lp in choice.logprobs)
    # choice 0's first logprob is the log-softmax of the prompt's raw logits
    raw = small_engine.score(prompt).astype(np.float64)
    log_softmax = raw - raw.max() - np.log(np.exp(raw - raw.max()).sum())
    assert pair.choices[0].logprobs[0].logprob == pytest.approx(log_softmax[pair.choices[0].token_ids[0]], abs=1e-4)
