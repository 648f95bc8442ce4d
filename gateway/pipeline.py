"""The gateway's request path: authenticate, validate, then hand to the router. No gRPC here.

Cache and limiter slot in between validation and routing (their issues); the order is
cache lookup -> limiter reservation -> router -> limiter settlement -> cache store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from gateway.auth import ApiKeyStore, authenticate
from gateway.validation import ChatRequestFields, RequestLimits, validate
from llmesh.errors import Internal
from llmesh.types import ChatRequest, GenerateEvent, Principal, RouteInfo, Tier, Usage, VariantInfo


class RouterClient(Protocol):
    def generate(self, request_id: str, tier: Tier, request: ChatRequest) -> AsyncIterator[GenerateEvent]: ...

    async def list_variants(self) -> list[VariantInfo]: ...


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    route: RouteInfo


class ChatPipeline:
    def __init__(self, keys: ApiKeyStore, router: RouterClient, limits: RequestLimits) -> None:
        self._keys = keys
        self._router = router
        self._limits = limits

    async def authenticate(self, authorization: str | None) -> Principal:
        return await authenticate(self._keys, authorization)

    def validate(self, fields: ChatRequestFields) -> ChatRequest:
        return validate(fields, self._limits)

    def stream(self, principal: Principal, request: ChatRequest, request_id: str) -> AsyncIterator[GenerateEvent]:
        """Events from the router: route first, then deltas, then finish_reason + usage."""
        return self._router.generate(request_id, principal.tier, request)

    async def complete(self, principal: Principal, request: ChatRequest, request_id: str) -> Completion:
        parts: list[str] = []
        route: RouteInfo | None = None
        async for event in self.stream(principal, request, request_id):
            route = event.route or route
            parts.append(event.delta)
            if event.finish_reason:
                if route is None or event.usage is None:
                    raise Internal("router ended the answer without route or usage")
                return Completion("".join(parts), event.finish_reason, event.usage, route)
        raise Internal("router closed the stream before the answer was complete")

    async def list_models(self, principal: Principal) -> list[VariantInfo]:
        variants = await self._router.list_variants()
        return [v for v in variants if not v.tiers or principal.tier.value in v.tiers]
