"""Time budgets on every dependency (llmesh/budgets.py): a hung (SIGSTOPped) cache, limiter or router costs a
request a bounded, configured time, with the outcome each one's outage calls for, and the mesh recovers on SIGCONT.

A stopped process keeps its sockets and its kernel still accepts connections, so nothing ever fails: only deadlines
and health checks can tell. Before these budgets, a hung cache cost every request its single-flight deadline (30 s),
a hung limiter failed every request with DEADLINE_EXCEEDED after 1 s, and a hung router after 10 s.

First the gateway's clients against a real cache service and limiter (exact timings, also a channel opened to an
already stopped process), then the whole mesh (a private one: these tests stop its parts) with the defaults
`llmesh up` uses: the cache bypassed within 200 ms, the limiter's outage policy within 100 ms, a clear UNAVAILABLE
within 2 s for a hung router. Margins are generous for a small, busy machine, and far below the old costs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest

from control.envoy_config import EdgeConfig
from control.process import ManagedProcess, free_port
from gateway.caching import GrpcCacheClient
from gateway.config import GatewaySettings
from gateway.limiter_outage import UNCHECKED, LimiterOutagePolicy, parse_tiers
from gateway.pipeline import Reservation
from gateway.quotas import GrpcQuotaGate
from limiter_service.policy import DEFAULT_POLICY_FILE
from llmesh.budgets import CHANNEL_OPTIONS, health_probe
from llmesh.errors import Unavailable
from llmesh.tls import aio_channel
from llmesh.types import ChatMessage, ChatRequest, Principal, RouteInfo, RouteKind, SamplingParams, Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.fixtures.cache import CacheServer
from tests.fixtures.limiter import LimiterProcess, RedisProcess
from tests.fixtures.mesh import RunningMesh, run_mesh

DEFAULTS = GatewaySettings()
# What scheduling on a loaded 2-core machine may add to a budget; the old costs were 1 s to 30 s more.
MARGIN_S = 0.4
# A request through the mesh also runs auth, routing and generation; those vary far more under load.
REQUEST_MARGIN_S = 2.5
# How soon the mesh must serve normally again after SIGCONT (breaker cooldown + reconnect + margin).
RECOVERY_S = 10.0


@contextmanager
def stopped(process: ManagedProcess) -> Iterator[None]:
    """The process SIGSTOPped (hung: sockets open, nothing answered) for the block; always continued after it."""
    assert process.pid is not None and process.alive()
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


async def timed(awaitable):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = await awaitable
    return time.monotonic() - started, result


# ---- the gateway's clients against real services ---------------------------------------------------------------

PRINCIPAL = Principal("budgets-" + uuid.uuid4().hex[:8], Tier.PAID)
ROUTE = RouteInfo("smollm2-135m", "tier default", RouteKind.TIER_DEFAULT)


def chat(text: str) -> ChatRequest:
    return ChatRequest("auto", (ChatMessage("user", text),), SamplingParams(max_tokens=4, temperature=0.0))


def test_a_hung_cache_is_bypassed_within_its_budget_and_used_again_after_sigcont(cache_server: CacheServer) -> None:
    budget = DEFAULTS.cache_hang_budget_s

    async def scenario() -> None:
        cache = GrpcCacheClient(cache_server.target, cooldown_s=1.0, hang_budget_s=budget)
        assert (await cache.lookup(PRINCIPAL, ROUTE, chat("warm up"))).store
        with stopped(cache_server.process):
            # Several requests at once: each pays the budget at most, none the 30 s single-flight deadline.
            results = await asyncio.gather(*(timed(cache.lookup(PRINCIPAL, ROUTE, chat(f"q{i}"))) for i in range(4)))
            for elapsed, lookup in results:
                assert lookup.answer is None and not lookup.store, "bypassed: a miss never stored"
                assert elapsed < budget + MARGIN_S, f"a hung cache cost a lookup {elapsed:.2f}s"
            # The breaker is open: the next ones do not wait at all.
            elapsed, _ = await timed(cache.lookup(PRINCIPAL, ROUTE, chat("q5")))
            assert elapsed < 0.05

            # A channel opened to the stopped process: TCP connects (the kernel accepts), nothing else happens.
            fresh = GrpcCacheClient(cache_server.target, hang_budget_s=budget)
            elapsed, lookup = await timed(fresh.lookup(PRINCIPAL, ROUTE, chat("q6")))
            assert lookup.answer is None and not lookup.store
            assert elapsed < budget + MARGIN_S, f"connecting to a stopped cache cost {elapsed:.2f}s"
            await fresh.close()
        started = time.monotonic()
        while not (await cache.lookup(PRINCIPAL, ROUTE, chat("after"))).store:
            assert time.monotonic() - started < RECOVERY_S, "the cache was never used again after SIGCONT"
            await asyncio.sleep(0.1)
        await cache.close()

    asyncio.run(scenario())


@pytest.fixture
def limiter(tmp_path: Path) -> Iterator[LimiterProcess]:
    from tests.fixtures.limiter import start_limiter_process

    redis = RedisProcess(free_port(), tmp_path).start()
    workdir = tmp_path / "limiter"
    workdir.mkdir()
    process = start_limiter_process(redis.url, DEFAULT_POLICY_FILE.read_text(), workdir)
    try:
        yield process
    finally:
        process.process.stop(grace=5)
        redis.stop()


def test_a_hung_limiter_gets_the_tiers_outage_policy_within_its_budget(limiter: LimiterProcess) -> None:
    budget = DEFAULTS.limiter_hang_budget_s
    free, paid = Principal(uuid.uuid4().hex[:16], Tier.FREE), Principal(uuid.uuid4().hex[:16], Tier.PAID)

    async def scenario() -> None:
        gate = GrpcQuotaGate(limiter.target)
        probe_channel = aio_channel(limiter.target, None, CHANNEL_OPTIONS)
        quotas = LimiterOutagePolicy(
            gate,
            health_probe(probe_channel),
            parse_tiers(DEFAULTS.limiter_fail_open_tiers),
            hang_budget_s=budget,
            confirm_s=DEFAULTS.limiter_timeout_s,
            cooldown_s=1.0,
        )
        checked = await quotas.reserve(free, "r-1", 5, 5)
        assert checked.id != UNCHECKED
        await quotas.settle(checked, 7)
        with stopped(limiter.process):
            elapsed, admitted = await timed(quotas.reserve(paid, "r-2", 5, 5))
            assert admitted.id == UNCHECKED, "paid fails open"
            assert elapsed < budget + MARGIN_S, f"a hung limiter cost a paid request {elapsed:.2f}s"
            # Free fails closed once the silence is confirmed (no health answer for limiter_timeout_s), not on the
            # first 100 ms of it: a busy limiter must not turn into refusals.
            started = time.monotonic()
            with pytest.raises(Unavailable, match="free tier is not served"):
                await quotas.reserve(free, "r-3", 5, 5)
            assert time.monotonic() - started < 2 * DEFAULTS.limiter_timeout_s + MARGIN_S
            # Confirmed: the breaker is open and every tier gets its policy at once.
            for principal in (free, paid):
                elapsed, outcome = await timed(
                    asyncio.gather(quotas.reserve(principal, "r-4", 5, 5), return_exceptions=True)
                )
                assert elapsed < 0.05 + MARGIN_S / 4, (
                    f"{principal.tier.value} waited {elapsed:.2f}s with the breaker open"
                )
                assert isinstance(outcome[0], Unavailable if principal is free else Reservation), outcome
            await quotas.settle(admitted, 10)  # nothing to settle, nothing waited for
        started = time.monotonic()
        while True:
            try:
                if (await quotas.reserve(free, "r-4", 5, 5)).id != UNCHECKED:
                    break
            except Unavailable:
                pass
            assert time.monotonic() - started < RECOVERY_S, "quotas were never checked again after SIGCONT"
            await asyncio.sleep(0.1)
        await gate.close()
        await probe_channel.close()

    asyncio.run(scenario())


# ---- the whole mesh ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_mesh(triton_server, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:  # type: ignore[no-untyped-def]
    """A private mesh: these tests stop its parts."""
    yield from run_mesh(triton_server, redis_url, tmp_path_factory, "budgets")


def part(mesh: RunningMesh, name: str) -> ManagedProcess:
    return next(p for p in mesh.mesh.processes if p.name == name)


def ask(
    mesh: RunningMesh, key: str, text: str
) -> tuple[float, chat_pb2.ChatCompletion | grpc.RpcError, dict[str, str]]:
    """One completion from the gateway: (seconds, the answer or the error, initial metadata)."""
    request = chat_pb2.ChatCompletionRequest(
        messages=[common_pb2.ChatMessage(role="user", content=text)], temperature=0, max_tokens=2
    )
    with mesh.channel(mesh.gateway_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        started = time.monotonic()
        try:
            reply, call = stub.CreateChatCompletion.with_call(
                request, metadata=[("authorization", f"Bearer {key}")], timeout=60
            )
        except grpc.RpcError as err:
            return time.monotonic() - started, err, {}
        return time.monotonic() - started, reply, dict(call.initial_metadata())


def edge_ask(mesh: RunningMesh, key: str) -> tuple[float, httpx.Response]:
    """One completion through Envoy's OpenAI-compatible HTTP API: (seconds, the response)."""
    body = {"model": "auto", "messages": [{"role": "user", "content": f"Hi ({uuid.uuid4().hex[:6]})"}], "max_tokens": 2}
    started = time.monotonic()
    reply = httpx.post(
        f"{mesh.http_base}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60
    )
    return time.monotonic() - started, reply


