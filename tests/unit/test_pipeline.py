"""The gateway pipeline's order and accounting, with fake router, quota gate and cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.metrics import NullGatewayObserver
from gateway.pipeline import CachedAnswer, CacheLookup, ChatPipeline, Reservation
from gateway.validation import RequestLimits
from llmesh.errors import ResourceExhausted
from llmesh.types import (
    ChatMessage,
    ChatRequest,
    GenerateEvent,
    PreparedPrompt,
    Principal,
    RouteInfo,
    RouteKind,
    SamplingParams,
    Tier,
    Usage,
)

PRINCIPAL = Principal("k1", Tier.FREE)
REQUEST = ChatRequest("auto", (ChatMessage("user", "hi"),), SamplingParams(max_tokens=10))
PREPARED = PreparedPrompt(RouteInfo("small", "tier free default small", RouteKind.TIER_DEFAULT), (11,) * 7)


class FakeRouter:
    def __init__(self, deltas: list[str], fail_after: int | None = None, calls: list[str] | None = None) -> None:
        self.deltas = deltas
        self.fail_after = fail_after
        self.generated = 0
        self.given: list[PreparedPrompt | None] = []
        self.calls = [] if calls is None else calls

    async def prepare(self, tier: Tier, request: ChatRequest) -> PreparedPrompt:
        self.calls.append("router.Prepare")
        return PREPARED

    async def generate(
        self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
    ) -> AsyncIterator[GenerateEvent]:
        self.calls.append("router.Generate")
        self.generated += 1
        self.given.append(prepared)
        yield GenerateEvent(route=prepared.route if prepared else None)
        for i, delta in enumerate(self.deltas):
            if self.fail_after is not None and i == self.fail_after:
                raise ConnectionError("replica died")
            yield GenerateEvent(delta=delta)
        yield GenerateEvent(finish_reason="stop", usage=Usage(7, len(self.deltas)))

    async def list_variants(self) -> list:  # type: ignore[type-arg]
        return []


class FakeQuotas:
    def __init__(self, refuse: bool = False, calls: list[str] | None = None) -> None:
        self.refuse = refuse
        self.settled: list[tuple[str, int]] = []
        self.reserved: list[int] = []
        self.calls = [] if calls is None else calls

    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        self.calls.append("limiter.Reserve")
        self.reserved.append(prompt_tokens)
        if self.refuse:
            raise ResourceExhausted("requests_per_hour exhausted", retry_after_s=30)
        return Reservation(request_id, prompt_tokens + max_tokens)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        self.calls.append("limiter.Settle")
        self.settled.append((reservation.id, used_tokens))


class FakeCache:
    """A miss hands out a single-flight token (or, with `cacheable=False`, says not to store)."""

    def __init__(
        self,
        hit: CachedAnswer | None = None,
        cacheable: bool = True,
        calls: list[str] | None = None,
        in_flight: CachedAnswer | None = None,
    ) -> None:
        self.hit = hit
        self.cacheable = cacheable
        # An identical request is generating: a lookup with wait=False says so, one that waits gets this answer.
        self.in_flight = in_flight
        self.stored: list[CachedAnswer | None] = []
        self.tokens: list[str] = []
        self.calls = [] if calls is None else calls
        self.waits: list[bool] = []

    async def lookup(
        self, principal: Principal, route: RouteInfo, request: ChatRequest, wait: bool = True
    ) -> CacheLookup:
        self.calls.append("cache.Lookup")
        self.waits.append(wait)
        if self.hit is not None:
            return CacheLookup(answer=self.hit)
        if self.in_flight is not None:
            return CacheLookup(answer=self.in_flight) if wait else CacheLookup(in_flight=True)
        return CacheLookup(store=True, flight_token="flight-1") if self.cacheable else CacheLookup()

    async def store(
        self,
        principal: Principal,
        route: RouteInfo,
        request: ChatRequest,
        lookup: CacheLookup,
        answer: CachedAnswer | None,
    ) -> None:
        self.calls.append("cache.Store")
        self.tokens.append(lookup.flight_token)
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
    route = events[0].route
    assert route == RouteInfo("small", "tier free default small; exact cache hit", RouteKind.CACHE_HIT)
    assert router.generated == 0 and quotas.settled == []


def test_internal_calls_of_a_hit_and_of_a_miss() -> None:
    """docs/PERFORMANCE.md, "Internal calls per request": the gateway's calls, in order."""
    calls: list[str] = []
    answer = CachedAnswer(("Hel", "lo"), "stop", Usage(7, 2))
    hit = pipeline(FakeRouter(["x"], calls=calls), FakeQuotas(calls=calls), FakeCache(answer, calls=calls))
    asyncio.run(collect(hit))
    assert calls == ["router.Prepare", "cache.Lookup"]

    calls.clear()
    router = FakeRouter(["x"], calls=calls)
    asyncio.run(collect(pipeline(router, FakeQuotas(calls=calls), FakeCache(calls=calls))))
    assert calls == [
        "router.Prepare", "cache.Lookup", "limiter.Reserve", "router.Generate", "limiter.Settle", "cache.Store"
    ]  # fmt: skip
    assert router.given == [PREPARED], "Generate gets Prepare's route and token ids: one preparation per request"


