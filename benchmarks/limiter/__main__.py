"""What a quota check costs, against the floor of a bare Redis round trip from the same client, in one run.

    .venv/bin/python -m benchmarks.limiter [--seconds 2] [--concurrency 32] [--rounds 3]

1. In process: `Limiter.reserve` (policy lookup + one Lua script round trip + decision) against `PING` sent the
   same way on the same client (a pre-encoded command on a pooled redis-py connection), same concurrency, rounds
   interleaved so machine noise hits both alike. Goal: >= 70% of the floor's throughput.
2. Over gRPC: the limiter service's Reserve against a grpc.health.v1 Check on the same server (the floor of a
   gRPC hop in Python), and Envoy's ShouldRateLimit.
3. Redis outage: p99 of Reserve from a client while Redis is paused (SIGSTOP), against the same p99 with Redis up.

Starts its own redis-server and limiter on free ports; needs nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.process import free_port
from limiter_service.core import Limiter
from limiter_service.policy import PolicySource
from limiter_service.redis_store import RedisQuotaStore, SingleRedis, connect
from llmesh.v1 import common_pb2, limiter_pb2, limiter_pb2_grpc
from tests.fixtures.limiter import RedisProcess, start_limiter_process

POLICY = """
[tiers.free]
requests_per_hour = 1000000
burst_per_minute = 1000000
tokens_per_hour = 1000000000
max_concurrent_streams = 1000000
[tiers.paid]
requests_per_hour = 1000000
burst_per_minute = 1000000
tokens_per_hour = 1000000000
max_concurrent_streams = 1000000
on_store_failure = "open"
[tiers.enterprise]
requests_per_hour = 1000000
on_store_failure = "open"
[edge]
per_ip_per_minute = 100000000
per_key_per_minute = 100000000
"""
KEYS = [uuid.uuid4().hex[:16] for _ in range(1000)]
PING = b"*1\r\n$4\r\nPING\r\n"
# The floor goes the way a check goes (a pre-encoded command on a pooled connection), so the ratio is what the
# check itself adds; PING through redis-py's generic execute_command is printed beside it.
FLOOR = "floor: PING round trip"
API_FLOOR = "PING via redis-py execute_command"
CHECK = "check: Limiter.reserve"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def closed_loop(op: Callable[[int], Awaitable[object]], seconds: float, concurrency: int) -> tuple[float, float]:
    """`concurrency` workers calling `op` back to back for `seconds`: (ops per second, p99 latency in seconds)."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < end:
            start = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - start)
            i += concurrency

    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), pct(latencies, 0.99)


async def compare(
    name: str, floor_name: str, ops: dict[str, Callable[[int], Awaitable[object]]], args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in ops}
    for op in ops.values():  # warm up
        await closed_loop(op, 0.3, args.concurrency)
    for _ in range(args.rounds):
        for label, op in ops.items():
            samples[label].append(await closed_loop(op, args.seconds, args.concurrency))
    result = {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for k, v in samples.items()}
    print(f"\n{name} (concurrency {args.concurrency}, median of {args.rounds} rounds of {args.seconds:g} s)")
    print(f"  {'':<34}{'ops/s':>10}{'p99 ms':>10}{'vs floor':>10}")
    floor_rate = result[floor_name][0]
    for label, (rate, p99) in result.items():
        print(f"  {label:<34}{rate:>10.0f}{p99 * 1000:>10.2f}{rate / floor_rate:>10.2f}")
    return result