def baseline(mesh: RunningMesh, key: str) -> float:
    """The slowest of a few normal requests now: what the machine's load adds to any request."""
    times = []
    for _ in range(3):
        elapsed, reply, _ = ask(mesh, key, f"Say hi ({uuid.uuid4().hex[:6]})")
        assert isinstance(reply, chat_pb2.ChatCompletion), reply
        times.append(elapsed)
    return max(times)


def recovers(check: Callable[[], tuple[bool, object]], what: str) -> float:
    """Seconds until `check` passes; it returns (passed, what it saw)."""
    started = time.monotonic()
    while not (outcome := check())[0]:
        assert time.monotonic() - started < RECOVERY_S, f"{what} after SIGCONT; last: {outcome[1]}"
        time.sleep(0.2)
    return time.monotonic() - started


def test_mesh_with_a_hung_cache_answers_normally(budget_mesh: RunningMesh) -> None:
    key = budget_mesh.create_key(Tier.PAID)
    normal = baseline(budget_mesh, key)
    with stopped(part(budget_mesh, "cache")), ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda i: ask(budget_mesh, key, f"Name a color ({i} {uuid.uuid4().hex[:6]})"), range(4))
        )
        results.append(ask(budget_mesh, key, f"Name a fruit ({uuid.uuid4().hex[:6]})"))
    for elapsed, reply, _ in results:
        assert isinstance(reply, chat_pb2.ChatCompletion), f"a hung cache must not fail a request: {reply}"
        assert not reply.cache
        limit = normal + DEFAULTS.cache_hang_budget_s + REQUEST_MARGIN_S
        assert elapsed < limit, f"a hung cache cost a request {elapsed:.2f}s (normal {normal:.2f}s)"
    print(f"cache hung: {[round(r[0], 2) for r in results]}s per request, normal {normal:.2f}s")

    question = f"Name a planet ({uuid.uuid4().hex[:6]})"

    def cached() -> tuple[bool, object]:
        _, reply, _ = ask(budget_mesh, key, question)
        return isinstance(reply, chat_pb2.ChatCompletion) and reply.cache == "exact", reply

    print(f"cache used again {recovers(cached, 'the cache was never used again'):.2f}s after SIGCONT")


