"""Router core with fake tokenizers and fake replicas: text assembly, stops, context checks, failover, and one
preparation per request (Prepare's route and ids are what Generate streams, after checks)."""

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from llmesh.errors import InvalidRequest, PermissionDenied, Unavailable
from llmesh.types import ChatMessage, GenerateEvent, PreparedPrompt, RouteInfo, RouteKind, SamplingParams, Tier
from router.policy import RoutingPolicy, TierPolicy
from router.replicas import ReplicaPool, ReplicaState
from router.service import Router, Variant
from router.tokens import TokenChunk


class WordTokenizer:
    """Token i is WORDS[i]; the chat template is just the contents joined."""

    WORDS = ["<eos>", "Hello", " there", " STOP", " friend", "x"]

    def __init__(self, context_length: int = 16, word_id: int = 5) -> None:
        self._context_length = context_length
        self._word_id = word_id
        self.templated = 0
        self.encoded = 0

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return len(self.WORDS)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.templated += 1
        return " ".join(m["content"] for m in messages)

    def encode(self, text: str) -> list[int]:
        self.encoded += 1
        return [self._word_id] * len(text.split())

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

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


@pytest.mark.parametrize("reason", ["cancelled", ""])
def test_generation_cut_short_upstream_is_unavailable_not_a_complete_answer(reason: str) -> None:
    # Triton cancelled the request (e.g. it is shutting down), or its stream ended without a final response.
    replica = ScriptedReplica("a", [TokenChunk((1,)), TokenChunk((2,), reason)])
    with pytest.raises(Unavailable, match="ended the generation early after 2 tokens"):
        run(make(replica), SamplingParams(max_tokens=8))


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


def test_fallback_route_says_fallback_and_keeps_the_story() -> None:
    class LargeDown(ScriptedReplica):
        async def stream(self, variant, request_id, input_ids, sampling, tier):  # type: ignore[no-untyped-def]
            if variant == "large":
                raise Unavailable("large pool gone")
            async for chunk in super().stream(variant, request_id, input_ids, sampling, tier):
                yield chunk

    events = run(make(LargeDown("a", ANSWER), variants=("small", "large")), SamplingParams(max_tokens=8))
    route = events[0].route
    assert route is not None and route.kind is RouteKind.FALLBACK
    assert route.reason.startswith("tier paid default large")


# --- one preparation per request ---------------------------------------------------------------------------------

MESSAGES = [ChatMessage("user", "hi there")]


def counting_router(
    *replicas: ScriptedReplica, shared: bool = True, policy_default: str = "small", up: float = 2.0
) -> tuple[Router, dict[str, WordTokenizer]]:
    """Variants small and large; with `shared`, both have the same tokenizer id (tokenize alike)."""
    tokenizers = {"small": WordTokenizer(), "large": WordTokenizer(word_id=4 if not shared else 5)}
    specs = {
        name: Variant(name, "test", tokenizer, tokenizer_id="same" if shared else name)
        for name, tokenizer in tokenizers.items()
    }
    tiers = {tier: TierPolicy(default=policy_default) for tier in Tier}
    policy = RoutingPolicy(("small", "large"), tiers, complexity_up=up, complexity_down=-1.0)
    pool = ReplicaPool(ReplicaState(r) for r in replicas)
    return Router(specs, policy, pool), tokenizers


def work(tokenizers: dict[str, WordTokenizer]) -> dict[str, tuple[int, int]]:
    return {name: (t.templated, t.encoded) for name, t in tokenizers.items()}


def prepare_then_generate(router: Router, model: str = "auto") -> tuple[PreparedPrompt, list[GenerateEvent]]:
    """What the gateway does on a cache miss: Prepare, then Generate with Prepare's answer."""
    sampling = SamplingParams(max_tokens=8)
    prepared = router.prepare(Tier.PAID, model, MESSAGES, sampling)

    async def collect() -> list[GenerateEvent]:
        return [e async for e in router.generate("r1", Tier.PAID, model, MESSAGES, sampling, prepared)]

    return prepared, asyncio.run(collect())


def test_auto_request_is_templated_and_tokenized_once_and_generate_streams_the_given_ids() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, tokenizers = counting_router(replica)
    prepared, events = prepare_then_generate(router)
    assert (prepared.route.variant, prepared.route.kind) == ("small", RouteKind.TIER_DEFAULT)
    assert prepared.route.reason.startswith("tier paid default small; complexity ")
    assert work(tokenizers) == {"small": (1, 1), "large": (0, 0)}, "the probe's ids are the prompt's"
    assert replica.calls == [("small", list(prepared.input_ids))]
    assert events[-1].usage is not None and events[-1].usage.prompt_tokens == len(prepared.input_ids)


def test_probe_ids_are_reused_when_complexity_moves_to_a_variant_that_tokenizes_alike() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, tokenizers = counting_router(replica, up=0.0)  # every request counts as complex: small -> large
    prepared, _ = prepare_then_generate(router)
    assert (prepared.route.variant, prepared.route.kind) == ("large", RouteKind.COMPLEXITY_UP)
    assert work(tokenizers) == {"small": (1, 1), "large": (0, 0)}
    assert replica.calls == [("large", [5, 5])]


