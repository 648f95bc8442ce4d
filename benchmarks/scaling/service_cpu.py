"""CPU-seconds per request of each process of the mesh, by request kind.

    .venv/bin/python -m benchmarks.scaling.service_cpu [--requests 200] [--concurrency 8] [--max-tokens 32]

Starts a mesh of its own (benchmarks/scaling/harness.py) with the response cache on, then another with it off,
and sends `--requests` requests at `--concurrency` through Envoy (OpenAI JSON) per phase:

  miss            distinct prompts (cache on: Lookup, Reserve, Generate, Settle, Store)
  hit             the same 8 answered prompts again (exact hits: Prepare + Lookup, no quota, no generation)
  embeddings      /v1/embeddings with one distinct input each
  miss, no cache  distinct prompts, second mesh started with --no-cache (no Lookup, no Store, no embedding)

--stream: the miss and hit phases stream (SSE); --long: prompts whose answers run to --max-tokens.

Per process (gateway, router, limiter, cache, tritonserver with its python-backend children, envoy, the two
redis-servers) it reads utime + stime from /proc/<pid>/stat before and after the phase, subtracts what the
process burns idle (measured over an idle window first), and divides by the requests: CPU-ms per request, and
requests per core-second (what one core of that part serves). Counts of CPU time hold on a shared machine where
wall-clock rates do not.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from benchmarks.scaling.harness import (
    Answer,
    ScalingMesh,
    chat,
    client,
    cpu_snapshot,
    embed,
    scaling_mesh,
)
from llmesh.types import Tier

SHORT = "Write two sentences about a city you would like to visit."
# Answers that run to max_tokens: the per-token share of each process's CPU shows against the short prompt.
LONG = "Write a long, detailed story about a journey across three cities, with many characters."
ORDER = ("envoy", "gateway", "router", "limiter", "cache", "tritonserver", "redis-main", "redis-cache")


@dataclass(frozen=True)
class Workload:
    task: str
    stream: bool


class Phase:
    def __init__(
        self,
        name: str,
        requests: int,
        wall_s: float,
        cpu: dict[str, float],
        answers: list[Answer],
        idle: dict[str, float],
    ) -> None:
        self.name, self.requests, self.wall_s, self.cpu, self.answers = name, requests, wall_s, cpu, answers
        self.idle = idle  # what each process burned per second idle, before the phases


async def load(send: Callable[[int], Awaitable[Answer]], requests: int, concurrency: int) -> list[Answer]:
    answers: list[Answer] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            answers.append(await send(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def idle_rates(mesh: ScalingMesh, seconds: float) -> dict[str, float]:
    pids = mesh.pids()
    before, begin = cpu_snapshot(pids), time.perf_counter()
    await asyncio.sleep(seconds)
    after, wall = cpu_snapshot(pids), time.perf_counter() - begin
    return {name: (after[name] - before[name]) / wall for name in pids}


async def phase(
    mesh: ScalingMesh,
    name: str,
    send: Callable[[int], Awaitable[Answer]],
    requests: int,
    concurrency: int,
    idle: dict[str, float],
) -> Phase:
    pids = mesh.pids()
    before, begin = cpu_snapshot(pids), time.perf_counter()
    answers = await load(send, requests, concurrency)
    await asyncio.sleep(1.0)  # background Settle / Store
    after, wall = cpu_snapshot(pids), time.perf_counter() - begin
    cpu = {p: max(0.0, after[p] - before[p] - idle.get(p, 0.0) * wall) for p in pids}
    return Phase(name, requests, wall, cpu, answers, idle)


async def cache_on_phases(
    mesh: ScalingMesh, requests: int, concurrency: int, max_tokens: int, work: Workload
) -> list[Phase]:
    key = mesh.create_key(Tier.PAID, "scaling service_cpu")
    http = client(mesh.base_url, concurrency)
    tag = uuid.uuid4().hex[:8]

    def prompt(kind: str, i: int) -> str:
        return f"[{tag}-{kind}-{i}] {work.task}"

    for i in range(8):  # warm, and the answers the hit phase replays
        await chat(http, key, prompt("hit", i), max_tokens, stream=False)
    await embed(http, key, "warm")
    idle = await idle_rates(mesh, 10.0)
    phases = [
        await phase(
            mesh,
            "miss",
            lambda i: chat(http, key, prompt("miss", i), max_tokens, work.stream),
            requests,
            concurrency,
            idle,
        ),
        await phase(
            mesh,
            "hit",
            lambda i: chat(http, key, prompt("hit", i % 8), max_tokens, work.stream),
            requests,
            concurrency,
            idle,
        ),
        await phase(mesh, "embeddings", lambda i: embed(http, key, prompt("embed", i)), requests, concurrency, idle),
    ]
    await http.aclose()
    return phases


async def cache_off_phases(
    mesh: ScalingMesh, requests: int, concurrency: int, max_tokens: int, work: Workload
) -> list[Phase]:
    key = mesh.create_key(Tier.PAID, "scaling service_cpu")
    http = client(mesh.base_url, concurrency)
    tag = uuid.uuid4().hex[:8]
    for i in range(4):
        await chat(http, key, f"[{tag}-warm-{i}] Hello.", max_tokens, stream=False)
    idle = await idle_rates(mesh, 10.0)

    def send(i: int) -> Awaitable[Answer]:
        return chat(http, key, f"[{tag}-miss-{i}] {work.task}", max_tokens, work.stream)

    phases = [await phase(mesh, "miss, no cache", send, requests, concurrency, idle)]
    await http.aclose()
    return phases


def report(phases: list[Phase], concurrency: int) -> None:
    print(f"\nCPU-ms per request by process (idle burn subtracted), concurrency {concurrency}")
    print(f"{'phase':<18}{'n':>5}{'ok':>5}{'tok/req':>8}" + "".join(f"{p:>14}" for p in ORDER) + f"{'all':>10}")
    for ph in phases:
        ok = sum(1 for a in ph.answers if a.status == 200)
        tokens = sum(a.completion_tokens for a in ph.answers) / max(1, ok)
        cells = "".join(f"{ph.cpu[p] / ph.requests * 1000:>14.2f}" if p in ph.cpu else f"{'-':>14}" for p in ORDER)
        total = sum(ph.cpu.values()) / ph.requests * 1000
        print(f"{ph.name:<18}{ph.requests:>5}{ok:>5}{tokens:>8.1f}{cells}{total:>10.2f}")
    print("\nrequests per core-second by process (1000 / CPU-ms per request)")
    print(f"{'phase':<18}" + "".join(f"{p:>14}" for p in ORDER))
    for ph in phases:
        cells = ""
        for p in ORDER:
            ms = ph.cpu.get(p, 0.0) / ph.requests * 1000
            cells += f"{1000 / ms:>14,.0f}" if p in ph.cpu and ms > 0 else f"{'-':>14}"
        print(f"{ph.name:<18}{cells}")
    print("\nidle burn subtracted, CPU-ms per request (idle CPU-ms/s x phase wall s / requests): the noise floor")
    for ph in phases:
        cells = "".join(f"{ph.idle.get(p, 0.0) * ph.wall_s / ph.requests * 1000:>14.2f}" for p in ORDER)
        print(f"{ph.name:<18}{cells}")
    print("\nwall seconds per phase (context only, the machine is shared): "
          + ", ".join(f"{ph.name} {ph.wall_s:.1f}" for ph in phases))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="SSE streaming for the miss and hit phases")
    parser.add_argument("--long", action="store_true", help="prompts whose answers run to --max-tokens")
    parser.add_argument("--skip-no-cache", action="store_true", help="only the mesh with the cache on")
    args = parser.parse_args()
    work = Workload(LONG if args.long else SHORT, args.stream)
    with scaling_mesh(cache_enabled=True) as mesh:
        phases = asyncio.run(cache_on_phases(mesh, args.requests, args.concurrency, args.max_tokens, work))
    report(phases, args.concurrency)
    if not args.skip_no_cache:
        with scaling_mesh(cache_enabled=False) as mesh:
            phases += asyncio.run(cache_off_phases(mesh, args.requests, args.concurrency, args.max_tokens, work))
        report(phases, args.concurrency)


if __name__ == "__main__":
    main()