def test_mesh_with_a_hung_limiter_applies_each_tiers_outage_policy(budget_mesh: RunningMesh) -> None:
    paid, free = budget_mesh.create_key(Tier.PAID), budget_mesh.create_key(Tier.FREE)
    normal = baseline(budget_mesh, paid)
    _, _, headers = ask(budget_mesh, free, f"Say hi ({uuid.uuid4().hex[:6]})")
    assert "x-ratelimit-remaining" in headers, "quotas are checked while the limiter answers"
    limit = normal + DEFAULTS.limiter_hang_budget_s + REQUEST_MARGIN_S
    with stopped(part(budget_mesh, "limiter")):
        paid_results = [ask(budget_mesh, paid, f"Name a color ({uuid.uuid4().hex[:6]})") for _ in range(3)]
        free_results = [ask(budget_mesh, free, f"Name a color ({uuid.uuid4().hex[:6]})") for _ in range(3)]
        # Through the edge too, whose own rate-limit call to the limiter times out and lets requests through.
        edge = {tier: edge_ask(budget_mesh, key) for tier, key in (("paid", paid), ("free", free))}
    edge_limit = limit + EdgeConfig.rate_limit_timeout_s
    assert edge["paid"][1].status_code == 200 and edge["paid"][0] < edge_limit, edge["paid"]
    assert edge["free"][1].status_code == 503 and edge["free"][0] < edge_limit + 2 * DEFAULTS.limiter_timeout_s
    error = edge["free"][1].json()["error"]
    assert "free tier is not served" in error["message"], error
    for elapsed, reply, headers in paid_results:
        assert isinstance(reply, chat_pb2.ChatCompletion), f"paid fails open: {reply}"
        assert "x-ratelimit-remaining" not in headers, "admitted without a quota check"
        assert elapsed < limit, f"a hung limiter cost a paid request {elapsed:.2f}s (normal {normal:.2f}s)"
    for elapsed, reply, _ in free_results:
        assert isinstance(reply, grpc.RpcError), "free fails closed"
        assert reply.code() == grpc.StatusCode.UNAVAILABLE, reply  # type: ignore[attr-defined]
        assert "free tier is not served" in (reply.details() or "")  # type: ignore[attr-defined]
        assert elapsed < limit + 2 * DEFAULTS.limiter_timeout_s, "refused once the outage is confirmed"
    print(
        f"limiter hung: paid {[round(r[0], 2) for r in paid_results]}s, free {[round(r[0], 2) for r in free_results]}s"
    )

    def checked() -> tuple[bool, object]:
        _, reply, headers = ask(budget_mesh, free, f"Say hi ({uuid.uuid4().hex[:6]})")  # not a cache hit
        return isinstance(reply, chat_pb2.ChatCompletion) and "x-ratelimit-remaining" in headers, (reply, headers)

    print(f"quotas checked again {recovers(checked, 'quotas were never checked again'):.2f}s after SIGCONT")


