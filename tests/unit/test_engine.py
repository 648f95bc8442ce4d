"""triton_models.engine: batching, sampling, stopping and cancellation on the real exported model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from triton_models.engine import (
    GenerationRequest,
    GenerationResult,
    Generator,
    InvalidRequest,
    Sampler,
    SamplingParams,
)
from triton_models.tokenizer import ChatTokenizer

# Runs the built ONNX model.
pytestmark = pytest.mark.slow


def chat(tokenizer: ChatTokenizer, question: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))


class RecordingSession:
    """Wraps the onnxruntime session to record the batch size of every graph call."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.batch_sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        self.batch_sizes.append(int(feeds["input_ids"].shape[0]))
        return self._inner.run(output_names, feeds)


@pytest.fixture
def recording(generator: Generator) -> tuple[Generator, RecordingSession]:
    session = RecordingSession(generator.session)
    return Generator(session, generator.metadata), session  # type: ignore[arg-type]


def test_answers_and_stops_on_eos(generator: Generator, chat_tokenizer: ChatTokenizer) -> None:
    prompt = chat(chat_tokenizer, "What is the capital of France?")
    [result] = generator.generate([GenerationRequest(prompt, SamplingParams(max_tokens=64))])
    assert result.finish_reason == "stop"
    assert "Paris" in chat_tokenizer.decode(result.token_ids)
    assert not set(result.token_ids) & generator.eos_token_ids


def test_max_tokens_gives_length(generator: Generator, chat_tokenizer: ChatTokenizer) -> None:
    prompt = chat(chat_tokenizer, "Write a long story about a dragon.")
    for n in (1, 7):
        [result] = generator.generate([GenerationRequest(prompt, SamplingParams(max_tokens=n))])
        assert (result.finish_reason, len(result.token_ids)) == ("length", n)


def test_batched_greedy_equals_one_at_a_time(generator: Generator, chat_tokenizer: ChatTokenizer) -> None:
    questions = [
        "Hi",
        "What is the capital of France?",
        "Name three animals that live in the ocean and describe each in a sentence.",
        "Why is the sky blue?",
    ]
    requests = [GenerationRequest(chat(chat_tokenizer, q), SamplingParams(max_tokens=24)) for q in questions]
    assert len({len(r.prompt_ids) for r in requests}) == len(requests)  # really ragged: left padding is used
    alone = [generator.generate([r])[0] for r in requests]
    together = generator.generate(requests)
    for a, b in zip(alone, together, strict=True):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)


def test_callbacks_see_every_token_and_one_finish(generator: Generator, chat_tokenizer: ChatTokenizer) -> None:
    requests = [
        GenerationRequest(chat(chat_tokenizer, "What is the capital of France?"), SamplingParams(max_tokens=40)),
        GenerationRequest(chat(chat_tokenizer, "Count from one to fifty."), SamplingParams(max_tokens=5)),
    ]
    streamed: dict[int, list[int]] = {0: [], 1: []}
    finished: list[tuple[int, str | None]] = []

    def on_finish(i: int, result: GenerationResult) -> None:
        finished.append((i, result.finish_reason))

    results = generator.generate(requests, on_token=lambda i, t: streamed[i].append(t), on_finish=on_finish)
    assert [streamed[0], streamed[1]] == [r.token_ids for r in results]
    # The 5-token request finishes first, without waiting for its neighbour.
    assert finished == [(1, "length"), (0, "stop")]


def test_seed_determinism(generator: Generator, chat_tokenizer: ChatTokenizer) -> None:
    prompt = chat(chat_tokenizer, "Tell me a story about a cat.")

    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return generator.generate([GenerationRequest(prompt, params)])[0].token_ids

    assert sample(1234) == sample(1234)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_cancellation_drops_the_row_at_once(
    recording: tuple[Generator, RecordingSession], chat_tokenizer: ChatTokenizer
) -> None:
    generator, session = recording
    prompt = chat(chat_tokenizer, "Write a long story about a dragon.")
    requests = [GenerationRequest(prompt, SamplingParams(max_tokens=10)) for _ in range(3)]
    produced = [0, 0, 0]

    def on_token(i: int, _token: int) -> None:
        produced[i] += 1

    results = generator.generate(requests, on_token=on_token, cancelled=lambda i: i == 1 and produced[1] >= 3)
    assert [r.finish_reason for r in results] == ["length", "cancelled", "length"]
    assert [len(r.token_ids) for r in results] == [10, 3, 10]
    # prefill (3 rows), 2 decode steps with 3 rows, then the cancelled row is gone: 7 steps with 2.
    assert session.batch_sizes == [3, 3, 3] + [2] * 7


def test_cancelled_before_start_runs_nothing(recording: tuple[Generator, RecordingSession]) -> None:
    generator, session = recording
    [result] = generator.generate(
        [GenerationRequest([1, 2, 3], SamplingParams(max_tokens=5))], cancelled=lambda i: True
    )
    assert (result.finish_reason, result.token_ids) == ("cancelled", [])
    assert session.batch_sizes == []


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(max_tokens=4), "input_ids is empty"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens must be positive"),
        ([1] * 2000, SamplingParams(max_tokens=49), "exceeds the model's context length of 2048"),
        ([1, 49152], SamplingParams(max_tokens=4), "outside"),
        ([1, 2], SamplingParams(max_tokens=4, temperature=-1.0), "temperature"),
        ([1, 2], SamplingParams(max_tokens=4, top_p=0.0), "top_p"),
    ],
)
def test_invalid_requests(generator: Generator, prompt: list[int], params: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        generator.generate([GenerationRequest(prompt, params)])


def test_context_limit_is_inclusive(generator: Generator) -> None:
    generator.validate(GenerationRequest([1] * 2040, SamplingParams(max_tokens=8)))  # exactly 2048: accepted


def test_sampler() -> None:
    logits = np.array([0.0, 3.0, 2.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert Sampler.sample(logits, SamplingParams(max_tokens=1), rng) == 1
    # top_p small enough keeps only the most likely token, whatever the temperature.
    assert {Sampler.sample(logits, SamplingParams(1, temperature=5.0, top_p=0.1), rng) for _ in range(50)} == {1}
    # Full distribution at high temperature reaches every token.
    assert {Sampler.sample(logits, SamplingParams(1, temperature=50.0), rng) for _ in range(400)} == {0, 1, 2, 3}