def test_probe_and_chosen_variant_with_different_tokenizers_prepare_twice_at_most() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, tokenizers = counting_router(replica, shared=False, up=0.0)
    prepared, _ = prepare_then_generate(router)
    assert prepared.route.variant == "large" and prepared.input_ids == (4, 4)
    assert work(tokenizers) == {"small": (1, 1), "large": (1, 1)}
    assert replica.calls == [("large", [4, 4])]


def test_pinned_request_is_tokenized_once_by_its_variant() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, tokenizers = counting_router(replica)
    prepared, _ = prepare_then_generate(router, model="large")
    assert prepared.route.kind is RouteKind.PINNED
    assert work(tokenizers) == {"small": (0, 0), "large": (1, 1)}


def test_generate_without_a_prepared_prompt_prepares_itself() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, tokenizers = counting_router(replica)
    run(router, SamplingParams(max_tokens=8))
    assert work(tokenizers) == {"small": (1, 1), "large": (0, 0)}


def test_fallback_reuses_ids_when_the_smaller_variant_tokenizes_alike_else_retokenizes() -> None:
    class LargeDown(ScriptedReplica):
        async def stream(self, variant, request_id, input_ids, sampling, tier):  # type: ignore[no-untyped-def]
            self.calls.append((variant, list(input_ids)))
            if variant == "large":
                raise Unavailable("large pool gone")
            async for chunk in super().stream(variant, request_id, input_ids, sampling, tier):
                yield chunk

    for shared, small_ids, small_work in ((True, [5, 5], (0, 0)), (False, [5, 5], (1, 1))):
        replica = LargeDown("a", ANSWER)
        router, tokenizers = counting_router(replica, shared=shared, policy_default="large")
        prepared, events = prepare_then_generate(router)
        assert events[0].route is not None and events[0].route.kind is RouteKind.FALLBACK
        assert replica.calls[0] == ("large", list(prepared.input_ids))
        assert replica.calls[-1] == ("small", small_ids)
        assert work(tokenizers) == {"large": (1, 1), "small": small_work}


def generate_prepared(router: Router, prepared: PreparedPrompt, model: str = "auto", tier: Tier = Tier.PAID) -> None:
    async def collect() -> list[GenerateEvent]:
        return [e async for e in router.generate("r1", tier, model, MESSAGES, SamplingParams(max_tokens=8), prepared)]

    asyncio.run(collect())


@pytest.mark.parametrize(
    ("prepared", "model", "message"),
    [
        (PreparedPrompt(RouteInfo("small", "", RouteKind.TIER_DEFAULT), (5, 6)), "auto", "token id 6, outside small's"),
        (PreparedPrompt(RouteInfo("small", "", RouteKind.TIER_DEFAULT), (-1,)), "auto", "token id -1"),
        (PreparedPrompt(RouteInfo("small", "", RouteKind.TIER_DEFAULT), (5,) * 9), "auto", "prompt is 9 tokens"),
        (PreparedPrompt(RouteInfo("small", "", RouteKind.TIER_DEFAULT), ()), "auto", "input_ids is empty"),
        (PreparedPrompt(RouteInfo("gpt-9", "", RouteKind.TIER_DEFAULT), (5,)), "auto", "'gpt-9' is not one `auto`"),
        (PreparedPrompt(RouteInfo("small", "", RouteKind.PINNED), (5,)), "large", "does not match the requested"),
        (PreparedPrompt(RouteInfo("small", "", RouteKind.PINNED), (5,)), "auto", "does not match the requested"),
        (PreparedPrompt(RouteInfo("small", "", RouteKind.TIER_DEFAULT), (5,)), "small", "does not match the requested"),
        (PreparedPrompt(RouteInfo("small", "", RouteKind.CACHE_HIT), (5,)), "auto", "not a routing decision"),
    ],
)
def test_a_bad_prepared_prompt_is_invalid_and_never_reaches_a_replica(
    prepared: PreparedPrompt, model: str, message: str
) -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, _ = counting_router(replica)
    with pytest.raises(InvalidRequest, match=message):
        generate_prepared(router, prepared, model)
    assert replica.calls == []


def test_a_prepared_route_the_tier_may_not_use_is_refused() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, _ = counting_router(replica)
    router._policy = RoutingPolicy(  # free may use small only
        ("small", "large"), {Tier.FREE: TierPolicy(allowed=("small",))}, complexity_down=-1.0
    )
    with pytest.raises(InvalidRequest, match="'large' is not one `auto` may choose for the free tier"):
        generate_prepared(router, PreparedPrompt(RouteInfo("large", "", RouteKind.LOAD_SHED), (5,)), tier=Tier.FREE)
    with pytest.raises(PermissionDenied, match="not available to the free tier"):
        generate_prepared(router, PreparedPrompt(RouteInfo("large", "", RouteKind.PINNED), (5,)), "large", Tier.FREE)
    assert replica.calls == []
