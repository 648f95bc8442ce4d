"""The gateway pipeline's order and accounting, with fake router, quota gate and cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.pipeline import CachedAnswer, ChatPipeline, Reservation
from gateway.validation import RequestLimits
from llmesh.errors import ResourceExhausted
from llmesh.types import ChatMessage, ChatRequest, GenerateEvent, Principal, RouteInfo, SamplingParams, Tier, Usage

PRINCIPAL = Principal("k1", Tier.FREE)
REQUEST = ChatRequest("auto", (ChatMessage("user", "hi"),), SamplingParams(max_tokens=10))


class FakeRouter:
    def __init__(self, deltas: list[str], fail_after: int | None = None) -> None:
        self.deltas = deltas
        self.fail_after = fail_after
        self.generated = 0

    async def prepare(self, tier: Tier, request: ChatRequest) -> tuple[RouteInfo, int]:
        return RouteInfo("small", "tier default"), 7

    async def generate(
        self, request_id: str, tier: Tier, request: ChatRequest, route: RouteInfo | None = None
    ) -> AsyncIterator[GenerateEvent]:
        self.generated += 1
        yield GenerateEvent(route=route)
        for i, delta in enumerate(self.deltas):
            if self.fail_after is not None and i == self.fail_after:
                raise ConnectionError("replica died")
            yield GenerateEvent(delta=delta)
        yield GenerateEvent(finish_reason="stop", usage=Usage(7, len(self.deltas)))

    async def list_variants(self) -> list:  # type: ignore[type-arg]
        return []


class FakeQuotas:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.settled: list[tuple[str, int]] = []

    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        if self.refuse:
            raise ResourceExhausted("requests_per_hour exhausted", retry_after_s=30)
        return Reservation(request_id, prompt_tokens + max_tokens)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        self.settled.append((reservation.id, used_tokens))


class FakeCache:
    def __init__(self, hit: CachedAnswer | None = None) -> None:
        self.hit = hit
        self.stored: list[CachedAnswer | None] = []

    async def lookup(self, principal: Principal, route: RouteInfo, request: ChatRequest) -> CachedAnswer | None:
        return self.hit

    async def store(
        self, principal: Principal, route: RouteInfo, request: ChatRequest, answer: CachedAnswer | None
    ) -> None:
        self.stored.append(answer)


def pipeline(router: FakeRouter, quotas: FakeQuotas | None = None, cache: FakeCache | None = None) -> ChatPipeline:
    return ChatPipeline(keys=None, router=router, limits=RequestLimits(), quotas=quotas, cache=cache)  # type: ignore[arg-type]


async def collect(p: ChatPipeline) -> list[GenerateEvent]:
    return [e async for e in p.stream(PRINCIPAL, REQUEST, "r1")]


def test_reserve_generate_settle_store() -> None:
    quotas, cache = FakeQuotas(), FakeCache()
    events = asyncio.run(collect(pipeline(FakeRouter(["He", "llo"]), quotas, cache)))
    assert "".join(e.delta for e in events) == "Hello"
    assert quotas.settled == [("r1", 9)]
    assert cache.stored[0] is not None and cache.stored[0].chunks == ("He", "llo")


def test_refused_request_generates_nothing() -> None:
    router = FakeRouter(["x"])
    with pytest.raises(ResourceExhausted):
        asyncio.run(collect(pipeline(router, FakeQuotas(refuse=True))))
    assert router.generated == 0


def test_failure_mid_stream_settles_what_was_used_and_stores_nothing() -> None:
    quotas, cache = FakeQuotas(), FakeCache()
    with pytest.raises(ConnectionError):
        asyncio.run(collect(pipeline(FakeRouter(["a", "b", "c"], fail_after=2), quotas, cache)))
    assert quotas.settled == [("r1", 7 + 2)]
    assert cache.stored == [None]


def test_cache_hit_replays_chunks_without_generating_or_charging() -> None:
    router, quotas = FakeRouter(["x"]), FakeQuotas()
    cache = FakeCache(CachedAnswer(("Hel", "lo"), "stop", Usage(7, 2)))
    events = asyncio.run(collect(pipeline(router, quotas, cache)))
    assert [e.delta for e in events if e.delta] == ["Hel", "lo"]
    assert events[0].route is not None and "exact cache hit" in events[0].route.reason
    assert router.generated == 0 and quotas.settled == []
