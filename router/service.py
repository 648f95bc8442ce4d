"""The router's core: choose a variant, render and tokenize the chat, stream tokens from a replica, assemble text.

Failover: a request that has not streamed its first token is retried on another replica, then on a smaller
variant the tier allows; one that already streamed ends with UNAVAILABLE (the gateway refunds unused quota).
No gRPC here; replicas, tokenizers, load tracking and metrics are passed in.

A prompt is a chat (rendered by the variant's chat template, with the request's tools when it offers any) or, for
completions, raw text tokenized as it is. The answer streams per choice (sampling.n): each choice has its own
detokenizer, stop strings and tool-call parser, and ends with its own finish_reason; usage comes last.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmesh.errors import Internal, InvalidRequest, Unavailable
from llmesh.logs import REQUEST_ID
from llmesh.types import (
    ChatMessage,
    GenerateEvent,
    OutputSpec,
    PreparedPrompt,
    RouteInfo,
    RouteKind,
    SamplingParams,
    Tier,
    TokenLogprob,
    ToolChoice,
    TopLogprob,
    Usage,
    VariantInfo,
)
from router.complexity import ComplexityScorer, HeuristicScorer
from router.constraints import check_output, grammar_for
from router.load import LoadTracker
from router.policy import AUTO, RoutingPolicy
from router.replicas import ReplicaPool, ReplicaState
from router.text import IncrementalDetokenizer, StopMatcher
from router.tokens import TokenChunk
from router.tools import Segment, ToolCallParser, check_tools, offers_tools, template_messages, template_tools

log = logging.getLogger(__name__)

__all__ = ["PromptSource", "Router", "RouterObserver", "TokenChunk", "Variant"]


class ChatTokenizerLike(Protocol):
    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def supports_tools(self) -> bool:
        """The chat template renders tools and tool turns in the `<tool_call>` format router.tools parses."""
        ...

    @property
    def added_tokens(self) -> Set[str]:
        """Texts that are one token each (tool-call tags among them, for grammars)."""
        ...

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """The prompt's ids; control tokens come only from the template, never from caller text."""
        ...

    def encode(self, text: str) -> list[int]:
        """Raw text as it is (BOS as the tokenizer adds it)."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (logprobs)."""
        ...


class RouterObserver(Protocol):
    """Where decisions and timings go (Prometheus in production); every method must be cheap and never raise."""

    def routed(self, tier: Tier, route: RouteInfo) -> None: ...

    def failover(self, variant: str, replica: str, kind: str) -> None: ...

    def first_token(self, variant: str, replica: str, seconds: float) -> None: ...


