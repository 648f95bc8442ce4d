"""The Lua scripts against real Redis and a real 3-master Redis Cluster: the same behaviours as the in-process store,
hash-tagged keys in one slot, and exactness and token budgets under concurrency."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from limiter_service.core import Limiter
from limiter_service.policy import PolicySource
from limiter_service.redis_store import RedisQuotaStore, SlotRouter, connect, redis_keys
from limiter_service.store import Check, QuotaStore
from tests.unit.test_limiter_store import BEHAVIOURS, HOUR, T0


@pytest.fixture(params=["redis", "cluster"])
def redis_store(request: pytest.FixtureRequest) -> tuple[str, bool]:
    if request.param == "redis":
        return request.getfixturevalue("redis_url"), False
    return request.getfixturevalue("redis_cluster_url"), True


def run_with_store(url: str, cluster: bool, body: Callable[[RedisQuotaStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = RedisQuotaStore(connect(url, cluster, timeout_s=2.0))
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=lambda b: b.__name__.removeprefix("behave_"))
def test_redis_store_behaves_like_the_reference(
    redis_store: tuple[str, bool], behaviour: Callable[[QuotaStore], Awaitable[None]]
) -> None:
    run_with_store(*redis_store, behaviour)


def test_cluster_keeps_a_subject_in_one_slot_and_spreads_subjects(redis_cluster_url: str) -> None:
    async def main() -> None:
        client = RedisCluster.from_url(redis_cluster_url)
        try:
            owners = set()
            for i in range(30):
                slots = {await client.cluster_keyslot(k) for k in redis_keys(f"key:{i:016x}")}
                assert len(slots) == 1
                owners.add(client.get_node_from_key(redis_keys(f"key:{i:016x}")[0]).name)
            assert len(owners) == 3, "30 subjects should land on all 3 masters"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_scripts_reload_after_script_flush(redis_url: str) -> None:
    """A restarted Redis has no scripts cached; EVALSHA's NOSCRIPT must reload, not fail."""

    async def body(store: RedisQuotaStore) -> None:
        s = f"key:{uuid.uuid4().hex[:16]}"
        c = Check(window_ms=HOUR, request_limit=5)
        assert (await store.check(s, "a", T0, c)).admitted
        client = aioredis.from_url(redis_url)
        await client.script_flush()
        await client.aclose()
        assert (await store.check(s, "b", T0, c)).requests == 2

    run_with_store(redis_url, False, body)


def _policy(tmp_path, text: str) -> PolicySource:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return PolicySource(path)


TIERS = """
[tiers.free]
requests_per_hour = {free_requests}
tokens_per_hour = {free_tokens}
on_store_failure = "closed"
[tiers.paid]
requests_per_hour = 1000
[tiers.enterprise]
requests_per_hour = 1000
"""


def test_exactly_the_limit_is_admitted_under_concurrency(redis_store: tuple[str, bool], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """200 concurrent reservations of one free key through 2 limiters sharing the store: exactly 20 admitted."""
    url, cluster = redis_store
    policy = _policy(tmp_path, TIERS.format(free_requests=20, free_tokens='"unlimited"'))
    key_id = uuid.uuid4().hex[:16]

    async def main() -> None:
        stores = [RedisQuotaStore(connect(url, cluster, timeout_s=2.0)) for _ in range(2)]
        limiters = [Limiter(policy, s, store_timeout_s=2.0) for s in stores]
        started = time.monotonic()
        try:
            decisions = await asyncio.gather(*(limiters[i % 2].reserve(key_id, "free", 10, 1) for i in range(200)))
        finally:
            for s in stores:
                await s.close()
        admitted = [d for d in decisions if d.allowed]
        refused = [d for d in decisions if not d.allowed]
        assert len(admitted) == 20 and len(refused) == 180
        assert {d.refused_by for d in refused} == {"requests_per_hour"}
        # Admitted after `started`, refused before now: the oldest admission leaves the window in between.
        earliest = 3600_000 - int((time.monotonic() - started) * 1000) - 1
        assert all(earliest <= d.retry_after_ms <= 3600_000 for d in refused)
        assert len({d.reservation_id for d in admitted}) == 20

    asyncio.run(main())


def test_token_budget_is_never_overspent(redis_store: tuple[str, bool], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Many concurrent requests against a small tokens/hour budget, settled with random real usage: what was
    spent never exceeds the budget, and refunds let more requests in."""
    url, cluster = redis_store
    budget = 1000
    policy = _policy(tmp_path, TIERS.format(free_requests='"unlimited"', free_tokens=budget))
    key_id = uuid.uuid4().hex[:16]
    rng = random.Random(7)

    async def main() -> tuple[int, int]:
        store = RedisQuotaStore(connect(url, cluster, timeout_s=2.0))
        limiter = Limiter(policy, store, store_timeout_s=2.0)
        spent = admitted = 0

        async def one() -> None:
            nonlocal spent, admitted
            prompt, max_tokens = rng.randint(5, 40), rng.randint(10, 120)
            decision = await limiter.reserve(key_id, "free", prompt, max_tokens)
            if not decision.allowed:
                assert decision.refused_by == "tokens_per_hour"
                return
            admitted += 1
            await asyncio.sleep(rng.random() * 0.01)
            used = prompt + rng.randint(0, max_tokens)
            spent += used
            assert await limiter.settle(decision.reservation_id, used)

        try:
            for _ in range(4):  # waves: refunds from one wave make room in the next
                await asyncio.gather(*(one() for _ in range(60)))
            status = await limiter.status(key_id, "free")
        finally:
            await store.close()
        tokens = next(q for q in status.quotas if q.name == "tokens_per_hour")
        assert tokens.limit - tokens.remaining == spent, "the store charged exactly what was used"
        return spent, admitted

    spent, admitted = asyncio.run(main())
    assert spent <= budget
    # Each request reserves at most 160; refunds must have let in more than the 6 that fit without them.
    assert admitted > budget // 160


def test_redis_cli_sees_hash_tagged_keys(redis_url: str) -> None:
    async def body(store: RedisQuotaStore) -> None:
        s = f"key:{uuid.uuid4().hex[:16]}"
        await store.check(s, "a", T0, Check(window_ms=HOUR, request_limit=5, tokens=3, lease_ms=1000))

    run_with_store(redis_url, False, body)
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    keys = subprocess.run(
        ["redis-cli", "-p", port, "--scan", "--pattern", "llmesh:quota:*"], capture_output=True, text=True, timeout=5
    ).stdout.split()
    assert keys and all("{" in k and "}" in k for k in keys)


def test_cluster_router_follows_moved_after_a_stale_slot_map(redis_cluster_url: str) -> None:
    """A slot map that says one master owns everything (as after a resharding the router has not seen)."""

    async def main() -> None:
        router = connect(redis_cluster_url, cluster=True, timeout_s=2.0)
        assert isinstance(router, SlotRouter)
        store = RedisQuotaStore(router)
        try:
            await store.ping()
            router._owners = [router._owners[0]] * len(router._owners)  # stale: every slot on the first master
            subjects = [f"key:{i:016x}" for i in range(12)]
            for s in subjects:
                assert (await store.check(s, "a", T0, Check(window_ms=HOUR, request_limit=1))).admitted
                assert not (await store.check(s, "b", T0, Check(window_ms=HOUR, request_limit=1))).admitted
            assert len(set(router._owners)) == 3, "MOVED replies refreshed the map"
        finally:
            await store.close()

    asyncio.run(main())
