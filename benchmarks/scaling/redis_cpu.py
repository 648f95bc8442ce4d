"""redis-server CPU per operation of the mesh's own Redis work, through the mesh's own clients.

    .venv/bin/python -m benchmarks.scaling.redis_cpu [--ops 20000] [--concurrency 32] [--subjects 1000]

Starts a redis-server of its own (no persistence) and runs each operation `--ops` times from `--concurrency`
callers in one asyncio process, reading INFO used_cpu_sys + used_cpu_user before and after: CPU-seconds the server
spent per operation, whatever else runs on the machine (wall time is not used). The operations are the calls a
request makes (benchmarks/scaling/redis_ops.py counts them):

  PING                     the floor: one round trip, no work
  auth HGETALL             the gateway's key lookup (gateway/auth.py), a 4-field hash
  quota reserve            limiter_service RedisQuotaStore.check with a paid-tier check (hour and minute windows,
                           tokens, concurrency lease), one of --subjects subjects, windows filled by earlier ops
  quota settle             RedisQuotaStore.settle of the reservations made above
  edge check               the same script as Envoy's per-IP / per-key minute window (no lease, no tokens)
  cache get_or_lock miss   cache_service RedisBackend.get_or_lock on an absent entry (takes the flight lock)
  cache put                RedisBackend.put of a 1 KiB answer (LRU, sizes, byte budget)
  cache get hit            RedisBackend.get of a stored entry (touches the LRU)
  cache release            RedisBackend.release: drops the flight lock, PUBLISHes "done" to waiting services
  cache index read, full   RedisBackend.index_read of a whole semantic bucket (8 vectors of 1.5 KiB)
  cache index read, new    the same asking only for items after those the reader holds (none new)
  cache index add          RedisBackend.index_add of one 1.5 KiB vector (the miss path's Store)

Redis runs commands on one thread, so 1 / (CPU-seconds per op) is what one node can do with one core's worth
of that thread: its ceiling (the I/O threads of Redis 6+ only move socket reads/writes off that thread).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis

from benchmarks.scaling.harness import redis_server_cpu_s, start_redis
from cache_service.store import RedisBackend
from limiter_service.redis_store import RedisQuotaStore, connect
from limiter_service.store import Check

HOUR_MS, MINUTE_MS = 3_600_000, 60_000
PAID = Check(
    window_ms=HOUR_MS,
    request_limit=2000,
    token_limit=2_000_000,
    short_window_ms=MINUTE_MS,
    burst_limit=200,
    concurrency_limit=32,
    hits=1,
    tokens=300,
    lease_ms=120_000,
)
EDGE = Check(window_ms=MINUTE_MS, request_limit=1_000_000, short_window_ms=MINUTE_MS)
ANSWER = b"x" * 1024


async def drive(op: Callable[[int], Awaitable[object]], ops: int, concurrency: int) -> None:
    counter = iter(range(ops))

    async def worker() -> None:
        for i in counter:
            await op(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run(url: str, ops: int, concurrency: int, subjects: int) -> list[tuple[str, float, float]]:
    stats = redis.Redis.from_url(url)
    plain = aioredis.from_url(url, max_connections=concurrency)
    quota = RedisQuotaStore(connect(url, cluster=False, timeout_s=5.0))
    cache = RedisBackend.from_url(url, 5.0)
    tag = uuid.uuid4().hex[:8]
    rng = random.Random(7)
    subject = [f"key:{tag}{i:05d}" for i in range(subjects)]
    members: list[tuple[str, str]] = []
    await plain.hset(f"llmesh:apikey:{tag}", mapping={"tier": "paid", "created": "1", "note": "bench", "x": "y"})

    async def ping(i: int) -> None:
        await plain.ping()

    async def hgetall(i: int) -> None:
        await plain.hgetall(f"llmesh:apikey:{tag}")

    async def reserve(i: int) -> None:
        s, m = subject[rng.randrange(subjects)], uuid.uuid4().hex
        await quota.check(s, m, int(time.time() * 1000), PAID)
        members.append((s, m))

    async def settle(i: int) -> None:
        s, m = members[i % len(members)]
        await quota.settle(s, m, 120, int(time.time() * 1000))

    async def edge(i: int) -> None:
        await quota.check(f"edge:ip:10.0.{i % 256}.{(i // 256) % 256}", uuid.uuid4().hex, int(time.time() * 1000), EDGE)

    async def get_or_lock(i: int) -> None:
        await cache.get_or_lock(f"llmesh:cache:{tag}:e:{i}", f"llmesh:cache:{tag}:f:{i}", "t", 30_000)

    async def put(i: int) -> None:
        await cache.put(f"llmesh:cache:{tag}:e:{i}", ANSWER, 3_600_000, int(time.time() * 1000), 1 << 30)

    async def get(i: int) -> None:
        assert await cache.get(f"llmesh:cache:{tag}:e:{i}", int(time.time() * 1000)) is not None

    for b in range(16):  # semantic buckets with a few 1.5 KiB vectors each
        for _ in range(8):
            await cache.index_add(f"llmesh:cache:{tag}:s:{b}", b"v" * 1536, 512, 3_600_000)

    async def index_read(i: int) -> None:
        await cache.index_read(f"llmesh:cache:{tag}:s:{i % 16}", 0, "")

    known = {b: await cache.index_read(f"llmesh:cache:{tag}:s:{b}", 0, "") for b in range(16)}

    async def index_read_new(i: int) -> None:
        # What a cache service that holds the bucket already asks: items after the ones it has (none here).
        seen = known[i % 16]
        await cache.index_read(f"llmesh:cache:{tag}:s:{i % 16}", seen.length, seen.generation)

    async def index_add(i: int) -> None:
        await cache.index_add(f"llmesh:cache:{tag}:s:add{i % 64}", b"v" * 1536, 512, 3_600_000)

    async def release(i: int) -> None:
        await cache.release(f"llmesh:cache:{tag}:f:{i}", "t", f"llmesh:cache:{tag}:e:{i}")

    plan: list[tuple[str, Callable[[int], Awaitable[object]]]] = [
        ("PING", ping),
        ("auth HGETALL", hgetall),
        ("quota reserve", reserve),
        ("quota settle", settle),
        ("edge check", edge),
        ("cache get_or_lock miss", get_or_lock),
        ("cache put (1 KiB)", put),
        ("cache get hit", get),
        ("cache release (+PUBLISH)", release),
        ("cache index read, full", index_read),
        ("cache index read, new", index_read_new),
        ("cache index add (1.5 KiB)", index_add),
    ]
    await drive(ping, 500, concurrency)  # connections open, scripts loaded below by first use
    idle_begin, idle_cpu = time.perf_counter(), redis_server_cpu_s(stats)
    await asyncio.sleep(2.0)
    idle_rate = (redis_server_cpu_s(stats) - idle_cpu) / (time.perf_counter() - idle_begin)
    results = []
    for name, op in plan:
        await op(ops + 1)  # script cached on the server (EVALSHA) before counting
        begin, cpu = time.perf_counter(), redis_server_cpu_s(stats)
        await drive(op, ops, concurrency)
        wall = time.perf_counter() - begin
        used = redis_server_cpu_s(stats) - cpu - idle_rate * wall
        results.append((name, used / ops, wall))
    await plain.aclose()
    await quota.close()
    await cache.close()
    stats.close()
    return results


def saturated_floor(url: str, requests: int, clients: int) -> list[tuple[str, float, float]]:
    """PING and a small HGETALL from redis-benchmark (C, `clients` connections): the per-command overhead when Redis
    is kept busy and reads many commands per wake-up, unlike a Python client's trickle."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return []
    stats = redis.Redis.from_url(url)
    stats.hset("llmesh:apikey:floor", mapping={"tier": "paid", "created": "1", "note": "bench", "x": "y"})
    port = str(stats.connection_pool.connection_kwargs["port"])
    results = []
    for name, command in (
        ("PING (redis-benchmark)", ["PING"]),
        ("HGETALL (redis-benchmark)", ["HGETALL", "llmesh:apikey:floor"]),
    ):
        cpu, begin = redis_server_cpu_s(stats), time.perf_counter()
        subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", port, "-c", str(clients), "-n", str(requests), "-q", *command],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - begin
        results.append((name, (redis_server_cpu_s(stats) - cpu) / requests, wall))
    stats.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--subjects", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmesh-redis-cpu-") as tmp:
        proc, url = start_redis(Path(tmp), "redis")
        try:
            version = redis.Redis.from_url(url).info("server")["redis_version"]
            results = asyncio.run(run(url, args.ops, args.concurrency, args.subjects))
            floor = saturated_floor(url, args.ops * 10, 50)
        finally:
            proc.stop()
    print(f"\nredis-server {version}: CPU per operation, {args.ops} ops each at concurrency {args.concurrency}")
    print(f"{'operation':<26}{'server CPU us/op':>18}{'ops per core-second':>22}{'client ops/s (wall)':>22}")
    for name, per_op, wall in results:
        print(f"{name:<26}{per_op * 1e6:>18.1f}{1 / per_op:>22,.0f}{args.ops / wall:>22,.0f}")
    for name, per_op, wall in floor:
        print(f"{name:<26}{per_op * 1e6:>18.1f}{1 / per_op:>22,.0f}{args.ops * 10 / wall:>22,.0f}")
    print("\nops per core-second = 1 / server CPU per op: one node's ceiling (commands run on one thread).")


if __name__ == "__main__":
    main()
