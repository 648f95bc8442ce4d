"""The gateway's side of the cache contract: hit flags on replayed events, waiters released on refusal, the
single-flight token handed from lookup to store, and the breaker that keeps a dead cache off the request path."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.caching import GrpcCacheClient
from gateway.pipeline import NO_STORE, CachedAnswer, CacheLookup
from llmesh.breaker import BreakerState
from llmesh.errors import ResourceExhausted
from llmesh.types import Usage
from llmesh.v1 import cache_pb2, common_pb2
from tests.unit.test_pipeline import PREPARED, PRINCIPAL, REQUEST, FakeCache, FakeQuotas, FakeRouter, collect, pipeline


def test_replayed_events_carry_the_cache_layer() -> None:
    cache = FakeCache(CachedAnswer(("Hel", "lo"), "stop", Usage(7, 2), layer="semantic"))
    events = asyncio.run(collect(pipeline(FakeRouter(["x"]), FakeQuotas(), cache)))
    assert [e.cache for e in events] == ["semantic"] * 4
    done = asyncio.run(pipeline(FakeRouter(["x"]), FakeQuotas(), cache).complete(PRINCIPAL, REQUEST, "r1"))
    assert done.cache == "semantic" and done.text == "Hello"


def test_generated_events_carry_no_cache_flag() -> None:
    events = asyncio.run(collect(pipeline(FakeRouter(["a", "b"]), FakeQuotas(), FakeCache())))
    assert all(e.cache == "" for e in events)


def test_a_refused_miss_releases_its_single_flight_waiters() -> None:
    cache = FakeCache()
    with pytest.raises(ResourceExhausted):
        asyncio.run(collect(pipeline(FakeRouter(["x"]), FakeQuotas(refuse=True), cache)))
    assert cache.stored == [None] and cache.tokens == ["flight-1"]


def test_a_finished_miss_stores_with_the_token_its_lookup_got() -> None:
    cache = FakeCache()
    asyncio.run(collect(pipeline(FakeRouter(["a", "b"]), FakeQuotas(), cache)))
    assert cache.tokens == ["flight-1"] and cache.stored[0] is not None


class Unreachable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class FakeStub:
    def __init__(self) -> None:
        self.down = False
        self.lookups: list[cache_pb2.CacheLookupRequest] = []
        self.stores: list[cache_pb2.CacheStoreRequest] = []

    async def Lookup(self, message: cache_pb2.CacheLookupRequest, timeout: float) -> cache_pb2.CacheLookupResponse:
        self.lookups.append(message)
        if self.down:
            raise Unreachable()
        return cache_pb2.CacheLookupResponse(store=True, flight_token=f"t{len(self.lookups)}")

    async def Store(self, message: cache_pb2.CacheStoreRequest, timeout: float) -> cache_pb2.CacheStoreResponse:
        self.stores.append(message)
        if self.down:
            raise Unreachable()
        return cache_pb2.CacheStoreResponse(result="stored")


def test_grpc_client_passes_the_flight_token_and_bypasses_a_dead_cache_until_the_cooldown() -> None:
    now = [0.0]
    stub = FakeStub()
    answer = CachedAnswer(("Hi",), "stop", Usage(3, 1))
    route = PREPARED.route

    async def scenario() -> None:
        client = GrpcCacheClient("127.0.0.1:1", cooldown_s=5.0, clock=lambda: now[0])
        client._stub = stub  # type: ignore[assignment]
        lookup = await client.lookup(PRINCIPAL, route, REQUEST)
        assert lookup == CacheLookup(store=True, flight_token="t1")
        assert stub.lookups[0].key.tier == common_pb2.TIER_FREE
        await client.store(PRINCIPAL, route, REQUEST, lookup, answer)
        assert stub.stores[-1].flight_token == "t1" and list(stub.stores[-1].chunks) == ["Hi"]
        await client.store(PRINCIPAL, route, REQUEST, NO_STORE, answer)
        assert len(stub.stores) == 1, "a miss the cache did not ask for is never stored"

        stub.down = True
        assert await client.lookup(PRINCIPAL, route, REQUEST) == NO_STORE
        assert client.breaker.state is BreakerState.OPEN
        for _ in range(5):
            assert await client.lookup(PRINCIPAL, route, REQUEST) == NO_STORE
        assert len(stub.lookups) == 2, "an open breaker keeps calls off the network"

        now[0] += 5.0
        stub.down = False
        assert (await client.lookup(PRINCIPAL, route, REQUEST)).flight_token == "t3"  # the half-open probe
        assert client.breaker.state is BreakerState.CLOSED
        await client.close()

    asyncio.run(scenario())
