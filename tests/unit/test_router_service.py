"""Router core with fake tokenizers and fake replicas: text assembly, stops, context checks, failover."""

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from llmesh.errors import InvalidRequest, Unavailable
from llmesh.types import ChatMessage, GenerateEvent, SamplingParams, Tier
from router.policy import RoutingPolicy, TierPolicy
from router.replicas import ReplicaPool, ReplicaState
from router.service import Router, Variant
from router.tokens import TokenChunk


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


class ScriptedReplica:
    """Streams `chunks`; `fail_after` = raise Unavailable after that many chunks."""

    def __init__(self, name: str, chunks: list[TokenChunk], fail_after: int | None = None) -> None:
        self._name = name
        self.chunks = chunks
        self.fail_after = fail_after
        self.calls: list[tuple[str, list[int]]] = []
        self.closed_early = False
        self.is_ready = True

    @property
    def name(self) -> str:
        return self._name

    async def ready(self, variant: str) -> bool:
        return self.is_ready

    async def stream(
        self, variant: str, request_id: str, input_ids: Sequence[int], sampling: SamplingParams, tier: Tier
    ) -> AsyncIterator[TokenChunk]:
        self.calls.append((variant, list(input_ids)))
        sent = 0
        try:
            for chunk in self.chunks:
                if self.fail_after is not None and sent == self.fail_after:
                    raise Unavailable(f"{self._name} died")
                yield chunk
                sent += 1
        finally:
            self.closed_early = sent < len(self.chunks)


ANSWER = [TokenChunk((1,)), TokenChunk((2,)), TokenChunk((0,), "stop")]


def run(router: Router, sampling: SamplingParams, model: str = "auto", tier: Tier = Tier.PAID) -> list[GenerateEvent]:
    async def collect() -> list[GenerateEvent]:
        messages = [ChatMessage("user", "hi there")]
        return [e async for e in router.generate("r1", tier, model, messages, sampling)]

    return asyncio.run(collect())


def make(*replicas: ScriptedReplica, context: int = 16, variants: tuple[str, ...] = ("small",)) -> Router:
    specs = {name: Variant(name, "test", WordTokenizer(context)) for name in variants}
    tiers = {tier: TierPolicy(default=variants[-1]) for tier in Tier}
    pool = ReplicaPool(ReplicaState(r) for r in replicas)
    return Router(specs, RoutingPolicy(variants, tiers, complexity_down=-1.0), pool)


def test_stream_route_deltas_usage() -> None:
    replica = ScriptedReplica("a", ANSWER)
    events = run(make(replica), SamplingParams(max_tokens=8))
    assert events[0].route is not None and events[0].route.variant == "small"
    assert "".join(e.delta for e in events) == "Hello there"
    last = events[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 3)
    assert replica.calls[0][1] == [5, 5]


def test_length_finish() -> None:
    replica = ScriptedReplica("a", [TokenChunk((1,)), TokenChunk((2,), "length")])
    assert run(make(replica), SamplingParams(max_tokens=2))[-1].finish_reason == "length"


def test_stop_string_ends_generation_and_closes_stream() -> None:
    replica = ScriptedReplica("a", [TokenChunk((1,)), TokenChunk((3,)), TokenChunk((4,)), TokenChunk((0,), "stop")])
    events = run(make(replica), SamplingParams(max_tokens=8, stop=(" STOP",)))
    assert "".join(e.delta for e in events) == "Hello"
    assert events[-1].finish_reason == "stop"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 2
    assert replica.closed_early


def test_prompt_plus_max_tokens_over_context() -> None:
    replica = ScriptedReplica("a", ANSWER)
    with pytest.raises(InvalidRequest, match="prompt is 2 tokens and max_tokens is 9"):
        run(make(replica, context=10), SamplingParams(max_tokens=9))
    assert replica.calls == []


def test_failure_before_first_token_retries_on_another_replica_and_ejects() -> None:
    dead, alive = ScriptedReplica("dead", ANSWER, fail_after=0), ScriptedReplica("alive", ANSWER)
    router = make(dead, alive)
    for _ in range(2):
        events = run(router, SamplingParams(max_tokens=8))
        assert "".join(e.delta for e in events) == "Hello there"
    route = next(e.route for e in events if e.route)
    assert len(dead.calls) == 1, "an ejected replica gets no more requests"
    assert len(alive.calls) == 2
    assert route is not None


def test_failure_after_streaming_is_unavailable_not_retried() -> None:
    flaky, other = ScriptedReplica("flaky", ANSWER, fail_after=1), ScriptedReplica("other", ANSWER)
    # Both idle: the pool rotates, so make sure the flaky one goes first by loading the other.
    router = make(flaky, other)
    router._replicas.states[1].outstanding = 1

    async def collect() -> list[GenerateEvent]:
        out = []
        async for e in router.generate("r1", Tier.PAID, "auto", [ChatMessage("user", "hi")], SamplingParams(8)):
            out.append(e)
        return out

    with pytest.raises(Unavailable, match="failed after streaming 1 tokens"):
        asyncio.run(collect())
    assert other.calls == []


def test_all_replicas_down_falls_back_to_smaller_variant_only_when_the_model_is_auto() -> None:
    calls: list[str] = []

    class PerVariant(ScriptedReplica):
        async def stream(self, variant, request_id, input_ids, sampling, tier):  # type: ignore[no-untyped-def]
            calls.append(variant)
            if variant == "large":
                raise Unavailable("large pool gone")
            async for chunk in super().stream(variant, request_id, input_ids, sampling, tier):
                yield chunk

    pool_replica = PerVariant("a", ANSWER)
    router = make(pool_replica, variants=("small", "large"))
    events = run(router, SamplingParams(max_tokens=8))
    route = events[0].route
    assert route is not None and route.variant == "small"
    assert "fallback: large unavailable -> small" in route.reason
    assert calls == ["large", "small"]

    pool_replica.is_ready = True
    router = make(PerVariant("b", ANSWER), variants=("small", "large"))
    with pytest.raises(Unavailable, match="no replica could serve large"):
        run(router, SamplingParams(max_tokens=8), model="large")