def test_a_miss_the_cache_does_not_want_is_not_stored() -> None:
    cache = FakeCache(cacheable=False)
    asyncio.run(collect(pipeline(FakeRouter(["a"]), FakeQuotas(), cache)))
    assert cache.calls == ["cache.Lookup"]


def test_the_quota_reservation_counts_the_prepared_prompt() -> None:
    quotas = FakeQuotas()
    asyncio.run(collect(pipeline(FakeRouter([]), quotas)))
    assert quotas.reserved == [len(PREPARED.input_ids)]


def test_each_step_before_generation_is_timed() -> None:
    """llmesh_gateway_stage_seconds: where a request's time to first token goes, step by step."""

    class Stages(NullGatewayObserver):
        def __init__(self) -> None:
            self.seen: list[tuple[str, float]] = []

        def stage(self, name: str, seconds: float) -> None:
            self.seen.append((name, seconds))

    ticks = iter(range(100))
    observer = Stages()
    p = ChatPipeline(
        keys=None,  # type: ignore[arg-type]
        router=FakeRouter(["x"]),
        limits=RequestLimits(),
        quotas=FakeQuotas(),
        cache=FakeCache(),
        observer=observer,
        clock=lambda: float(next(ticks)),
    )
    asyncio.run(collect(p))
    assert observer.seen == [("prepare", 1.0), ("cache_lookup", 1.0), ("reserve", 1.0), ("first_event", 1.0)]


ANSWER = CachedAnswer(("Hel", "lo"), "stop", Usage(7, 2))


def test_a_single_flight_waiter_holds_a_reservation_while_it_waits() -> None:
    """An identical request is generating: this one reserves (a concurrency slot) before it waits for that answer,
    and is settled with 0 tokens once served."""
    calls: list[str] = []
    router, quotas = FakeRouter(["x"], calls=calls), FakeQuotas(calls=calls)
    cache = FakeCache(calls=calls, in_flight=ANSWER)
    events = asyncio.run(collect(pipeline(router, quotas, cache)))
    assert [e.delta for e in events if e.delta] == ["Hel", "lo"]
    assert calls == ["router.Prepare", "cache.Lookup", "limiter.Reserve", "cache.Lookup", "limiter.Settle"]
    assert cache.waits == [False, True] and quotas.settled == [("r1", 0)] and router.generated == 0


def test_a_refused_waiter_never_waits() -> None:
    calls: list[str] = []
    cache = FakeCache(calls=calls, in_flight=ANSWER)
    with pytest.raises(ResourceExhausted):
        asyncio.run(collect(pipeline(FakeRouter(["x"], calls=calls), FakeQuotas(refuse=True, calls=calls), cache)))
    assert calls == ["router.Prepare", "cache.Lookup", "limiter.Reserve"]