async def in_process(redis_url: str, policy_path: Path, args: argparse.Namespace) -> tuple[float, float]:
    client = connect(redis_url, cluster=False, timeout_s=1.0)
    assert isinstance(client, SingleRedis)
    store = RedisQuotaStore(client)
    limiter = Limiter(PolicySource(policy_path), store, store_timeout_s=None)
    node = client.node

    async def ping_api(i: int) -> object:
        return await node.client.execute_command("PING")

    async def ping_raw(i: int) -> object:
        return await node.run_packed(PING)

    async def reserve(i: int) -> object:
        return await limiter.reserve(KEYS[i % len(KEYS)], "free", 50, 200)

    async def reserve_settle(i: int) -> object:
        d = await limiter.reserve(KEYS[i % len(KEYS)], "paid", 50, 200)
        return await limiter.settle(d.reservation_id, 120)

    result = await compare(
        "1. in process, one redis-py client",
        FLOOR,
        {
            FLOOR: ping_raw,
            API_FLOOR: ping_api,
            CHECK: reserve,
            "reserve + settle (2 round trips)": reserve_settle,
        },
        args,
    )
    await store.close()
    return result[CHECK][0] / result[FLOOR][0], result[CHECK][0] / result[API_FLOOR][0]


async def over_grpc(target: str, args: argparse.Namespace) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        limiter = limiter_pb2_grpc.LimiterServiceStub(channel)
        rls = rls_pb2_grpc.RateLimitServiceStub(channel)

        async def check_health(i: int) -> object:
            return await health.Check(health_pb2.HealthCheckRequest(service=""))

        async def reserve(i: int) -> object:
            return await limiter.Reserve(
                limiter_pb2.ReserveRequest(
                    key_id=KEYS[i % len(KEYS)], tier=common_pb2.TIER_FREE, prompt_tokens=50, max_tokens=200
                )
            )

        async def edge(i: int) -> object:
            request = rls_pb2.RateLimitRequest(domain="llmesh-edge")
            request.descriptors.add().entries.add(key="remote_address", value=f"10.0.{i % 250}.{i % 200}")
            return await rls.ShouldRateLimit(request)

        await compare(
            "2. over gRPC to the limiter service",
            "floor: grpc.health Check",
            {"floor: grpc.health Check": check_health, "Reserve": reserve, "ShouldRateLimit (Envoy)": edge},
            args,
        )


async def outage(target: str, redis_pid: int, n: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        limiter = limiter_pb2_grpc.LimiterServiceStub(channel)

        async def sample() -> list[float]:
            out = []
            for i in range(n):
                start = time.perf_counter()
                await limiter.Reserve(
                    limiter_pb2.ReserveRequest(
                        key_id=KEYS[i % 50], tier=common_pb2.TIER_PAID, prompt_tokens=5, max_tokens=5
                    )
                )
                out.append(time.perf_counter() - start)
            return out

        up = await sample()
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            down = await sample()
        finally:
            os.kill(redis_pid, signal.SIGCONT)
    print(f"\n3. Redis paused (SIGSTOP), {n} sequential Reserve calls, paid tier (fails open)")
    print(f"  {'':<34}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for label, values in (("Redis up", up), ("Redis paused", down)):
        print(
            f"  {label:<34}{pct(values, 0.5) * 1000:>10.2f}{pct(values, 0.99) * 1000:>10.2f}{max(values) * 1000:>10.1f}"
        )
    print(f"  p99 added by the outage: {(pct(down, 0.99) - pct(up, 0.99)) * 1000:.2f} ms (goal < 50 ms)")


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="llmesh-bench-limiter-") as tmp:
        work = Path(tmp)
        redis = RedisProcess(free_port(), work).start()
        policy = work / "bench-policy.toml"
        policy.write_text(POLICY)
        limiter = start_limiter_process(redis.url, POLICY, work)
        try:
            strict, api = await in_process(redis.url, policy, args)
            await over_grpc(limiter.target, args)
            assert redis.process is not None and redis.process.pid is not None
            await outage(limiter.target, redis.process.pid, args.outage_requests)
        finally:
            limiter.process.stop()
            redis.stop()
    print("\ncheck throughput / bare Redis round trip (goal >= 0.70):")
    for label, ratio in (("sent the same way as the check", strict), ("through redis-py's execute_command", api)):
        print(f"  {ratio:.2f} of a PING {label} ({'meets' if ratio >= 0.7 else 'BELOW'} the goal)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measured round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outage-requests", type=int, default=1000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
