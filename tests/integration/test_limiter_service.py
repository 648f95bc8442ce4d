"""The limiter as a real process against real Redis: the gRPC API, hot policy reload, the admin CLI, Redis Cluster,
and what happens when Redis hangs, dies and comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from control.envoy_config import EdgeConfig, envoy_command, render
from control.process import ManagedProcess, free_port, free_ports, http_ok_probe
from gateway.auth import RedisApiKeyStore
from limiter_service.policy import DEFAULT_POLICY_FILE
from llmesh.apikeys import hash_key, key_id_for
from llmesh.types import Tier
from llmesh.v1 import common_pb2, limiter_pb2, limiter_pb2_grpc
from tests.fixtures.limiter import LimiterProcess, RedisProcess

POLICY = """
[tiers.free]
requests_per_hour = 5
tokens_per_hour = 1000
on_store_failure = "closed"
[tiers.paid]
requests_per_hour = 5
on_store_failure = "open"
[tiers.enterprise]
requests_per_hour = "unlimited"
on_store_failure = "open"
[edge]
per_ip_per_minute = 100
"""


def new_key_id() -> str:
    return uuid.uuid4().hex[:16]


def tier_pb(tier: str) -> common_pb2.Tier:
    """The wire enum of a tier name; "" is TIER_UNSPECIFIED."""
    return common_pb2.Tier.Value(f"TIER_{tier.upper()}") if tier else common_pb2.TIER_UNSPECIFIED


def reserve(
    stub: limiter_pb2_grpc.LimiterServiceStub, key_id: str, tier: str, **kw: int
) -> limiter_pb2.ReserveResponse:
    return stub.Reserve(
        limiter_pb2.ReserveRequest(
            key_id=key_id, tier=tier_pb(tier), prompt_tokens=kw.get("prompt", 10), max_tokens=kw.get("max", 10)
        ),
        timeout=5,
    )


def metric(limiter: LimiterProcess, name: str) -> float:
    for line in httpx.get(limiter.metrics_url, timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        time.sleep(0.05)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def timed(call: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    try:
        result: object = call()
    except grpc.RpcError as err:
        result = err
    return time.perf_counter() - start, result


def test_reserve_settle_status_reset_and_hot_reload(
    private_redis: RedisProcess, start_limiter: Callable[..., LimiterProcess]
) -> None:
    limiter = start_limiter(private_redis.url, POLICY)
    key_id = new_key_id()
    with grpc.insecure_channel(limiter.target) as channel:
        stub = limiter_pb2_grpc.LimiterServiceStub(channel)
        started = time.monotonic()
        first = reserve(stub, key_id, "free", prompt=100, max=400)
        assert first.allowed and not first.degraded
        quotas = {q.name: q for q in first.quotas}
        assert quotas["requests_per_hour"].remaining == 4 and quotas["tokens_per_hour"].remaining == 500
        assert stub.Settle(limiter_pb2.SettleRequest(reservation_id=first.reservation_id, used_tokens=150)).settled
        assert not stub.Settle(limiter_pb2.SettleRequest(reservation_id=first.reservation_id, used_tokens=150)).settled
        status = stub.GetQuota(limiter_pb2.GetQuotaRequest(key_id=key_id, tier=common_pb2.TIER_FREE))
        assert {q.name: q.remaining for q in status.quotas} == {"requests_per_hour": 4, "tokens_per_hour": 850}
        assert status.subject == f"key:{key_id}" and status.on_store_failure == "closed"

        for _ in range(4):
            assert reserve(stub, key_id, "free").allowed
        refused = reserve(stub, key_id, "free")
        assert not refused.allowed and refused.refused_by == "requests_per_hour"
        # The first use was admitted at most `elapsed_ms` ago.
        elapsed_ms = int((time.monotonic() - started) * 1000)
        assert "allows 5 requests per hour" in refused.message
        assert 3600_000 - elapsed_ms - 1 <= refused.retry_after_ms <= 3600_000

        with pytest.raises(grpc.RpcError) as bad:
            reserve(stub, key_id, "")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tier must be one of" in (bad.value.details() or "")
        with pytest.raises(grpc.RpcError) as too_big:
            reserve(stub, key_id, "free", prompt=600, max=600)
        assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lower max_tokens" in (
            too_big.value.details() or ""
        )

        # A policy change takes effect without a restart; a broken file is refused and the last good one stays.
        limiter.policy_file.write_text(POLICY + f"\n[keys.{key_id}]\nrequests_per_hour = 7\n")
        wait_for(lambda: reserve(stub, key_id, "free").allowed, 10, "reloaded")
        limiter.policy_file.write_text("[tiers.free\n")
        wait_for(lambda: "policy file refused" in limiter.log_text(), 10, "refused")
        assert reserve(stub, key_id, "free").allowed  # still 7 per hour
        assert not reserve(stub, key_id, "free").allowed
        assert metric(limiter, 'llmesh_limiter_policy_reloads_total{result="refused"}') == 1

        reset = stub.ResetQuota(limiter_pb2.GetQuotaRequest(key_id=key_id, tier=common_pb2.TIER_FREE))
        assert {q.name: q.remaining for q in reset.quotas}["requests_per_hour"] == 7
        assert reserve(stub, key_id, "free").allowed


def test_quota_cli_show_and_reset(private_redis: RedisProcess, start_limiter: Callable[..., LimiterProcess]) -> None:
    limiter = start_limiter(private_redis.url, POLICY)

    async def create() -> str:
        client = aioredis.from_url(private_redis.url)
        try:
            return await RedisApiKeyStore(client).create(Tier.FREE, "cli test")
        finally:
            await client.aclose()

    api_key = asyncio.run(create())
    key_id = key_id_for(hash_key(api_key))
    with grpc.insecure_channel(limiter.target) as channel:
        stub = limiter_pb2_grpc.LimiterServiceStub(channel)
        for _ in range(2):
            reserve(stub, key_id, "free")
    common = ["--limiter-url", limiter.target, "--redis-url", private_redis.url]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "control.cli", "quota", *args, *common]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    by_key = cli("show", api_key)
    assert by_key.returncode == 0, by_key.stderr
    assert f"key {key_id} (free tier)" in by_key.stdout and "Redis ok" in by_key.stdout
    assert api_key not in by_key.stdout
    row = next(line for line in by_key.stdout.splitlines() if "requests_per_hour" in line).split()
    assert row[1:3] == ["5", "3"]
    by_id = cli("show", key_id)  # a key id: the tier is found by its hash prefix
    assert by_id.returncode == 0 and by_id.stdout.splitlines()[0] == by_key.stdout.splitlines()[0]

    reset = cli("reset", key_id)
    assert reset.returncode == 0, reset.stderr
    assert f"reset key:{key_id}" in reset.stdout
    row = next(line for line in reset.stdout.splitlines() if "requests_per_hour" in line).split()
    assert row[1:3] == ["5", "5"]

    unknown = cli("show", "0000000000000000")
    assert unknown.returncode == 1 and "no API key" in unknown.stderr


def test_limiter_service_on_a_redis_cluster(
    redis_cluster_url: str, start_limiter: Callable[..., LimiterProcess]
) -> None:
    limiter = start_limiter(redis_cluster_url, POLICY, "--redis-cluster", "true")
    assert limiter.health("redis")
    with grpc.insecure_channel(limiter.target) as channel:
        stub = limiter_pb2_grpc.LimiterServiceStub(channel)
        keys = [new_key_id() for _ in range(6)]  # spread over the masters
        for key_id in keys:
            results = [reserve(stub, key_id, "free").allowed for _ in range(6)]
            assert results == [True] * 5 + [False]


def test_redis_outage_each_policy_as_written_fast_and_recovers(
    private_redis: RedisProcess, start_limiter: Callable[..., LimiterProcess]
) -> None:
    """Redis hangs (SIGSTOP), then dies and comes back. Free fails closed, paid and enterprise fail open with
    local limits; checks stay fast during the outage; health and metrics say degraded; limits apply again after."""
    limiter = start_limiter(private_redis.url, POLICY)
    assert private_redis.process is not None and private_redis.process.pid is not None
    redis_pid = private_redis.process.pid
    paid, free, enterprise = new_key_id(), new_key_id(), new_key_id()
    with grpc.insecure_channel(limiter.target) as channel:
        stub = limiter_pb2_grpc.LimiterServiceStub(channel)
        for _ in range(5):
            assert reserve(stub, paid, "paid").allowed
        assert not reserve(stub, paid, "paid").allowed
        baseline = [timed(lambda: reserve(stub, enterprise, "enterprise"))[0] for _ in range(300)]
        assert limiter.health("redis") and metric(limiter, "llmesh_limiter_redis_degraded") == 0

        os.kill(redis_pid, signal.SIGSTOP)  # hung: connections open, no answers
        try:
            during: list[float] = []
            outcomes: dict[str, list[object]] = {"free": [], "paid": [], "enterprise": []}
            for i in range(600):
                tier, key = [("enterprise", enterprise), ("free", free), ("paid", paid)][i % 3]
                elapsed, result = timed(lambda t=tier, k=key: reserve(stub, k, t))  # type: ignore[misc]
                during.append(elapsed)
                outcomes[tier].append(result)
            assert all(
                isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.UNAVAILABLE for r in outcomes["free"]
            ), "free fails closed"
            assert "fails closed" in outcomes["free"][-1].details()  # type: ignore[union-attr]
            paid_allowed = [isinstance(r, limiter_pb2.ReserveResponse) and r.allowed for r in outcomes["paid"]]
            assert sum(paid_allowed) == 5 and paid_allowed[:5] == [True] * 5, "paid: local limits, 5 per hour"
            assert all(isinstance(r, limiter_pb2.ReserveResponse) and r.allowed for r in outcomes["enterprise"])
            assert all(r.degraded for r in outcomes["enterprise"][5:])  # type: ignore[union-attr]
            added = p99(during) - p99(baseline)
            assert added < 0.050, f"p99 added latency {added * 1000:.1f} ms during the outage"
            assert not limiter.health("redis") and limiter.health("llmesh.v1.LimiterService")
            assert metric(limiter, "llmesh_limiter_redis_degraded") == 1
        finally:
            os.kill(redis_pid, signal.SIGCONT)

        wait_for(lambda: limiter.health("redis"), 10, "recovered after SIGCONT")
        assert metric(limiter, "llmesh_limiter_redis_degraded") == 0
        assert not reserve(stub, paid, "paid").allowed, "Redis' count rules again: paid is still at its limit"
        assert reserve(stub, free, "free").allowed

        private_redis.stop()  # dead: connection refused, and its data is gone when it comes back
        wait_for(lambda: not limiter.health("redis"), 10, "degraded after kill")
        with pytest.raises(grpc.RpcError) as closed:
            reserve(stub, free, "free")
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
        private_redis.start()
        wait_for(lambda: limiter.health("redis"), 10, "recovered after restart")
        results = [reserve(stub, free, "free").allowed for _ in range(6)]
        assert results == [True] * 5 + [False], "limits enforced again on the fresh Redis"


def test_limiter_starts_while_redis_is_down_and_recovers_by_itself(
    private_redis: RedisProcess, start_limiter: Callable[..., LimiterProcess]
) -> None:
    private_redis.stop()
    limiter = start_limiter(private_redis.url, DEFAULT_POLICY_FILE.read_text())
    assert limiter.health("llmesh.v1.LimiterService") and not limiter.health("redis")
    key_id = new_key_id()
    with grpc.insecure_channel(limiter.target) as channel:
        stub = limiter_pb2_grpc.LimiterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as closed:
            reserve(stub, key_id, "free")
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
        local = reserve(stub, key_id, "paid")
        assert local.allowed and local.degraded
        private_redis.start()
        wait_for(lambda: limiter.health("redis"), 10, "recovered")
        admitted = reserve(stub, key_id, "free")
        assert admitted.allowed and not admitted.degraded
    assert "serving in degraded mode" in limiter.log_text() and "circuit closed" in limiter.log_text()


def test_envoy_limits_per_ip_before_the_gateway_and_fails_open(
    private_redis: RedisProcess, start_limiter: Callable[..., LimiterProcess], tmp_path: Path
) -> None:
    """A real Envoy with the rendered edge config, in front of a gateway address where nothing listens: requests
    under the per-IP limit reach the (missing) gateway, 503; the next is refused by the edge, 429; with the limiter
    gone, Envoy lets requests through (failure_mode_deny: false)."""
    limiter = start_limiter(private_redis.url, POLICY.replace("per_ip_per_minute = 100", "per_ip_per_minute = 3"))
    port, admin = free_ports(2)
    config = tmp_path / "envoy.yaml"
    edge = EdgeConfig(
        listen_port=port, admin_port=admin, gateways=(("127.0.0.1", free_port()),), limiter=("127.0.0.1", limiter.port)
    )
    config.write_text(render(edge))
    envoy = ManagedProcess(
        "envoy", [str(Path(sys.executable).parent / "envoy"), *envoy_command(config)[1:]], tmp_path / "envoy.log"
    )
    envoy.start()
    try:
        envoy.wait_ready(http_ok_probe(f"http://127.0.0.1:{admin}/ready"), timeout=60)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        # A forged x-forwarded-for must not buy a fresh per-IP budget.
        statuses = [
            httpx.post(url, json={"messages": []}, headers={"x-forwarded-for": f"10.0.0.{i}"}, timeout=10)
            for i in range(4)
        ]
        assert [r.status_code for r in statuses] == [503, 503, 503, 429]
        refused = statuses[-1]
        assert refused.headers["x-ratelimit-limit"] == "3" and refused.headers["x-ratelimit-remaining"] == "0"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        limiter.process.stop(grace=5)
        assert httpx.post(url, json={"messages": []}, timeout=10).status_code == 503, "fails open without the limiter"
    finally:
        envoy.stop()