def test_without_quotas_the_lookup_waits_itself() -> None:
    cache = FakeCache(in_flight=ANSWER)
    asyncio.run(collect(pipeline(FakeRouter(["x"]), None, cache)))
    assert cache.waits == [True]


class CutShortRouter(FakeRouter):
    """Ends with a final event whose finish_reason says the generation was cancelled (e.g. by the engine)."""

    async def generate(
        self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
    ) -> AsyncIterator[GenerateEvent]:
        yield GenerateEvent(route=PREPARED.route)
        yield GenerateEvent(delta="partial")
        yield GenerateEvent(finish_reason="cancelled", usage=Usage(7, 1))


@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_only_an_answer_that_ended_by_itself_is_cached(finish_reason: str) -> None:
    class Finishing(FakeRouter):
        async def generate(
            self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
        ) -> AsyncIterator[GenerateEvent]:
            yield GenerateEvent(route=PREPARED.route)
            yield GenerateEvent(delta="a")
            yield GenerateEvent(finish_reason=finish_reason, usage=Usage(7, 1))

    cache = FakeCache()
    asyncio.run(collect(pipeline(Finishing([]), FakeQuotas(), cache)))
    assert cache.stored[0] is not None and cache.stored[0].finish_reason == finish_reason

    cut, quotas = FakeCache(), FakeQuotas()
    asyncio.run(collect(pipeline(CutShortRouter([]), quotas, cut)))
    assert cut.stored == [None], "a cancelled answer releases the waiters and is not stored"
    assert quotas.settled == [("r1", 8)]


def test_a_caller_that_leaves_mid_stream_is_settled_and_stored_and_drain_waits() -> None:
    """The stream is cancelled (client gone, server stopping) while the settlement is in flight: the settlement
    completes, the cache miss is still released (not stored: the answer was not complete), and drain waits."""

    class SlowQuotas(FakeQuotas):
        async def settle(self, reservation: Reservation, used_tokens: int) -> None:
            await asyncio.sleep(0.2)
            await super().settle(reservation, used_tokens)

    class Endless(FakeRouter):
        async def generate(
            self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
        ) -> AsyncIterator[GenerateEvent]:
            yield GenerateEvent(route=PREPARED.route)
            while True:
                yield GenerateEvent(delta="x")
                await asyncio.sleep(0.01)

    quotas, cache = SlowQuotas(), FakeCache()
    p = pipeline(Endless([]), quotas, cache)

    async def main() -> int:
        task = asyncio.create_task(collect(p))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.01)  # the stream's finally has started the settlement
        with pytest.raises(asyncio.CancelledError):
            task.cancel()
            await task
        assert quotas.settled == [], "still settling"
        return await p.drain(2.0)

    assert asyncio.run(main()) == 0
    assert len(quotas.settled) == 1 and quotas.settled[0][1] > len(PREPARED.input_ids)
    assert cache.stored == [None]


def test_drain_waits_for_a_stream_cut_off_before_its_finally_ran() -> None:
    """On shutdown the server cancels a request and returns at once; the stream's finally (settlement, store) runs
    later, possibly in its generator's finalizer. drain counts the stream from its start, so it waits for that."""
    quotas, cache = FakeQuotas(), FakeCache()
    p = pipeline(FakeRouter(["a", "b", "c"]), quotas, cache)

    async def main() -> tuple[int, int]:
        stream = p.stream(PRINCIPAL, REQUEST, "r1")
        await stream.__anext__()  # the route
        await stream.__anext__()  # "a": generating, with a reservation; the consumer stops reading here
        still = await p.drain(0.05)
        asyncio.get_running_loop().call_later(0.1, lambda: asyncio.ensure_future(stream.aclose()))  # type: ignore[attr-defined]
        return still, await p.drain(2.0)

    assert asyncio.run(main()) == (1, 0)
    assert quotas.settled == [("r1", 7 + 1)] and cache.stored == [None]
