"""Quotas through the whole mesh: one free key, 200 concurrent requests over 2 gateway processes, exactly 20
admitted (gRPC, then HTTP through Envoy); a small token budget never overspent; the edge's per-key limit."""

from __future__ import annotations

import asyncio
import collections
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from control.envoy_config import EdgeConfig, envoy_command, render
from control.process import ManagedProcess, free_port, free_ports, http_ok_probe
from llmesh.apikeys import hash_key, key_id_for
from llmesh.convert import tier_to_pb
from llmesh.types import Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2, limiter_pb2, limiter_pb2_grpc
from tests.fixtures.mesh import RunningMesh

N = 200
FREE_PER_HOUR = 20


@pytest.fixture(scope="module")
def second_gateway(mesh: RunningMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another gateway process on the same router, limiter, cache and Redis."""
    port = free_port()
    s = mesh.settings
    argv = [
        sys.executable, "-m", "gateway",
        "--port", str(port),
        "--router-url", f"127.0.0.1:{s.router.port}",
        "--redis-url", mesh.redis_url,
        "--limiter-url", mesh.limiter_target,
        "--cache-url", f"127.0.0.1:{s.cache.port}" if s.cache_enabled else "",
        "--metrics-port", "0",
        *mesh.tls_flags("gateway"),
    ]  # fmt: skip
    proc = ManagedProcess("gateway-2", argv, tmp_path_factory.mktemp("gateway-2") / "gateway.log").start()
    try:
        proc.wait_ready(mesh.health_probe(f"127.0.0.1:{port}"), timeout=60)
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def edge_over_both(mesh: RunningMesh, second_gateway: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An Envoy in front of both gateways, using the mesh's limiter for its edge limits."""
    port, admin = free_ports(2)
    host, gw2 = second_gateway.split(":")
    config = tmp_path_factory.mktemp("edge-2") / "envoy.yaml"
    config.write_text(
        render(
            EdgeConfig(
                listen_port=port,
                admin_port=admin,
                gateways=(("127.0.0.1", mesh.settings.gateway.port), (host, int(gw2))),
                limiter=("127.0.0.1", mesh.settings.limiter.port),
                upstream_tls=mesh.tls("envoy"),
            )
        )
    )
    envoy = str(Path(sys.executable).parent / "envoy")
    proc = ManagedProcess("envoy-2", [envoy, *envoy_command(config)[1:]], config.parent / "envoy.log").start()
    try:
        proc.wait_ready(http_ok_probe(f"http://127.0.0.1:{admin}/ready"), timeout=60)
        # Both gateways must be healthy in Envoy's eyes before the burst, or it would all go to one.
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=5).text.count("health_flags::healthy") < 2:
            assert time.monotonic() < deadline, "Envoy never saw both gateways healthy"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def prompt(i: int) -> list[common_pb2.ChatMessage]:
    # Distinct prompts: the response cache (which answers before the limiter is asked) must not serve any.
    return [common_pb2.ChatMessage(role="user", content=f"Say the number {i} back to me.")]


def quota_status(mesh: RunningMesh, key_id: str, tier: str) -> limiter_pb2.QuotaStatus:
    with mesh.channel(mesh.limiter_target) as channel:
        stub = limiter_pb2_grpc.LimiterServiceStub(channel)
        request = limiter_pb2.GetQuotaRequest(key_id=key_id, tier=tier_to_pb(Tier(tier)))
        return stub.GetQuota(request, timeout=5)


