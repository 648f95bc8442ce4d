"""Quota accounting that survives faults: the gateway's real QuotaGate against the limiter as a real process and a
private Redis that is paused (`CLIENT PAUSE ... ALL`) and stopped (SIGSTOP ... SIGCONT) while requests flow.

A paused or stopped Redis still runs what it had queued once it resumes, after the limiter gave up on the reply: a
reserve whose outcome was unknown. Afterwards Redis must hold exactly what the admitted requests used: no open
reservation (concurrency back to 0), no reserved tokens, every admitted request charged what it settled with, and
no request that the gateway did not get counted. (Design: limiter_service/lua/release.lua, limiter_service/core.py.)

And through the whole mesh: single-flight waiters (identical requests waiting for one generation in the cache) hold
their key's concurrency slots while they wait (gateway/pipeline.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from control.process import ManagedProcess, free_port
from gateway.pipeline import Reservation
from gateway.quotas import GrpcQuotaGate
from limiter_service.redis_store import redis_keys
from llmesh.apikeys import hash_key, key_id_for
from llmesh.convert import tier_to_pb
from llmesh.errors import MeshError
from llmesh.types import Principal, Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2, limiter_pb2, limiter_pb2_grpc
from tests.fixtures.limiter import LimiterProcess, RedisProcess
from tests.fixtures.mesh import RunningMesh

# A prompt every test variant answers at length (SmolLM2 int8, paid keys' stand-in default when no Qwen is served,
# may stop counting to 1000 after a few numbers, ending a stream before the test cuts it).
LONG_ANSWER = "Write a long story about a dragon who learns to cook."

# Free fails closed while Redis is down (requests refused, their Redis reservations must be released); paid fails
# open (decided by the limiter's local store: its Redis reservations too must be released). Limits are far above
# the load, so every refusal is a fault's, except the concurrency check at the end.
STREAMS = 24
POLICY = f"""
[tiers.free]
requests_per_hour = 100000
tokens_per_hour = 100000000
max_concurrent_streams = {STREAMS}
on_store_failure = "closed"
[tiers.paid]
requests_per_hour = 100000
tokens_per_hour = 100000000
max_concurrent_streams = {STREAMS}
on_store_failure = "open"
[tiers.enterprise]
requests_per_hour = "unlimited"
[edge]
per_ip_per_minute = 100000
"""
PROMPT, MAX_TOKENS = 10, 50
WORKERS = 16


@dataclass
class Tally:
    """What the gateway saw: reservations it got and what each one used, and requests that got none."""

    used: dict[str, int] = field(default_factory=dict)  # reservation id -> tokens it was settled with
    failed: int = 0
    cancelled: int = 0

    @property
    def requests(self) -> int:
        return len(self.used) + self.failed + self.cancelled

    def remote(self, key_id: str) -> dict[str, int]:
        """nonce -> used, for the reservations Redis holds (ids "r/<tier>/key:<key_id>/<nonce>")."""
        prefix = "r/"
        return {
            rid.rsplit("/", 1)[1]: used
            for rid, used in self.used.items()
            if rid.startswith(prefix) and rid.split("/")[2] == f"key:{key_id}"
        }


def metric_sum(limiter: LimiterProcess, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(limiter.metrics_url, timeout=5).text.splitlines():
        if not (line.startswith(name + " ") or line.startswith(name + "{")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def one_request(gate: GrpcQuotaGate, principal: Principal, n: int, tally: Tally, rng: random.Random) -> None:
    reserve = asyncio.ensure_future(gate.reserve(principal, f"req-{n}", PROMPT, MAX_TOKENS))
    if n % 5 == 0:  # the client goes away while the limiter decides
        await asyncio.sleep(rng.uniform(0, 0.02))
        reserve.cancel()
    try:
        reservation: Reservation = await reserve
    except asyncio.CancelledError:
        tally.cancelled += 1
        return
    except MeshError:  # UNAVAILABLE (fails closed), DEADLINE_EXCEEDED: no reservation for this request
        tally.failed += 1
        return
    await asyncio.sleep(rng.uniform(0, 0.03))  # generating
    used = PROMPT + rng.randint(0, MAX_TOKENS)
    await gate.settle(reservation, used)
    tally.used[reservation.id] = used


async def load_with_faults(limiter: LimiterProcess, redis: RedisProcess, principals: list[Principal]) -> Tally:
    """WORKERS clients send requests back to back for ~5 s; meanwhile Redis is paused 1.2 s, then stopped 1.2 s."""
    gate = GrpcQuotaGate(limiter.target, timeout_s=1.0)
    admin = aioredis.from_url(redis.url)
    tally, rng = Tally(), random.Random(11)
    counter = iter(range(10**9))
    stop_at = time.monotonic() + 5.0

    async def worker(principal: Principal) -> None:
        while time.monotonic() < stop_at:
            await one_request(gate, principal, next(counter), tally, rng)
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def faults() -> None:
        assert redis.process is not None and redis.process.popen is not None
        pid = redis.process.popen.pid
        await asyncio.sleep(0.5)
        await admin.execute_command("CLIENT", "PAUSE", "1200", "ALL")
        await asyncio.sleep(2.0)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.2)
        finally:
            os.kill(pid, signal.SIGCONT)

    try:
        await asyncio.gather(faults(), *(worker(principals[i % len(principals)]) for i in range(WORKERS)))
    finally:
        await gate.close(timeout_s=15.0)  # releases and settlements still being retried
        await admin.aclose()
    return tally


async def redis_state(url: str, key_id: str) -> tuple[int, int, dict[str, int], set[str]]:
    """(open reservations, tokens charged, member -> tokens charged, members counted as requests)."""
    log, tok, act, _ = redis_keys(f"key:{key_id}")
    client = aioredis.from_url(url, decode_responses=True)
    try:
        active = await client.zcard(act)
        charges = await client.hgetall(tok)
        members = {str(m) for m in await client.zrange(log, 0, -1)}
    finally:
        await client.aclose()
    total = int(charges.pop("#", 0))
    charges.pop("e", None)
    return active, total, {str(m): int(v) for m, v in charges.items()}, members


def test_no_reservation_leaks_when_redis_pauses_and_stops_under_load(
    private_redis: RedisProcess, start_limiter: Callable[..., LimiterProcess]
) -> None:
    limiter = start_limiter(private_redis.url, POLICY)
    principals = [Principal(uuid.uuid4().hex[:16], Tier.FREE), Principal(uuid.uuid4().hex[:16], Tier.PAID)]

    async def main() -> None:
        tally = await load_with_faults(limiter, private_redis, principals)
        # The limiter replays what it queued (settlements, releases) once Redis answers again.
        await wait_for(
            lambda: (
                metric_sum(limiter, "llmesh_limiter_redis_degraded") == 0
                and metric_sum(limiter, "llmesh_limiter_settlements_pending") == 0
                and metric_sum(limiter, "llmesh_limiter_releases_pending") == 0
            ),
            20,
            "the limiter to replay its pending settlements and releases",
        )
        own = metric_sum(limiter, "llmesh_limiter_releases_total", origin="limiter", result="queued")
        asked = metric_sum(limiter, "llmesh_limiter_releases_total", origin="gateway") - metric_sum(
            limiter, "llmesh_limiter_releases_total", origin="gateway", result="queued"
        )
        undone = metric_sum(limiter, "llmesh_limiter_releases_total", result="released")
        releases = own + asked
        print(
            f"\nrequests={tally.requests} admitted={len(tally.used)} failed={tally.failed} "
            f"cancelled={tally.cancelled} limiter_releases={own:.0f} gateway_releases={asked:.0f} "
            f"undone_in_redis={undone:.0f}"
        )
        assert tally.failed > 0, "the faults never reached a request: the test did not test anything"
        for principal in principals:
            expected = tally.remote(principal.key_id)
            active, charged, charges, members = await redis_state(private_redis.url, principal.key_id)
            print(
                f"{principal.tier.value}: redis reservations={len(expected)} leaked_streams={active} "
                f"charged={charged} used={sum(expected.values())} counted={len(members)}"
            )
            assert active == 0, "a concurrency slot leaked"
            assert members == set(expected), "Redis counts exactly the requests admitted there"
            assert charges == expected, "each admitted request is charged what it used, nothing else is charged"
            assert charged == sum(expected.values()) <= sum(tally.used.values())
        assert releases > 0, "no reservation had an unknown outcome: the test did not test anything"

        # No slot leaked, seen as the limit: exactly STREAMS requests are admitted at once, then one is refused.
        gate = GrpcQuotaGate(limiter.target)
        try:
            held = [await gate.reserve(principals[0], f"after-{i}", 1, 1) for i in range(STREAMS)]
            with pytest.raises(MeshError, match="concurrency"):
                await gate.reserve(principals[0], "after-refused", 1, 1)
            for reservation in held:
                await gate.settle(reservation, 2)
        finally:
            await gate.close()

    asyncio.run(main())


def test_single_flight_waiters_hold_concurrency_slots_through_the_mesh(mesh: RunningMesh) -> None:
    """Identical requests wait for the first one's answer in the cache; each waiter holds one of its key's
    concurrency slots while it waits, so with 2 slots one request generates, one waits, and the rest are refused."""
    api_key = mesh.create_key(Tier.PAID)
    key_id = key_id_for(hash_key(api_key))
    policy = mesh.settings.limiter.policy_file
    assert policy is not None
    policy.write_text(policy.read_text() + f"\n[keys.{key_id}]\nmax_concurrent_streams = 2\n")

    def status() -> limiter_pb2.QuotaStatus:
        with mesh.channel(mesh.limiter_target) as channel:
            request = limiter_pb2.GetQuotaRequest(key_id=key_id, tier=tier_to_pb(Tier.PAID))
            return limiter_pb2_grpc.LimiterServiceStub(channel).GetQuota(request, timeout=5)

    deadline = time.monotonic() + 15
    while {q.name: q.limit for q in status().quotas}.get("concurrent_streams") != 2:
        assert time.monotonic() < deadline, "the limiter did not pick up the policy change"
        time.sleep(0.2)

    request = chat_pb2.ChatCompletionRequest(
        messages=[common_pb2.ChatMessage(role="user", content=f"{LONG_ANSWER} ({uuid.uuid4().hex[:6]})")],
        temperature=0,
        max_tokens=300,
    )
    metadata = [("authorization", f"Bearer {api_key}")]

    def follower() -> str:
        with grpc.insecure_channel(mesh.grpc_target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            try:
                chunks = list(stub.StreamChatCompletion(request, metadata=metadata, timeout=120))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert "concurrency" in (err.details() or "")
                return "refused"
            return chunks[0].cache or "generated"

    with grpc.insecure_channel(mesh.grpc_target) as channel:
        leader = chat_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(request, metadata=metadata, timeout=120)
        first = next(leader)  # generating: the leader holds the single-flight lock and one slot
        assert first.cache == ""
        with ThreadPoolExecutor(max_workers=5) as pool:
            followers = list(pool.map(lambda _: follower(), range(5)))
        rest = list(leader)
    completion = next(c.usage.completion_tokens for c in reversed(rest) if c.HasField("usage"))
    # Precondition: the leader was still generating while the followers came (else they were plain cache hits).
    assert "exact" in followers, (followers, completion)
    assert sorted(followers) == ["exact"] + ["refused"] * 4, followers
    deadline = time.monotonic() + 15
    while status().active_reservations != 0:
        assert time.monotonic() < deadline, "a reservation was never settled"
        time.sleep(0.2)


def test_a_gateway_stopped_mid_stream_settles_before_it_exits(mesh: RunningMesh, tmp_path: Path) -> None:
    """SIGTERM while a request streams: the stream is cut after the grace, and before the process exits its
    reservation is settled (slot free, charged what was used, not the full reservation) and the cut answer is not
    cached (an identical request generates again)."""
    api_key = mesh.create_key(Tier.PAID)
    key_id = key_id_for(hash_key(api_key))
    port, s = free_port(), mesh.settings
    argv = [
        sys.executable, "-m", "gateway",
        "--port", str(port),
        "--router-url", f"127.0.0.1:{s.router.port}",
        "--redis-url", mesh.redis_url,
        "--limiter-url", mesh.limiter_target,
        "--cache-url", f"127.0.0.1:{s.cache.port}" if s.cache_enabled else "",
        "--metrics-port", "0",
        "--shutdown-grace-s", "0.3",
        *mesh.tls_flags("gateway"),
    ]  # fmt: skip
    gateway = ManagedProcess("gateway-stopped", argv, tmp_path / "gateway.log").start()
    try:
        gateway.wait_ready(mesh.health_probe(f"127.0.0.1:{port}"), timeout=60)
        request = chat_pb2.ChatCompletionRequest(
            messages=[common_pb2.ChatMessage(role="user", content=f"{LONG_ANSWER} ({uuid.uuid4().hex[:6]})")],
            temperature=0,
            max_tokens=300,
        )
        metadata = [("authorization", f"Bearer {api_key}")]
        with mesh.channel(f"127.0.0.1:{port}") as channel:
            stream = chat_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(request, metadata=metadata, timeout=60)
            received = [next(stream) for _ in range(3)]  # generating: a reservation of prompt + 300 is open
            assert gateway.popen is not None
            gateway.popen.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError):
                received += list(stream)
        assert not any(c.HasField("usage") for c in received), "the answer finished before the stop: nothing cut"
        assert gateway.popen.wait(timeout=15) == 0
    finally:
        gateway.stop()

    # Right after exit, not eventually: the settlement happened before the process ended.
    with mesh.channel(mesh.limiter_target) as channel:
        status = limiter_pb2_grpc.LimiterServiceStub(channel).GetQuota(
            limiter_pb2.GetQuotaRequest(key_id=key_id, tier=tier_to_pb(Tier.PAID)), timeout=5
        )
    tokens = {q.name: q for q in status.quotas}["tokens_per_hour"]
    charged = tokens.limit - tokens.remaining
    assert status.active_reservations == 0
    assert 0 < charged < 300, f"charged {charged}: settled with what was used, not the 300+ reserved"
    assert "unfinished" not in (tmp_path / "gateway.log").read_text()

    # The cut answer was released, not stored: the same request through the mesh's gateway generates again.
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        again = chat_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(request, metadata=metadata, timeout=60)
        first = next(again)
        again.cancel()
    assert first.cache == ""
