"""The router's core: choose a variant, render and tokenize the chat, stream tokens from a replica, assemble text.

Failover: a request that has not streamed its first token is retried on another replica, then on a smaller
variant the tier allows; one that already streamed ends with UNAVAILABLE (the gateway refunds unused quota).
No gRPC here; replicas, tokenizers, load tracking and metrics are passed in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from llmesh.errors import Internal, InvalidRequest, Unavailable
from llmesh.logs import REQUEST_ID
from llmesh.types import (
    ChatMessage,
    GenerateEvent,
    PreparedPrompt,
    RouteInfo,
    RouteKind,
    SamplingParams,
    Tier,
    Usage,
    VariantInfo,
)
from router.complexity import ComplexityScorer, HeuristicScorer
from router.load import LoadTracker
from router.policy import AUTO, RoutingPolicy
from router.replicas import ReplicaPool, ReplicaState
from router.text import IncrementalDetokenizer, StopMatcher
from router.tokens import TokenChunk

log = logging.getLogger(__name__)

__all__ = ["Router", "RouterObserver", "TokenChunk", "Variant"]


class ChatTokenizerLike(Protocol):
    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt's ids; control tokens come only from the template, never from message content."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


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

    def _encode(self, variant: str, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        """Render the chat template and tokenize: the one place a prompt becomes ids."""
        tokenizer = self._variants[variant].tokenizer
        return tuple(tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in messages]))

    def _check_fits(self, variant: str, input_ids: Sequence[int], max_tokens: int) -> None:
        context = self._variants[variant].context_length
        if len(input_ids) + max_tokens > context:
            raise InvalidRequest(
                f"prompt is {len(input_ids)} tokens and max_tokens is {max_tokens}: together they "
                f"exceed the {context}-token context of {variant}"
            )

    def _ids_for(self, variant: str, messages: Sequence[ChatMessage], known: PreparedPrompt) -> tuple[int, ...]:
        """The prompt in `variant`'s tokens: `known`'s ids when its variant tokenizes alike, else encoded anew."""
        if self._variants[variant].tokenizes_like(self._variants[known.route.variant]):
            return known.input_ids
        return self._encode(variant, messages)

    def prepare(
        self, tier: Tier, model: str, messages: Sequence[ChatMessage], sampling: SamplingParams
    ) -> PreparedPrompt:
        """Route, render and tokenize, once; refuse what cannot run. No generation happens here."""
        if not messages:
            raise InvalidRequest("messages must hold at least one message")
        if model not in ("", AUTO):
            route = self._policy.choose(tier, model)
            input_ids = self._encode(route.variant, messages)
        else:
            # Complexity needs a token count; the tier default's tokenizer gives one good enough for scoring, and
            # its ids are the prompt's when the chosen variant tokenizes alike (e.g. fp32 and int8 of one model).
            default = self._policy.default_for(tier)
            probe = PreparedPrompt(RouteInfo(default, "", RouteKind.TIER_DEFAULT), self._encode(default, messages))
            complexity = self._scorer.score(messages, len(probe.input_ids))
            route = self._policy.choose(tier, model, complexity, self._load)
            input_ids = self._ids_for(route.variant, messages, probe)
        self._check_fits(route.variant, input_ids, sampling.max_tokens)
        return PreparedPrompt(route, input_ids)

    def check_prepared(self, tier: Tier, model: str, sampling: SamplingParams, prepared: PreparedPrompt) -> None:
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
        self._check_fits(variant, ids, sampling.max_tokens)

    async def generate(
        self,
        request_id: str,
        tier: Tier,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        prepared: PreparedPrompt | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        """Stream the answer. `prepared` (from `prepare`, possibly via the gateway) is used as it is after checks;
        without it the request is prepared here. `messages` are needed again only to fall back to a variant that
        tokenizes differently."""
        REQUEST_ID.set(request_id)
        if not messages:
            raise InvalidRequest("messages must hold at least one message")
        if prepared is None:
            prepared = self.prepare(tier, model, messages, sampling)
        else:
            self.check_prepared(tier, model, sampling, prepared)
        route = prepared.route
        pinned = route.kind is RouteKind.PINNED
        candidates = [route.variant, *([] if pinned else self._policy.fallbacks(tier, route.variant))]
        notes: list[str] = []
        for variant in candidates:
            if variant == route.variant:
                input_ids = prepared.input_ids
                served_kind, steps = route.kind, [route.reason]
            else:
                input_ids = self._ids_for(variant, messages, prepared)
                try:
                    self._check_fits(variant, input_ids, sampling.max_tokens)
                except InvalidRequest as exc:
                    notes.append(f"fallback {variant} skipped: {exc}")
                    continue
                served_kind = RouteKind.FALLBACK
                steps = [route.reason, f"fallback: {route.variant} unavailable -> {variant}"]
            tried: set[str] = set()
            while (replica := self._replicas.pick(tier, variant, tried)) is not None:
                tried.add(replica.name)
                served = RouteInfo(variant, "; ".join([steps[0], *notes, *steps[1:]]), served_kind)
                try:
                    async for event in self._stream_from(replica, served, request_id, tier, input_ids, sampling):
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
        self,
        replica: ReplicaState,
        route: RouteInfo,
        request_id: str,
        tier: Tier,
        input_ids: Sequence[int],
        sampling: SamplingParams,
    ) -> AsyncIterator[GenerateEvent]:
        variant = route.variant
        tokenizer = self._variants[variant].tokenizer
        detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        stops = StopMatcher(sampling.stop)
        completion_tokens = 0
        finish_reason = ""
        started = False
        ticket = self._load.started(variant)
        replica.outstanding += 1
        stream = replica.replica.stream(variant, request_id, input_ids, sampling, tier)
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
                completion_tokens += len(chunk.token_ids)
                text = stops.feed(detok.add(chunk.token_ids))
                if text:
                    yield GenerateEvent(delta=text)
                if stops.stopped:
                    finish_reason = "stop"
                    break
                if chunk.finish_reason:
                    finish_reason = chunk.finish_reason
                    break
        except (Unavailable, Internal) as exc:
            self._replicas.record_failure(replica, variant, str(exc))
            if not started:
                raise _Retry(str(exc)) from exc
            raise Unavailable(
                f"{variant} on {replica.name} failed after streaming {completion_tokens} tokens: {exc}"
            ) from exc
        finally:
            replica.outstanding -= 1
            self._load.finished(variant, ticket)
            # Leaving early (stop string, client gone) closes the stream, which cancels generation upstream.
            await stream.aclose()  # type: ignore[attr-defined]
        if not stops.stopped:
            tail = stops.feed(detok.flush()) + stops.flush()
            if tail:
                yield GenerateEvent(delta=tail)
        if finish_reason not in ("stop", "length"):
            # Cut short upstream (Triton cancelled it, or its stream ended without a final response): an incomplete
            # answer must not reach the caller, or the cache, as a complete one.
            self._replicas.record_failure(replica, variant, f"generation ended as {finish_reason or 'nothing'!r}")
            raise Unavailable(
                f"{variant} on {replica.name} ended the generation early after {completion_tokens} tokens"
            )
        yield GenerateEvent(
            finish_reason=finish_reason,
            usage=Usage(prompt_tokens=len(input_ids), completion_tokens=completion_tokens),
        )