def test_mesh_with_a_hung_router_fails_fast_and_clearly(budget_mesh: RunningMesh) -> None:
    key = budget_mesh.create_key(Tier.PAID)
    baseline(budget_mesh, key)
    budget = DEFAULTS.router_hang_budget_s
    with stopped(part(budget_mesh, "router")):
        results = [ask(budget_mesh, key, f"Name a color ({uuid.uuid4().hex[:6]})") for _ in range(4)]
    for elapsed, reply, _ in results:
        assert isinstance(reply, grpc.RpcError), "nothing can answer without the router"
        assert reply.code() == grpc.StatusCode.UNAVAILABLE, reply  # type: ignore[attr-defined]
        assert "router did not answer" in (reply.details() or "")  # type: ignore[attr-defined]
        assert elapsed < budget + REQUEST_MARGIN_S, f"a hung router held a request {elapsed:.2f}s"
    # After the first, the breaker fails requests at once instead of each paying the budget.
    assert statistics.median(r[0] for r in results[1:]) < budget / 2
    print(f"router hung: {[round(r[0], 2) for r in results]}s per request")

    def answers() -> tuple[bool, object]:
        _, reply, _ = ask(budget_mesh, key, "Say hi")
        return isinstance(reply, chat_pb2.ChatCompletion), reply

    print(f"router answers again {recovers(answers, 'the router never answered again'):.2f}s after SIGCONT")
