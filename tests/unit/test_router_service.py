"""Router core with fake tokenizers and fake replicas: text assembly, stops, context checks, failover, and one
preparation per request (Prepare's route and ids are what Generate streams, after checks)."""

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from llmesh.errors import InvalidRequest, PermissionDenied, Unavailable
from llmesh.types import (
    ChatMessage,
    GenerateEvent,
    OutputSpec,
    PreparedPrompt,
    ResponseFormat,
    RouteInfo,
    RouteKind,
    SamplingParams,
    Tier,
    ToolCall,
    ToolChoice,
    ToolSpec,
)
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

    supports_tools = False
    added_tokens: frozenset[str] = frozenset()

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        self.templated += 1
        return " ".join(m["content"] for m in messages)

    def encode(self, text: str) -> list[int]:
        self.encoded += 1
        return [self._word_id] * len(text.split())

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.WORDS[i] for i in ids if not (skip_special_tokens and i == 0))

    def token_bytes(self, token_id: int) -> bytes:
        return self.WORDS[token_id].encode()


class ScriptedReplica:
    """Streams `chunks`; `fail_after` = raise Unavailable after that many chunks."""

    def __init__(self, name: str, chunks: list[TokenChunk], fail_after: int | None = None) -> None:
        self._name = name
        self.chunks = chunks
        self.fail_after = fail_after
        self.calls: list[tuple[str, list[int]]] = []
        self.grammars: list[str] = []
        self.closed_early = False
        self.is_ready = True

    @property
    def name(self) -> str:
        return self._name

    async def ready(self, variant: str) -> bool:
        return self.is_ready

    async def stream(
        self,
        variant: str,
        request_id: str,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        tier: Tier,
        grammar: str = "",
    ) -> AsyncIterator[TokenChunk]:
        self.calls.append((variant, list(input_ids)))
        self.grammars.append(grammar)
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
        async def stream(self, variant, request_id, input_ids, sampling, tier, grammar=""):  # type: ignore[no-untyped-def]
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
        async def stream(self, variant, request_id, input_ids, sampling, tier, grammar=""):  # type: ignore[no-untyped-def]
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
        async def stream(self, variant, request_id, input_ids, sampling, tier, grammar=""):  # type: ignore[no-untyped-def]
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


# --- tools, constraints, logprobs, n, raw prompts -----------------------------------------------------------------


class PieceTokenizer:
    """Token i is PIECES[i] (pieces are added as tests use them); a template that renders tools as a list of names."""

    supports_tools = True
    added_tokens = frozenset({"<tool_call>", "</tool_call>"})

    def __init__(self, context_length: int = 256) -> None:
        self.pieces: list[str] = ["<eos>"]
        self._context_length = context_length
        self.rendered: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = []
        self.raw: list[str] = []

    def ids(self, *pieces: str) -> tuple[int, ...]:
        for piece in pieces:
            if piece not in self.pieces:
                self.pieces.append(piece)
        return tuple(self.pieces.index(p) for p in pieces)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return 1000

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        self.rendered.append(([dict(m) for m in messages], [dict(t) for t in tools] if tools is not None else None))
        return list(self.ids(*(m["content"] or "-" for m in messages)))

    def encode(self, text: str) -> list[int]:
        self.raw.append(text)
        return list(self.ids(*text.split()))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id].encode() if token_id < len(self.pieces) else b""


WEATHER = ToolSpec("get_weather", "weather", '{"type": "object", "properties": {"city": {"type": "string"}}}')
TOOLS = OutputSpec(tools=(WEATHER,))


def piece_router(*replicas: ScriptedReplica, small_tools: bool = True) -> tuple[Router, PieceTokenizer, WordTokenizer]:
    """Variants small (WordTokenizer: no tool format) and large (PieceTokenizer: tools); large is the default."""
    pieces, words = PieceTokenizer(), WordTokenizer(context_length=256)
    specs = {"small": Variant("small", "test", words), "large": Variant("large", "test", pieces)}
    tiers = {tier: TierPolicy(default="large") for tier in Tier}
    policy = RoutingPolicy(("small", "large"), tiers, complexity_up=2.0, complexity_down=-1.0)
    return Router(specs, policy, ReplicaPool(ReplicaState(r) for r in replicas)), pieces, words


