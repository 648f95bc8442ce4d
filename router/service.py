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
from llmesh.types import ChatMessage, GenerateEvent, RouteInfo, SamplingParams, Tier, Usage, VariantInfo
from router.complexity import ComplexityScorer, HeuristicScorer
from router.load import LoadTracker
from router.policy import AUTO, RoutingPolicy
from router.replicas import ReplicaPool, ReplicaState
from router.text import IncrementalDetokenizer, StopMatcher
from router.tokens import TokenChunk

log = logging.getLogger(__name__)

__all__ = ["PreparedRequest", "Router", "RouterObserver", "TokenChunk", "Variant"]


class ChatTokenizerLike(Protocol):
    @property
    def context_length(self) -> int: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...

    def encode(self, text: str) -> list[int]: ...

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

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length


@dataclass(frozen=True)
class PreparedRequest:
    route: RouteInfo
    input_ids: list[int]
    context_length: int


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

    def _tokenize(self, variant: str, messages: Sequence[ChatMessage], max_tokens: int) -> list[int]:
        spec = self._variants[variant]
        prompt = spec.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
        input_ids = spec.tokenizer.encode(prompt)
        if len(input_ids) + max_tokens > spec.context_length:
            raise InvalidRequest(
                f"prompt is {len(input_ids)} tokens and max_tokens is {max_tokens}: together they "
                f"exceed the {spec.context_length}-token context of {variant}"
            )
        return input_ids

    def prepare(
        self,
        tier: Tier,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        route: RouteInfo | None = None,
    ) -> PreparedRequest:
        """Route, render and tokenize; refuse what cannot run. No generation happens here."""
        if route is not None:
            # A decision made earlier (Prepare) is honoured only if it is still a valid choice for this tier.
            self._policy.validate_pin(tier, route.variant)
        elif model not in ("", AUTO):
            route = self._policy.choose(tier, model)
        else:
            # Complexity needs a token count; any variant's tokenizer gives a good enough one for scoring.
            probe = self._tokenize(self._policy.default_for(tier), messages, 0)
            complexity = self._scorer.score(messages, len(probe))
            route = self._policy.choose(tier, model, complexity, self._load)
        input_ids = self._tokenize(route.variant, messages, sampling.max_tokens)
        return PreparedRequest(route, input_ids, self._variants[route.variant].context_length)

    async def generate(
        self,
        request_id: str,
        tier: Tier,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        route: RouteInfo | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        REQUEST_ID.set(request_id)
        prepared = self.prepare(tier, model, messages, sampling, route)
        route = prepared.route
        pinned = route.reason == "pinned by request"
        candidates = [route.variant, *([] if pinned else self._policy.fallbacks(tier, route.variant))]
        notes: list[str] = []
        for variant in candidates:
            input_ids = (
                prepared.input_ids
                if variant == route.variant
                else self._tokenize(variant, messages, sampling.max_tokens)
            )
            tried: set[str] = set()
            while (replica := self._replicas.pick(tier, variant, tried)) is not None:
                tried.add(replica.name)
                reason = (
                    "; ".join([route.reason, *notes])
                    if variant == route.variant
                    else "; ".join([route.reason, *notes, f"fallback: {route.variant} unavailable -> {variant}"])
                )
                served = RouteInfo(variant, reason)
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
        input_ids: list[int],
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
                        "route request_id=%s tier=%s variant=%s replica=%s prompt_tokens=%d reason=%r",
                        request_id, tier.value, variant, replica.name, len(input_ids), route.reason,
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
            finish_reason = "stop"
        yield GenerateEvent(
            finish_reason=finish_reason,
            usage=Usage(prompt_tokens=len(input_ids), completion_tokens=completion_tokens),
        )
