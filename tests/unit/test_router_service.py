import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from llmesh.errors import InvalidRequest
from llmesh.types import ChatMessage, GenerateEvent, SamplingParams, Tier
from router.policy import RoutingPolicy
from router.service import Router, TokenChunk, Variant


class WordTokenizer:
    """Token i is WORDS[i]; the chat template is just the contents joined."""

    WORDS = ["<eos>", "Hello", " there", " STOP", " friend", "x"]

    def __init__(self, context_length: int = 16) -> None:
        self._context_length = context_length

    @property
    def context_length(self) -> int:
        return self._context_length

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return " ".join(m["content"] for m in messages)

    def encode(self, text: str) -> list[int]:
        return [5] * len(text.split())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.WORDS[i] for i in ids if not (skip_special_tokens and i == 0))


class ScriptedTokens:
    def __init__(self, chunks: list[TokenChunk]) -> None:
        self.chunks = chunks
        self.closed_early = False
        self.calls: list[tuple[str, list[int], SamplingParams]] = []

    async def stream(
        self, variant: str, request_id: str, input_ids: Sequence[int], sampling: SamplingParams
    ) -> AsyncIterator[TokenChunk]:
        self.calls.append((variant, list(input_ids), sampling))
        sent = 0
        try:
            for chunk in self.chunks:
                yield chunk
                sent += 1
        finally:
            self.closed_early = sent < len(self.chunks)


def run(router: Router, sampling: SamplingParams, model: str = "auto") -> list[GenerateEvent]:
    async def collect() -> list[GenerateEvent]:
        messages = [ChatMessage("user", "hi there")]
        return [e async for e in router.generate("r1", Tier.FREE, model, messages, sampling)]

    return asyncio.run(collect())


def make(chunks: list[TokenChunk], context: int = 16) -> tuple[Router, ScriptedTokens]:
    tokens = ScriptedTokens(chunks)
    variants = {"small": Variant("small", "test", WordTokenizer(context))}
    return Router(variants, RoutingPolicy.open_to_all(["small"]), tokens), tokens


def test_stream_route_deltas_usage() -> None:
    router, tokens = make([TokenChunk((1,)), TokenChunk((2,)), TokenChunk((0,), "stop")])
    events = run(router, SamplingParams(max_tokens=8))
    assert events[0].route is not None and events[0].route.variant == "small"
    assert "".join(e.delta for e in events) == "Hello there"
    last = events[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 3)
    assert tokens.calls[0][1] == [5, 5]


def test_length_finish() -> None:
    router, _ = make([TokenChunk((1,)), TokenChunk((2,), "length")])
    assert run(router, SamplingParams(max_tokens=2))[-1].finish_reason == "length"


def test_stop_string_ends_generation_and_closes_stream() -> None:
    router, tokens = make([TokenChunk((1,)), TokenChunk((3,)), TokenChunk((4,)), TokenChunk((0,), "stop")])
    events = run(router, SamplingParams(max_tokens=8, stop=(" STOP",)))
    assert "".join(e.delta for e in events) == "Hello"
    assert events[-1].finish_reason == "stop"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 2
    assert tokens.closed_early


def test_prompt_plus_max_tokens_over_context() -> None:
    router, tokens = make([], context=10)
    with pytest.raises(InvalidRequest, match="prompt is 2 tokens and max_tokens is 9"):
        run(router, SamplingParams(max_tokens=9))
    assert tokens.calls == []