def collect(
    router: Router,
    sampling: SamplingParams,
    output: OutputSpec | None = None,
    model: str = "auto",
    messages: Sequence[ChatMessage] = (ChatMessage("user", "weather?"),),
    prompt: str = "",
) -> list[GenerateEvent]:
    async def go() -> list[GenerateEvent]:
        stream = router.generate("r1", Tier.PAID, model, messages, sampling, output=output, prompt=prompt)
        return [e async for e in stream]

    return asyncio.run(go())


def chunks(ids: Sequence[int], finish: str = "stop", index: int = 0) -> list[TokenChunk]:
    out = [TokenChunk((i,), index=index) for i in ids]
    return [*out[:-1], TokenChunk(out[-1].token_ids, finish, index)]


CALL_PIECES = (
    "<tool_call>",
    "\n{",
    '"name": "get_',
    'weather", "arg',
    'uments": {"city": "Pa',
    'ris"}}\n',
    "</tool_call>",
)


def test_tool_calls_are_rendered_parsed_across_chunks_and_finish_as_tool_calls() -> None:
    replica = ScriptedReplica("a", [])
    router, pieces, _ = piece_router(replica)
    call = CALL_PIECES
    replica.chunks = chunks(pieces.ids("Let me check.", "\n", *call, "\n"))
    history = [
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", "", (ToolCall("call_0", "get_weather", '{"city": "Oslo"}'),)),
        ChatMessage("tool", "rainy", tool_call_id="call_0"),
    ]
    events = collect(router, SamplingParams(max_tokens=50), TOOLS, messages=history)
    rendered_messages, rendered_tools = pieces.rendered[-1]
    assert rendered_tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    assert rendered_messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert "".join(e.delta for e in events) == "Let me check."
    calls = [c for e in events for c in e.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}')]
    assert events[-1].finish_reason == "tool_calls"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == len(replica.chunks)
    assert replica.grammars == [""]  # auto: not constrained


def test_without_a_call_the_answer_is_text_and_finishes_as_stop() -> None:
    replica = ScriptedReplica("a", [])
    router, pieces, _ = piece_router(replica)
    bad = ("<tool_call>", '{"name": "rm_rf", "arguments": {}}', "</tool_call>")
    replica.chunks = chunks(pieces.ids("Hi ", *bad))
    events = collect(router, SamplingParams(max_tokens=50), TOOLS)
    assert "".join(e.delta for e in events) == "Hi " + "".join(bad)
    assert not any(e.tool_calls for e in events) and events[-1].finish_reason == "stop"


def test_tool_choice_none_renders_no_tools_and_parses_none() -> None:
    replica = ScriptedReplica("a", [])
    router, pieces, _ = piece_router(replica)
    call = CALL_PIECES
    replica.chunks = chunks(pieces.ids(*call))
    events = collect(router, SamplingParams(max_tokens=50), OutputSpec(tools=(WEATHER,), tool_choice=ToolChoice.NONE))
    assert pieces.rendered[-1][1] is None
    assert "".join(e.delta for e in events) == "".join(call) and events[-1].finish_reason == "stop"


def test_required_tools_and_json_formats_send_their_grammar() -> None:
    replica = ScriptedReplica("a", [])
    router, pieces, _ = piece_router(replica)
    replica.chunks = chunks(pieces.ids("{}"))
    collect(router, SamplingParams(max_tokens=50), OutputSpec(tools=(WEATHER,), tool_choice=ToolChoice.REQUIRED))
    collect(router, SamplingParams(max_tokens=50), OutputSpec(response_format=ResponseFormat.JSON_OBJECT))
    required, json_object = (json.loads(g) for g in replica.grammars)
    assert "<tool_call>" in required["lark"] and "get_weather" in required["lark"]
    assert json_object == {"json_object": True}


def test_tools_on_a_variant_without_a_tool_format_are_invalid_and_name_it() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, _, _ = piece_router(replica)
    with pytest.raises(InvalidRequest, match=r"model small does not support tools; .*\(large\)"):
        collect(router, SamplingParams(max_tokens=8), TOOLS, model="small")
    tool_turn = [ChatMessage("user", "q"), ChatMessage("tool", "42", tool_call_id="c")]
    with pytest.raises(InvalidRequest, match="model small does not support tools"):
        collect(router, SamplingParams(max_tokens=8), messages=tool_turn, model="small")
    # tool_choice "none" renders no tools: any variant will do.
    events = collect(router, SamplingParams(max_tokens=8), OutputSpec(tools=(WEATHER,), tool_choice=ToolChoice.NONE),
                     model="small")  # fmt: skip
    assert events[-1].finish_reason == "stop"
    assert replica.calls and replica.calls[-1][0] == "small"