class NullObserver:
    def routed(self, tier: Tier, route: RouteInfo) -> None:
        pass

    def failover(self, variant: str, replica: str, kind: str) -> None:
        pass

    def first_token(self, variant: str, replica: str, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    tokenizer: ChatTokenizerLike
    # Variants with the same non-empty id render and tokenize a chat identically (same tokenizer file, chat
    # template and special tokens), so ids made for one serve the other. Empty: only a shared tokenizer object does.
    tokenizer_id: str = ""

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def tokenizes_like(self, other: Variant) -> bool:
        return self.tokenizer is other.tokenizer or bool(self.tokenizer_id and self.tokenizer_id == other.tokenizer_id)


@dataclass(frozen=True)
class PromptSource:
    """What a prompt is made from: a chat (with the output spec's tools) or a raw completion prompt."""

    messages: tuple[ChatMessage, ...] = ()
    prompt: str = ""
    output: OutputSpec = field(default_factory=OutputSpec)

    @property
    def is_raw(self) -> bool:
        return not self.messages

    @property
    def needs_tools(self) -> bool:
        """Rendering needs a template with a tool format: tools offered, or tool calls and turns in the history."""
        return (not self.is_raw) and (
            offers_tools(self.output) or any(m.tool_calls or m.role == "tool" for m in self.messages)
        )

    def scoring_messages(self) -> Sequence[ChatMessage]:
        """The complexity scorer reads chats; a raw prompt is scored as one user message."""
        return self.messages or (ChatMessage("user", self.prompt),)

    def check(self) -> None:
        if not self.messages and not self.prompt:
            raise InvalidRequest("messages must hold at least one message (or prompt must be set)")
        if self.messages and self.prompt:
            raise InvalidRequest("set messages or prompt, not both")
        if self.is_raw and self.output.tools:
            raise InvalidRequest("tools need messages: a raw prompt has no chat template to render them")
        check_tools(self.output)
        check_output(self.output)


class _Retry(Exception):
    """The replica failed before the first token: try elsewhere."""


class Router:
    def __init__(
        self,
        variants: Mapping[str, Variant],
        policy: RoutingPolicy,
        replicas: ReplicaPool,
        load: LoadTracker | None = None,
        scorer: ComplexityScorer | None = None,
        observer: RouterObserver | None = None,
    ) -> None:
        self._variants = variants
        self._policy = policy
        self._replicas = replicas
        self._load = load or LoadTracker()
        self._scorer = scorer or HeuristicScorer()
        self._observer = observer or NullObserver()

    @property
    def load(self) -> LoadTracker:
        return self._load

    def list_variants(self) -> list[VariantInfo]:
        return [
            VariantInfo(name, self._variants[name].description, self._variants[name].context_length,
                        self._policy.tiers_for(name))
            for name in self._policy.variants
        ]  # fmt: skip

    def context_length(self, variant: str) -> int:
        return self._variants[variant].context_length

    def _tool_variants(self) -> list[str]:
        return [name for name in self._policy.variants if self._variants[name].tokenizer.supports_tools]

    def _check_variant(self, variant: str, source: PromptSource, sampling: SamplingParams) -> None:
        """What the request asks of this variant in particular: a tool format, ids in its vocabulary."""
        tokenizer = self._variants[variant].tokenizer
        if source.needs_tools and not tokenizer.supports_tools:
            able = self._tool_variants()
            hint = f"use one that does ({', '.join(able)})" if able else "no variant here does"
            raise InvalidRequest(
                f"model {variant} does not support tools; its chat template has no tool-call format: {hint}, "
                "or leave tools and tool turns out"
            )
        vocab = tokenizer.vocab_size
        for what, ids in (
            ("logit_bias", [i for i, _ in sampling.logit_bias]),
            ("stop_token_ids", sampling.stop_token_ids),
        ):
            for token_id in ids:
                if not 0 <= token_id < vocab:
                    raise InvalidRequest(
                        f"{what} names token id {token_id}, outside {variant}'s vocabulary of {vocab} tokens"
                    )

    def _encode(self, variant: str, source: PromptSource) -> tuple[int, ...]:
        """Render the chat template (with tools) and tokenize, or tokenize a raw prompt: the one place a prompt
        becomes ids."""
        tokenizer = self._variants[variant].tokenizer
        if source.is_raw:
            return tuple(tokenizer.encode(source.prompt))
        tools = template_tools(source.output.tools) if offers_tools(source.output) else None
        return tuple(tokenizer.encode_chat(template_messages(source.messages), tools=tools))

    def _check_fits(self, variant: str, input_ids: Sequence[int], max_tokens: int) -> None:
        # n choices share the prompt's KV and each may reach max_tokens: the engine checks its KV budget; here each
        # choice must fit the context like a single answer does.
        context = self._variants[variant].context_length
        if len(input_ids) + max_tokens > context:
            raise InvalidRequest(
                f"prompt is {len(input_ids)} tokens and max_tokens is {max_tokens}: together they "
                f"exceed the {context}-token context of {variant}"
            )

    def _ids_for(self, variant: str, source: PromptSource, known: PreparedPrompt) -> tuple[int, ...]:
        """The prompt in `variant`'s tokens: `known`'s ids when its variant tokenizes alike, else encoded anew."""
        if self._variants[variant].tokenizes_like(self._variants[known.route.variant]):
            return known.input_ids
        return self._encode(variant, source)

    def prepare(
        self,
        tier: Tier,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        output: OutputSpec | None = None,
        prompt: str = "",
    ) -> PreparedPrompt:
        """Route, render and tokenize, once; refuse what cannot run. No generation happens here."""
        source = PromptSource(tuple(messages), prompt, output or OutputSpec())
        source.check()
        if model not in ("", AUTO):
            route = self._policy.choose(tier, model)
            self._check_variant(route.variant, source, sampling)
            input_ids = self._encode(route.variant, source)
        else:
            # Complexity needs a token count; the tier default's tokenizer gives one good enough for scoring, and
            # its ids are the prompt's when the chosen variant tokenizes alike (e.g. fp32 and int8 of one model).
            # A default without the tool format that the request needs counts the chat without tools.
            default = self._policy.default_for(tier)
            if source.needs_tools and not self._variants[default].tokenizer.supports_tools:
                plain = PromptSource(tuple(ChatMessage(m.role, m.content) for m in source.messages))
                count = len(self._encode(default, plain))
                probe = None
            else:
                probe = PreparedPrompt(RouteInfo(default, "", RouteKind.TIER_DEFAULT), self._encode(default, source))
                count = len(probe.input_ids)
            complexity = self._scorer.score(source.scoring_messages(), count)
            route = self._policy.choose(tier, model, complexity, self._load)
            if source.needs_tools:
                route = self._to_tool_variant(tier, route)
            self._check_variant(route.variant, source, sampling)
            if probe is None:
                input_ids = self._encode(route.variant, source)
            else:
                input_ids = self._ids_for(route.variant, source, probe)
        self._check_fits(route.variant, input_ids, sampling.max_tokens)
        return PreparedPrompt(route, input_ids)

    def _to_tool_variant(self, tier: Tier, route: RouteInfo) -> RouteInfo:
        """An `auto` route for a request with tools moves to the nearest variant of the tier's ladder whose template
        has a tool format (the larger on a tie); with none, the route stays and the request is refused."""
        variants = self._variants
        if variants[route.variant].tokenizer.supports_tools:
            return route
        order = self._policy.variants
        capable = [v for v in self._policy.auto_for(tier) if variants[v].tokenizer.supports_tools]
        if not capable:
            return route
        rank = order.index(route.variant)
        chosen = min(capable, key=lambda v: (abs(order.index(v) - rank), -order.index(v)))
        reason = f"{route.reason}; tools: {route.variant} has no tool-call format -> {chosen}"
        return RouteInfo(chosen, reason, route.kind)

    def check_prepared(
        self,
        tier: Tier,
        model: str,
        sampling: SamplingParams,
        prepared: PreparedPrompt,
        source: PromptSource | None = None,
    ) -> None:
        """What Prepare made (and a caller carried) is generated as it is, so it is checked as if untrusted: a
        route the policy could choose now, ids the variant's model can embed, a prompt that fits its context."""
        self._policy.validate_route(tier, model, prepared.route)
        variant = prepared.route.variant
        ids = prepared.input_ids
        if not ids:
            raise InvalidRequest("prepared.input_ids is empty: a prepared prompt holds at least one token")
        vocab = self._variants[variant].tokenizer.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise InvalidRequest(
                f"prepared.input_ids holds token id {bad}, outside {variant}'s vocabulary of {vocab} tokens"
            )
        self._check_variant(variant, source or PromptSource(), sampling)
        self._check_fits(variant, ids, sampling.max_tokens)

    async def generate(
        self,
        request_id: str,
        tier: Tier,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        prepared: PreparedPrompt | None = None,
        output: OutputSpec | None = None,
        prompt: str = "",
    ) -> AsyncIterator[GenerateEvent]:
        """Stream the answer. `prepared` (from `prepare`, possibly via the gateway) is used as it is after checks;
        without it the request is prepared here. `messages` (or `prompt`) and `output` are needed again to fall
        back to a variant that tokenizes differently, and `output` decides constraints and tool parsing."""
        REQUEST_ID.set(request_id)
        source = PromptSource(tuple(messages), prompt, output or OutputSpec())
        source.check()
        if prepared is None:
            prepared = self.prepare(tier, model, messages, sampling, source.output, prompt)
        else:
            self.check_prepared(tier, model, sampling, prepared, source)
        route = prepared.route
        pinned = route.kind is RouteKind.PINNED
        candidates = [route.variant, *([] if pinned else self._policy.fallbacks(tier, route.variant))]
        notes: list[str] = []
        token_ids_given = bool(sampling.logit_bias or sampling.stop_token_ids)
        for variant in candidates:
            if variant == route.variant:
                input_ids = prepared.input_ids
                served_kind, steps = route.kind, [route.reason]
            else:
                try:
                    if token_ids_given and not self._variants[variant].tokenizes_like(self._variants[route.variant]):
                        raise InvalidRequest(f"logit_bias or stop_token_ids are in {route.variant}'s vocabulary")
                    self._check_variant(variant, source, sampling)
                    input_ids = self._ids_for(variant, source, prepared)
                    self._check_fits(variant, input_ids, sampling.max_tokens)
                except InvalidRequest as exc:
                    notes.append(f"fallback {variant} skipped: {exc}")
                    continue
                served_kind = RouteKind.FALLBACK
                steps = [route.reason, f"fallback: {route.variant} unavailable -> {variant}"]
            grammar = grammar_for(source.output, self._variants[variant].tokenizer.added_tokens)
            tried: set[str] = set()
            while (replica := self._replicas.pick(tier, variant, tried)) is not None:
                tried.add(replica.name)
                served = RouteInfo(variant, "; ".join([steps[0], *notes, *steps[1:]]), served_kind)
                stream = _Stream(served, input_ids, sampling, source.output, grammar)
                try:
                    async for event in self._stream_from(replica, stream, request_id, tier):
                        yield event
                    return
                except _Retry as failure:
                    notes.append(f"retried after {replica.name} failed ({failure})")
                    self._observer.failover(variant, replica.name, "replica")
            if variant != candidates[-1]:
                self._observer.failover(variant, "", "variant")
        raise Unavailable(
            f"no replica could serve {route.variant}"
            + (f" or its fallbacks {candidates[1:]}" if len(candidates) > 1 else "")
            + (f"; {'; '.join(notes)}" if notes else "; no healthy replica")
        )

    async def _stream_from(
        self, replica: ReplicaState, request: _Stream, request_id: str, tier: Tier
    ) -> AsyncIterator[GenerateEvent]:
        route, sampling, input_ids = request.route, request.sampling, request.input_ids
        variant = route.variant
        tokenizer = self._variants[variant].tokenizer
        tool_names = [t.name for t in request.output.tools] if offers_tools(request.output) else None
        forced = request.output.tool_choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION)
        choices = [_Choice(index, tokenizer, sampling, tool_names, forced) for index in range(max(1, sampling.n))]
        open_choices = len(choices)
        cut_short = ""
        started = False
        ticket = self._load.started(variant)
        replica.outstanding += 1
        args = (variant, request_id, input_ids, sampling, tier)
        # The grammar only when there is one: replicas that never constrain need not take it.
        stream = (
            replica.replica.stream(*args, grammar=request.grammar) if request.grammar else replica.replica.stream(*args)
        )
        try:
            async for chunk in stream:
                if not started:
                    # The route is announced with the first token: until then a failure can still go elsewhere,
                    # and the caller (e.g. an HTTP client) has not been sent a status yet.
                    started = True
                    self._replicas.record_success(replica, variant)
                    self._observer.first_token(variant, replica.name, self._load.first_token(variant, ticket))
                    self._observer.routed(tier, route)
                    log.info(
                        "route request_id=%s tier=%s variant=%s replica=%s prompt_tokens=%d kind=%s reason=%r",
                        request_id, tier.value, variant, replica.name, len(input_ids), route.kind.value, route.reason,
                    )  # fmt: skip
                    yield GenerateEvent(route=route)
                if not 0 <= chunk.index < len(choices):
                    raise Internal(f"{variant} on {replica.name} streamed choice {chunk.index} of {len(choices)}")
                choice = choices[chunk.index]
                if choice.done:
                    continue  # e.g. tokens after this choice's stop string, while others still generate
                for event in choice.add(chunk):
                    yield event
                reason = "stop" if choice.stops.stopped else chunk.finish_reason
                if not reason:
                    continue
                if reason not in ("stop", "length"):
                    cut_short = reason
                    break
                open_choices -= 1
                usage = None
                if open_choices == 0:
                    usage = Usage(len(input_ids), sum(c.tokens for c in choices))
                for event in choice.finish(reason, usage):
                    yield event
                if open_choices == 0:
                    break
        except (Unavailable, Internal) as exc:
            self._replicas.record_failure(replica, variant, str(exc))
            if not started:
                raise _Retry(str(exc)) from exc
            raise Unavailable(
                f"{variant} on {replica.name} failed after streaming {sum(c.tokens for c in choices)} tokens: {exc}"
            ) from exc
        finally:
            replica.outstanding -= 1
            self._load.finished(variant, ticket)
            # Leaving early (stop string, client gone) closes the stream, which cancels generation upstream.
            await stream.aclose()  # type: ignore[attr-defined]
        if open_choices:
            # Cut short upstream (Triton cancelled it, or its stream ended without a final response): an incomplete
            # answer must not reach the caller, or the cache, as a complete one.
            self._replicas.record_failure(replica, variant, f"generation ended as {cut_short or 'nothing'!r}")
            raise Unavailable(
                f"{variant} on {replica.name} ended the generation early after {sum(c.tokens for c in choices)} tokens"
            )