def test_exactly_20_of_200_concurrent_over_two_gateways_grpc(mesh: RunningMesh, second_gateway: str) -> None:
    api_key = mesh.create_key(Tier.FREE)
    metadata = (("authorization", f"Bearer {api_key}"),)

    async def one(stub: chat_pb2_grpc.ChatServiceStub, i: int) -> tuple[str, dict[str, str], dict[str, str]]:
        request = chat_pb2.ChatCompletionRequest(messages=prompt(i), max_tokens=1, temperature=0)
        call = stub.CreateChatCompletion(request, metadata=metadata, timeout=180)
        try:
            await call
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        initial = {k: str(v) for k, v in (await call.initial_metadata() or ())}
        trailing = {k: str(v) for k, v in (await call.trailing_metadata() or ())}
        return code, initial, trailing

    async def burst() -> list[tuple[str, dict[str, str], dict[str, str]]]:
        channels = [mesh.aio_channel(t) for t in (mesh.gateway_target, second_gateway)]
        stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
        try:
            return await asyncio.gather(*(one(stubs[i % 2], i) for i in range(N)))
        finally:
            for c in channels:
                await c.close()

    started = time.monotonic()
    results = asyncio.run(burst())
    # Every admission happened after `started` and every refusal before now: a correct wait lies in between.
    earliest = 3600 - math.ceil(time.monotonic() - started) - 1
    codes = [r[0] for r in results]
    seen = collections.Counter(codes)
    assert codes.count("OK") == FREE_PER_HOUR, seen
    # Every other request is refused: RESOURCE_EXHAUSTED, or on a starved machine the free tier's fail-closed
    # UNAVAILABLE when a limiter or Redis call outlives its budget (as in the HTTP test below; 2 of 200 seen on a
    # 2-core AMD EPYC with nothing else running): a refusal still, never an admission over the quota.
    assert codes.count("RESOURCE_EXHAUSTED") + codes.count("UNAVAILABLE") == N - FREE_PER_HOUR, seen
    assert codes.count("RESOURCE_EXHAUSTED") >= (N - FREE_PER_HOUR) // 2, seen
    # Each admitted request saw what was left after it: 19, 18, ..., 0, each exactly once.
    remaining = sorted(int(r[1]["x-ratelimit-remaining"]) for r in results if r[0] == "OK")
    assert remaining == list(range(FREE_PER_HOUR))
    assert all(r[1]["x-ratelimit-limit"] == "20" for r in results if r[0] == "OK")
    for _, _, trailing in (r for r in results if r[0] == "RESOURCE_EXHAUSTED"):
        assert earliest <= int(trailing["retry-after"]) <= 3600
        assert trailing["x-ratelimit-limit"] == "20" and trailing["x-ratelimit-remaining"] == "0"
        assert trailing["x-ratelimit-reset"] == trailing["retry-after"]
    status = quota_status(mesh, key_id_for(hash_key(api_key)), "free")
    assert {q.name: q.remaining for q in status.quotas}["requests_per_hour"] == 0


def test_exactly_20_of_200_concurrent_through_envoy_http_429(mesh: RunningMesh, edge_over_both: str) -> None:
    api_key = mesh.create_key(Tier.FREE)
    headers = {"authorization": f"Bearer {api_key}"}

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=N)
        async with httpx.AsyncClient(base_url=edge_over_both, timeout=180, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions",
                        headers=headers,
                        # Half streamed: a refusal must still be an HTTP 429, not a 200 with an error inside.
                        json={
                            "messages": [{"role": "user", "content": f"Say {i}."}],
                            "max_tokens": 1,
                            "stream": i % 2 == 1,
                        },
                    )
                    for i in range(N)
                )
            )

    started = time.monotonic()
    replies = asyncio.run(burst())
    earliest = 3600 - math.ceil(time.monotonic() - started) - 1
    statuses = [r.status_code for r in replies]
    seen = collections.Counter(statuses), {r.text[:200] for r in replies if r.status_code not in (200, 429)}
    assert statuses.count(200) == FREE_PER_HOUR, seen
    # Every other request is refused. On a starved machine (this suite beside a benchmark or another test run on 2
    # cores: 9 and 59 of 200 seen) some limiter or Redis calls outlive their budgets, and the free tier fails closed
    # with a 503 by design (docs/SECURITY.md): a refusal still, never an admission over the quota.
    overloaded = [r for r in replies if r.status_code == 503]
    assert all("unavailable" in r.text for r in overloaded), seen
    assert statuses.count(429) + len(overloaded) == N - FREE_PER_HOUR, seen
    assert statuses.count(429) >= (N - FREE_PER_HOUR) // 2, seen
    ok = [r for r in replies if r.status_code == 200]
    assert sorted(int(r.headers["x-ratelimit-remaining"]) for r in ok) == list(range(FREE_PER_HOUR))
    for r in replies:
        if r.status_code == 429:
            assert earliest <= int(r.headers["retry-after"]) <= 3600
            assert r.headers["x-ratelimit-limit"] == "20" and r.headers["x-ratelimit-remaining"] == "0"
            assert int(r.headers["x-ratelimit-reset"]) == int(r.headers["retry-after"])
            assert "20 requests per hour" in r.text