def test_auto_with_tools_moves_to_the_nearest_variant_with_a_tool_format() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, pieces, _ = piece_router(replica)
    router._policy = RoutingPolicy(
        ("small", "large"),
        {tier: TierPolicy(default="small") for tier in Tier},
        complexity_up=2.0,
        complexity_down=-1.0,
    )
    prepared = router.prepare(Tier.PAID, "auto", MESSAGES, SamplingParams(max_tokens=8), TOOLS)
    assert prepared.route.variant == "large"
    assert prepared.route.reason.endswith("tools: small has no tool-call format -> large")
    assert pieces.rendered[-1][1] is not None  # rendered with the tools
    # Without tools the tier default serves.
    assert router.prepare(Tier.PAID, "auto", MESSAGES, SamplingParams(max_tokens=8)).route.variant == "small"
    # A tier whose ladder has no such variant is refused, naming the variant.
    router._policy = RoutingPolicy(
        ("small", "large"), {tier: TierPolicy(default="small", allowed=("small",)) for tier in Tier},
        complexity_down=-1.0,
    )  # fmt: skip
    with pytest.raises(InvalidRequest, match="model small does not support tools"):
        router.prepare(Tier.FREE, "auto", MESSAGES, SamplingParams(max_tokens=8), TOOLS)