@dataclass(frozen=True)
class _Stream:
    """One attempt's request to a replica."""

    route: RouteInfo
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    output: OutputSpec
    grammar: str


class _Choice:
    """One choice's text assembly: ids -> text -> stop strings -> tool calls, with each token's logprob attached
    to the delta that shows its text (tokens withheld, inside tool calls or after a stop string, show none).

    Offsets: every stage works on a prefix of the same raw text (the detokenizer's output), so a token is placed by
    the offset where its text ends.
    """

    def __init__(
        self,
        index: int,
        tokenizer: ChatTokenizerLike,
        sampling: SamplingParams,
        tool_names: list[str] | None,
        forced_calls: bool = False,
    ) -> None:
        self.index = index
        self._tokenizer = tokenizer
        # Specials are skipped; Qwen2.5's tool-call tags are added but not special tokens, so they come through.
        self._detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        self.stops = StopMatcher(sampling.stop)
        self._tools = ToolCallParser(tool_names, forced_calls) if tool_names is not None else None
        self._logprobs = sampling.logprobs
        self._raw_length = 0  # characters the detokenizer produced
        self._shown_length = 0  # characters the stop matcher let through (the tool parser's input)
        self._pending: deque[tuple[int, TokenLogprob]] = deque()  # (raw offset where the token's text ends, logprob)
        self.tokens = 0
        self.done = False

    def add(self, chunk: TokenChunk) -> list[GenerateEvent]:
        self.tokens += len(chunk.token_ids)
        if not self._logprobs or len(chunk.logprobs) != len(chunk.token_ids):
            return self._show(self.stops.feed(self._raw(self._detok.add(chunk.token_ids))))
        text = ""
        for position, token_id in enumerate(chunk.token_ids):
            text += self._raw(self._detok.add((token_id,)))
            self._pending.append((self._raw_length, self._token_logprob(chunk, position)))
        return self._show(self.stops.feed(text))

    def finish(self, reason: str, usage: Usage | None) -> list[GenerateEvent]:
        self.done = True
        events: list[GenerateEvent] = []
        if not self.stops.stopped:
            events += self._show(self.stops.feed(self._raw(self._detok.flush())) + self.stops.flush())
        if self._tools is not None:
            events += self._events(self._tools.flush())
            if self._tools.calls_made and reason == "stop":
                reason = "tool_calls"
        self._pending.clear()
        return [*events, GenerateEvent(finish_reason=reason, usage=usage, index=self.index)]

    def _raw(self, text: str) -> str:
        self._raw_length += len(text)
        return text

    def _show(self, text: str) -> list[GenerateEvent]:
        start = self._shown_length
        self._shown_length += len(text)
        if self._tools is not None:
            return self._events(self._tools.feed(text))
        return self._events([Segment(start, self._shown_length, text)] if text else [])

    def _events(self, segments: list[Segment]) -> list[GenerateEvent]:
        events: list[GenerateEvent] = []
        text, logprobs = "", list[TokenLogprob]()
        for segment in segments:
            taken = []
            while self._pending and self._pending[0][0] <= segment.end:
                taken.append(self._pending.popleft()[1])
            if segment.call is not None:
                if text:
                    events.append(GenerateEvent(delta=text, index=self.index, logprobs=tuple(logprobs)))
                    text, logprobs = "", []
                events.append(GenerateEvent(index=self.index, tool_calls=(segment.call,)))
            elif segment.text:
                text += segment.text
                logprobs += taken
        if text:
            events.append(GenerateEvent(delta=text, index=self.index, logprobs=tuple(logprobs)))
        return events

    def _token_logprob(self, chunk: TokenChunk, position: int) -> TokenLogprob:
        top: tuple[TopLogprob, ...] = ()
        if position < len(chunk.top_ids):
            top = tuple(
                self._top(token_id, logprob)
                for token_id, logprob in zip(chunk.top_ids[position], chunk.top_logprobs[position], strict=False)
            )
        chosen = self._top(chunk.token_ids[position], chunk.logprobs[position])
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, top)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        raw = self._tokenizer.token_bytes(token_id)
        return TopLogprob(raw.decode("utf-8", errors="replace"), logprob, raw)
