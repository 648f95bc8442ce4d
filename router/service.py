"""The router's core: choose a variant, render and tokenize the chat, stream tokens, assemble text.

No gRPC here; the token source (Triton) and tokenizers are passed in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from llmesh.errors import InvalidRequest
from llmesh.types import ChatMessage, GenerateEvent, RouteInfo, SamplingParams, Tier, Usage, VariantInfo
from router.policy import RoutingPolicy
from router.text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)


class ChatTokenizerLike(Protocol):
    @property
    def context_length(self) -> int: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    # Empty until the engine's last response: "stop", "length" or "cancelled".
    finish_reason: str = ""


class TokenSource(Protocol):
    """Streams generated token ids for one request (Triton in production, a fake in unit tests)."""

    def stream(
        self, variant: str, request_id: str, input_ids: Sequence[int], sampling: SamplingParams
    ) -> AsyncIterator[TokenChunk]: ...


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


class Router:
    def __init__(self, variants: Mapping[str, Variant], policy: RoutingPolicy, tokens: TokenSource) -> None:
        self._variants = variants
        self._policy = policy
        self._tokens = tokens

    def list_variants(self) -> list[VariantInfo]:
        return [
            VariantInfo(v.name, v.description, v.context_length, self._policy.tiers_for(v.name))
            for v in self._variants.values()
        ]

    def prepare(
        self,
        tier: Tier,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        route: RouteInfo | None = None,
    ) -> PreparedRequest:
        """Route, render and tokenize; refuse what cannot run. No generation happens here."""
        if route is None:
            route = self._policy.choose(tier, model)
        else:
            # A decision made earlier (Prepare) is honoured only if it is still a valid choice for this tier.
            self._policy.choose(tier, route.variant)
        variant = self._variants[route.variant]
        tokenizer = variant.tokenizer
        prompt = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
        input_ids = tokenizer.encode(prompt)
        if len(input_ids) + sampling.max_tokens > variant.context_length:
            raise InvalidRequest(
                f"prompt is {len(input_ids)} tokens and max_tokens is {sampling.max_tokens}: together they "
                f"exceed the {variant.context_length}-token context of {variant.name}"
            )
        return PreparedRequest(route=route, input_ids=input_ids, context_length=variant.context_length)

    async def generate(
        self,
        request_id: str,
        tier: Tier,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        route: RouteInfo | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        prepared = self.prepare(tier, model, messages, sampling, route)
        route, input_ids = prepared.route, prepared.input_ids
        tokenizer = self._variants[route.variant].tokenizer
        log.info(
            "route request_id=%s tier=%s variant=%s reason=%r prompt_tokens=%d",
            request_id,
            tier.value,
            route.variant,
            route.reason,
            len(input_ids),
        )
        yield GenerateEvent(route=route)

        detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        stops = StopMatcher(sampling.stop)
        completion_tokens = 0
        finish_reason = ""
        stream = self._tokens.stream(route.variant, request_id, input_ids, sampling)
        try:
            async for chunk in stream:
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
        finally:
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