def test_small_token_budget_is_never_overspent_through_the_mesh(mesh: RunningMesh) -> None:
    api_key = mesh.create_key(Tier.PAID)
    key_id = key_id_for(hash_key(api_key))
    budget = 400
    policy = mesh.settings.limiter.policy_file
    assert policy is not None
    policy.write_text(policy.read_text() + f"\n[keys.{key_id}]\ntokens_per_hour = {budget}\n")
    deadline = time.monotonic() + 15
    while {q.name: q.limit for q in quota_status(mesh, key_id, "paid").quotas}["tokens_per_hour"] != budget:
        assert time.monotonic() < deadline, "the limiter did not pick up the policy change"
        time.sleep(0.2)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=mesh.http_base, timeout=180) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions",
                        headers={"authorization": f"Bearer {api_key}"},
                        json={"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 24},
                    )
                    for i in range(40)
                )
            )

    replies = asyncio.run(burst())
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(ok) + len(refused) == len(replies), [r.status_code for r in replies]
    assert ok and refused
    assert all("token budget" in r.text for r in refused)
    spent = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert spent <= budget
    # Settlement charged exactly what was used (it may land just after the reply).
    deadline = time.monotonic() + 15
    while True:
        status = quota_status(mesh, key_id, "paid")
        tokens = {q.name: q for q in status.quotas}["tokens_per_hour"]
        if status.active_reservations == 0 and tokens.limit - tokens.remaining == spent:
            break
        assert time.monotonic() < deadline, (status, spent)
        time.sleep(0.2)


def test_edge_per_key_limit_answers_429_before_the_gateway(mesh: RunningMesh) -> None:
    api_key = "lm-edge-test-not-a-real-key"  # the edge limits by key before anyone checks the key
    key_id = key_id_for(hash_key(api_key))
    policy = mesh.settings.limiter.policy_file
    assert policy is not None
    policy.write_text(policy.read_text() + f"\n[keys.{key_id}]\nedge_per_minute = 2\n")
    time.sleep(1.5)  # the limiter re-reads the file within a second
    replies = [
        httpx.get(f"{mesh.http_base}/v1/models", headers={"authorization": f"Bearer {api_key}"}, timeout=10)
        for _ in range(3)
    ]
    assert [r.status_code for r in replies] == [401, 401, 429]
    assert replies[2].headers["x-envoy-ratelimited"] == "true"
    assert replies[2].headers["x-ratelimit-limit"] == "2" and 1 <= int(replies[2].headers["retry-after"]) <= 60
    # Envoy's own refusal says why, in OpenAI's error shape like the gateway's (the edge Lua filter rewrites it).
    assert "edge rate limit exceeded" in replies[2].json()["error"]["message"]
    with grpc.insecure_channel(mesh.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
        chat_pb2_grpc.ChatServiceStub(channel).ListModels(
            chat_pb2.ListModelsRequest(), metadata=[("authorization", f"Bearer {api_key}")], timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details().startswith("edge rate limit exceeded")