def test_a_fallback_without_the_tool_format_is_skipped() -> None:
    class LargeDown(ScriptedReplica):
        async def stream(self, variant, request_id, input_ids, sampling, tier, grammar=""):  # type: ignore[no-untyped-def]
            self.calls.append((variant, list(input_ids)))
            raise Unavailable("large pool gone")
            yield  # pragma: no cover

    router, _, _ = piece_router(LargeDown("a", ANSWER))
    with pytest.raises(Unavailable, match="fallback small skipped: model small does not support tools"):
        collect(router, SamplingParams(max_tokens=8), TOOLS)


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (SamplingParams(max_tokens=8, logit_bias=((3, 1.0), (1000, -100.0))), "logit_bias names token id 1000"),
        (SamplingParams(max_tokens=8, logit_bias=((-1, 1.0),)), "logit_bias names token id -1"),
        (SamplingParams(max_tokens=8, stop_token_ids=(5000,)), "stop_token_ids names token id 5000"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_invalid(sampling: SamplingParams, message: str) -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, _, _ = piece_router(replica)
    with pytest.raises(InvalidRequest, match=message + ", outside large's vocabulary of 1000 tokens"):
        router.prepare(Tier.PAID, "auto", MESSAGES, sampling)
    with pytest.raises(InvalidRequest, match=message):
        collect(router, sampling)
    assert replica.calls == []


def test_n_choices_are_multiplexed_each_with_its_stop_and_finish() -> None:
    replica = ScriptedReplica("a", [])
    router, pieces, _ = piece_router(replica)
    a, b, stop, c = pieces.ids("a", "b", "STOP", "c")
    replica.chunks = [
        TokenChunk((a,), index=0),
        TokenChunk((b,), index=1),
        TokenChunk((stop,), index=1),  # choice 1 hits its stop string ...
        TokenChunk((c,), index=1),  # ... and ignores what it is still sent
        TokenChunk((b,), index=0),
        TokenChunk((), "length", index=1),
        TokenChunk((), "length", index=0),
    ]
    events = collect(router, SamplingParams(max_tokens=2, n=2, stop=("STOP",)))
    text = {i: "".join(e.delta for e in events if e.index == i) for i in (0, 1)}
    assert text == {0: "ab", 1: "b"}
    finishes = [(e.index, e.finish_reason) for e in events if e.finish_reason]
    assert finishes == [(1, "stop"), (0, "length")]
    assert [e.usage is not None for e in events if e.finish_reason] == [False, True]
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 4  # a, b | b, STOP


def test_n_choices_that_do_not_all_finish_are_unavailable() -> None:
    replica = ScriptedReplica("a", [])
    router, pieces, _ = piece_router(replica)
    (a,) = pieces.ids("a")
    replica.chunks = [TokenChunk((a,), index=0), TokenChunk((), "stop", index=0), TokenChunk((a,), index=1)]
    with pytest.raises(Unavailable, match="ended the generation early"):
        collect(router, SamplingParams(max_tokens=2, n=2))


def test_logprobs_follow_the_text_and_withheld_tokens_have_none() -> None:
    replica = ScriptedReplica("a", [])
    router, pieces, _ = piece_router(replica)
    ids = pieces.ids("Hi", " there", " ST", "OP", " more")
    replica.chunks = [
        TokenChunk((i,), logprobs=(-0.5 * k,), top_ids=((i, 0),), top_logprobs=((-0.5 * k, -9.0),))
        for k, i in enumerate(ids)
    ]
    events = collect(router, SamplingParams(max_tokens=8, stop=(" STOP",), logprobs=True, top_logprobs=2))
    shown = [lp for e in events for lp in e.logprobs]
    assert "".join(e.delta for e in events) == "Hi there"
    assert [(lp.token, lp.bytes, lp.logprob) for lp in shown] == [("Hi", b"Hi", 0.0), (" there", b" there", -0.5)]
    assert [(t.token, t.logprob) for t in shown[1].top_logprobs] == [(" there", -0.5), ("<eos>", -9.0)]
    # Each delta carries exactly the tokens whose text it shows.
    for event in events:
        if event.delta:
            assert "".join(lp.token for lp in event.logprobs) == event.delta


def test_tokens_inside_a_tool_call_have_no_logprobs() -> None:
    replica = ScriptedReplica("a", [])
    router, pieces, _ = piece_router(replica)
    call = CALL_PIECES
    ids = pieces.ids("Sure.", *call)
    replica.chunks = [TokenChunk((i,), logprobs=(-1.0,)) for i in ids[:-1]] + [
        TokenChunk((ids[-1],), "stop", logprobs=(-1.0,))
    ]
    events = collect(router, SamplingParams(max_tokens=50, logprobs=True), TOOLS)
    assert [lp.token for e in events for lp in e.logprobs] == ["Sure."]
    assert events[-1].finish_reason == "tool_calls"


def test_a_raw_prompt_is_tokenized_as_it_is_and_scored_as_a_user_message() -> None:
    replica = ScriptedReplica("a", ANSWER)
    router, pieces, _ = piece_router(replica)
    prepared = router.prepare(Tier.PAID, "auto", [], SamplingParams(max_tokens=8), prompt="def fib ( n ) :")
    assert pieces.raw == ["def fib ( n ) :"] and pieces.rendered == []
    assert prepared.input_ids == pieces.ids("def", "fib", "(", "n", ")", ":")
    assert prepared.route.reason.startswith("tier paid default large; complexity ")
    with pytest.raises(InvalidRequest, match="tools need messages"):
        router.prepare(Tier.PAID, "auto", [], SamplingParams(max_tokens=8), TOOLS, prompt="x")
    with pytest.raises(InvalidRequest, match="at least one message"):
        router.prepare(Tier.PAID, "auto", [], SamplingParams(max_tokens=8))


def test_a_raw_prompt_is_encoded_anew_for_a_fallback_with_another_tokenizer() -> None:
    class LargeDown(ScriptedReplica):
        async def stream(self, variant, request_id, input_ids, sampling, tier, grammar=""):  # type: ignore[no-untyped-def]
            self.calls.append((variant, list(input_ids)))
            if variant == "large":
                raise Unavailable("large pool gone")
            async for chunk in super().stream(variant, request_id, input_ids, sampling, tier):
                yield chunk

    replica = LargeDown("a", ANSWER)
    router, _, words = piece_router(replica)
    events = collect(router, SamplingParams(max_tokens=8), messages=(), prompt="one two three")
    assert "".join(e.delta for e in events) == "Hello there"
    assert replica.calls[-1] == ("small", [5, 5, 5])  # WordTokenizer's encoding of the raw text
    assert words.templated == 0


def test_build_request_sends_only_what_differs_from_the_defaults() -> None:
    from router.triton_client import build_request

    plain = build_request("m", "r", [1, 2], SamplingParams(max_tokens=4))
    assert [t.name for t in plain.inputs] == ["input_ids", "max_tokens", "temperature", "top_p"]
    assert [o.name for o in plain.outputs] == ["token_ids", "finish_reason", "index"]
    sampling = SamplingParams(
        max_tokens=4, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
        logit_bias=((7, -100.0), (9, 5.0)), logprobs=True, top_logprobs=3, n=2, stop_token_ids=(11, 12),
    )  # fmt: skip
    full = build_request("m", "r", [1, 2], sampling, grammar='{"json_object": true}')
    inputs = {t.name: t for t in full.inputs}
    assert list(inputs["logit_bias_ids"].contents.int64_contents) == [7, 9]
    assert list(inputs["logit_bias_values"].contents.fp32_contents) == [-100.0, 5.0]
    assert inputs["logit_bias_ids"].shape == [1, 2] and inputs["stop_token_ids"].shape == [1, 2]
    assert list(inputs["top_logprobs"].contents.int_contents) == [3] and inputs["top_logprobs"].datatype == "INT32"
    assert list(inputs["n"].contents.int_contents) == [2]
    assert inputs["repetition_penalty"].contents.fp32_contents[0] == pytest.approx(1.2)
    assert inputs["presence_penalty"].contents.fp32_contents[0] == 0.5
    assert (
        inputs["grammar"].datatype == "BYTES"
        and inputs["grammar"].contents.bytes_contents[0] == b'{"json_object": true}'
    )
    assert {o.name for o in full.outputs} >= {"logprob", "top_token_ids", "top_logprobs", "index"}
    # logprobs without alternatives: top_logprobs 0 is sent (absent would mean no logprobs).
    only = build_request("m", "r", [1], SamplingParams(max_tokens=4, logprobs=True))
    assert [list(t.contents.int_contents) for t in only.inputs if t.name == "top_logprobs"] == [[0]]


def test_parse_response_reads_index_and_logprob_rows() -> None:
    import numpy as np
    from tritonclient.grpc import service_pb2

    from router.triton_client import parse_response

    response = service_pb2.ModelInferResponse()
    tensors = {
        "token_ids": np.array([5, 6], "<i8"), "index": np.array([2], "<i4"), "logprob": np.array([-0.1, -0.2], "<f4"),
        "top_token_ids": np.array([5, 1, 6, 2], "<i8"), "top_logprobs": np.array([-0.1, -3, -0.2, -4], "<f4"),
    }  # fmt: skip
    for name, values in tensors.items():
        response.outputs.add(name=name)
        response.raw_output_contents.append(values.tobytes())
    response.outputs.add(name="finish_reason")
    response.raw_output_contents.append(b"")
    chunk, final = parse_response(response)
    assert (chunk.token_ids, chunk.index, final) == ((5, 6), 2, False)
    assert chunk.logprobs == pytest.approx((-0.1, -0.2))
    assert chunk.top_ids == ((5, 1), (6, 2)) and chunk.top_logprobs[1] == pytest.approx((-0.2, -4.0))


def _tiny_chat_tokenizer(tokenizer: Any) -> Any:
    from llmesh.model_artifact import ChatTokenizer, ModelMetadata

    metadata = ModelMetadata(
        variant="tiny", context_length=64, vocab_size=tokenizer.get_vocab_size(), num_layers=1, num_kv_heads=1,
        head_dim=1, eos_token_ids=(0,), bos_token=None, eos_token=None, chat_template=None, ort_threads=1,
    )  # fmt: skip
    return ChatTokenizer(tokenizer, metadata)


def test_token_bytes_of_byte_level_bpe_tokens() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # "é" is bytes c3 a9, spelled "Ã©" in GPT-2's byte alphabet; a token may hold half of it ("Ã").
    vocab = {"<eos>": 0, "Ġh": 1, "Ã©": 2, "Ã": 3, "©": 4, "Ċ": 5, "æĹ¥": 6}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    chat = _tiny_chat_tokenizer(tokenizer)
    assert [chat.token_bytes(i) for i in range(1, 7)] == [b" h", b"\xc3\xa9", b"\xc3", b"\xa9", b"\n", "日".encode()]
    assert chat.token_bytes(99) == b""


def test_token_bytes_of_sentencepiece_tokens() -> None:
    from tokenizers import Tokenizer, decoders, models

    vocab = [("<unk>", 0.0), ("▁hello", -1.0), ("<0xE6>", -2.0), ("<0x97>", -2.0), ("world", -1.0)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    chat = _tiny_chat_tokenizer(tokenizer)
    assert [chat.token_bytes(i) for i in range(1, 5)] == [b" hello", b"\xe6", b"\x97", b"world"]
