"""The response cache's core on real Redis (the Lua scripts, pub/sub, SCAN flush), and the cache service over gRPC.

Tests on the session's Redis use fresh key ids, so they never see each other's entries; tests that flush everything
or stop Redis run on a private redis-server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from prometheus_client import CollectorRegistry

from cache_service.config import CacheSettings
from cache_service.core import Answer, AnswerCache, CacheRequest
from cache_service.keys import BYTES_KEY
from cache_service.metrics import CacheMetrics
from cache_service.store import RedisBackend
from control.launcher import redis_answers
from control.process import ManagedProcess, free_port
from llmesh.types import ChatMessage, SamplingParams, Usage
from llmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from tests.fixtures.cache import CacheServer, FakeClock

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
ANSWER = Answer(("Paris", " is the", " capital."), "stop", Usage(10, 3))
SETTINGS = CacheSettings(ttl_s=60, semantic_threshold=0, single_flight_wait_s=5)


def new_key_id() -> str:
    return uuid.uuid4().hex[:16]


def req(key_id: str, text: str = "What is the capital of France?") -> CacheRequest:
    return CacheRequest(key_id, "paid", "small", (ChatMessage("user", text),), GREEDY)


def make(redis_url: str, settings: CacheSettings = SETTINGS, **kw):  # type: ignore[no-untyped-def]
    backend = RedisBackend.from_url(redis_url, settings.redis_timeout_s)
    registry = CollectorRegistry()
    return AnswerCache(backend, settings, CacheMetrics(registry), **kw), backend, registry


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, ManagedProcess]]:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = ManagedProcess("redis", [*argv, "--dir", str(tmp_path)], tmp_path / "redis.log").start()
    proc.wait_ready(lambda: redis_answers(url), timeout=20)
    yield url, proc
    proc.stop()


def test_ttl_isolation_and_flush_on_redis(redis_url: str) -> None:
    async def scenario() -> None:
        clock = FakeClock(time.time())
        cache, backend, _ = make(redis_url, clock=clock)
        a, b = new_key_id(), new_key_id()
        await cache.store(req(a), ANSWER)
        await cache.store(req(b), ANSWER)
        assert (await cache.lookup(req(a))).answer == ANSWER
        assert not (await cache.lookup(req(new_key_id()))).hit  # another tenant, same request
        # TTL by the injected clock (Redis' own expiry is only a backstop).
        clock.advance(61)
        assert not (await cache.lookup(req(a))).hit
        clock.advance(-61)
        assert (await cache.lookup(req(b))).hit
        assert await cache.flush(b) >= 1
        assert not (await cache.lookup(req(b))).hit
        await backend.close()

    asyncio.run(scenario())


def test_single_flight_across_two_cache_replicas(redis_url: str) -> None:
    """Two replicas (two gateways' cache calls) on one Redis: the lock and the release message are shared."""

    async def scenario() -> None:
        one, b1, _ = make(redis_url)
        two, b2, _ = make(redis_url)
        one.start()
        two.start()
        await asyncio.sleep(0.1)  # both subscribed
        request = req(new_key_id())
        leader = await one.lookup(request)
        assert leader.outcome == "leader"
        waiters = [asyncio.create_task(c.lookup(request)) for c in (one, two, two)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await one.store(request, ANSWER, leader.flight_token)
        results = await asyncio.gather(*waiters)
        assert [r.outcome for r in results] == ["waited"] * 3
        assert all(r.answer == ANSWER for r in results)
        assert time.monotonic() - started < 0.2  # woken by pub/sub, not by the 0.25 s poll
        for c in (one, two):
            await c.close()
        for b in (b1, b2):
            await b.close()

    asyncio.run(scenario())


def test_memory_bound_on_redis(private_redis: tuple[str, ManagedProcess]) -> None:
    url, _ = private_redis

    async def scenario() -> None:
        cache, backend, registry = make(url, dataclasses.replace(SETTINGS, max_bytes=4000))
        key_id = new_key_id()
        for i in range(30):
            await cache.store(req(key_id, f"question {i}"), ANSWER)
        client = redis.Redis.from_url(url)
        assert 0 < int(client.get(BYTES_KEY) or 0) <= 4000
        entries = [k for k in client.scan_iter(match="llmesh:cache:*:e:*")]
        assert 3 <= len(entries) < 30
        assert registry.get_sample_value("llmesh_cache_evictions_total") == 30 - len(entries)
        assert (await cache.lookup(req(key_id, "question 29"))).hit  # the newest survive
        assert not (await cache.lookup(req(key_id, "question 0"))).hit
        # Flushing one tenant also gives its bytes back.
        await cache.flush(key_id)
        assert int(client.get(BYTES_KEY) or 0) == 0
        await backend.close()

    asyncio.run(scenario())


def test_cli_flush_by_tenant(private_redis: tuple[str, ManagedProcess]) -> None:
    url, _ = private_redis
    a, b = new_key_id(), new_key_id()

    async def fill() -> None:
        cache, backend, _ = make(url)
        await cache.store(req(a), ANSWER)
        await cache.store(req(b), ANSWER)
        await backend.close()

    async def hits() -> tuple[bool, bool]:
        cache, backend, _ = make(url)
        result = (await cache.lookup(req(a))).hit, (await cache.lookup(req(b))).hit
        await backend.close()
        return result

    def flush(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "control.cli", "cache", "flush", "--redis-url", url, *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    asyncio.run(fill())
    assert "tenant" in flush("--tenant", a)
    assert asyncio.run(hits()) == (False, True)
    flush()
    assert asyncio.run(hits()) == (False, False)
    # Only the single-flight locks that the two lookups above just took remain.
    assert [k for k in redis.Redis.from_url(url).keys("llmesh:cache:*") if b":f:" not in k] == []


def test_redis_down_bypasses_fast_and_recovers(private_redis: tuple[str, ManagedProcess]) -> None:
    url, proc = private_redis

    async def scenario() -> None:
        settings = dataclasses.replace(SETTINGS, breaker_cooldown_s=0.5)
        cache, backend, registry = make(url, settings)
        key_id = new_key_id()
        await cache.store(req(key_id), ANSWER)
        proc.stop()
        started = time.monotonic()
        results = [await cache.lookup(req(key_id)) for _ in range(20)]
        elapsed = time.monotonic() - started
        assert all(r.outcome == "bypass" and not r.store for r in results)
        assert elapsed < 1.0, elapsed  # at most one short timeout, not one per request
        assert registry.get_sample_value("llmesh_cache_backend_up") == 0
        assert registry.get_sample_value("llmesh_cache_bypassed_total", {"reason": "backend_down"}) == 20
        await backend.close()

    asyncio.run(scenario())


def test_cache_service_over_grpc(cache_server: CacheServer) -> None:
    key = cache_pb2.CacheKey(
        key_id=new_key_id(),
        tier=common_pb2.TIER_PAID,
        variant="small",
        messages=[common_pb2.ChatMessage(role="user", content="hello")],
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0),
    )
    with grpc.insecure_channel(cache_server.target) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        miss = stub.Lookup(cache_pb2.CacheLookupRequest(key=key), timeout=5)
        assert not miss.hit and miss.store and miss.flight_token
        stored = stub.Store(
            cache_pb2.CacheStoreRequest(
                key=key,
                chunks=["Hel", "lo!"],
                finish_reason="stop",
                usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
                flight_token=miss.flight_token,
            ),
            timeout=5,
        )
        assert stored.result == "stored"
        hit = stub.Lookup(cache_pb2.CacheLookupRequest(key=key), timeout=5)
        assert hit.hit and hit.layer == "exact" and list(hit.chunks) == ["Hel", "lo!"]
        assert hit.usage.completion_tokens == 2

        bad = cache_pb2.CacheKey(variant="small", messages=key.messages, sampling=key.sampling)
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(cache_pb2.CacheLookupRequest(key=bad), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "key_id" in (err.value.details() or "")


def test_gateway_adapter_round_trip_and_bypass(cache_server: CacheServer) -> None:
    from gateway.caching import GrpcCacheClient
    from gateway.pipeline import CachedAnswer
    from llmesh.types import ChatRequest, Principal, RouteInfo, RouteKind, Tier

    principal = Principal(new_key_id(), Tier.PAID)
    route = RouteInfo("small", "tier default", RouteKind.TIER_DEFAULT)
    request = ChatRequest("auto", (ChatMessage("user", "hi"),), GREEDY)
    answer = CachedAnswer(("Hi", " there"), "stop", Usage(4, 2))

    async def scenario() -> None:
        cache = GrpcCacheClient(cache_server.target)
        miss = await cache.lookup(principal, route, request)
        assert miss.answer is None and miss.store and miss.flight_token
        await cache.store(principal, route, request, miss, answer)
        hit = await cache.lookup(principal, route, request)
        assert hit.answer == CachedAnswer(("Hi", " there"), "stop", Usage(4, 2), "exact") and not hit.store
        await cache.close()

        # Nothing listening: a miss at once, and the breaker keeps later calls off the network.
        dead = GrpcCacheClient(f"127.0.0.1:{free_port()}", timeout_s=0.25, cooldown_s=30)
        started = time.monotonic()
        for _ in range(10):
            bypassed = await dead.lookup(principal, route, request)
            assert bypassed.answer is None and not bypassed.store
            await dead.store(principal, route, request, bypassed, answer)
        assert time.monotonic() - started < 2.0
        await dead.close()

    asyncio.run(scenario())
