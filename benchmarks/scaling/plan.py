"""Sizing of the case study's phases (100k, 1M, 10M, 100M requests/day) from the measured figures.

    .venv/bin/python -m benchmarks.scaling.plan [--peak-factor 3] [--hit-rate 0.3] [--output-tokens 128]
        [--mix 0.70,0.25,0.05] [--utilization 0.5] [--engine-utilization 0.7] [--usd-per-core-hour 0.04]
        [--non-streaming]

No measurement here: arithmetic over the constants below, each marked with where it was measured (docs/SCALING.md
gives the commands and runs). Every flag is an assumption, and the printout says so. CPU only: GPU replicas were not
measured, so they are not sized here (docs/SCALING.md gives the formula).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

# ---- measured inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    variant: str
    tok_s: float  # output tokens/s of one 2-core replica at the operating concurrency
    concurrency: int
    source: str


# One 2-core tritonserver replica, closed-loop streaming clients, 128 output tokens (docs/PERFORMANCE.md).
ENGINES = (
    Engine("smollm2-135m-int8", 280.6, 32, "PERFORMANCE.md 'Engine ... Current: 2026-12-01', c=32 median, AVX2 EPYC"),
    Engine("qwen2.5-coder-0.5b", 113.2, 8, "PERFORMANCE.md 'Model tiers, Goals', c=8, Xeon AVX-512, 2026-12-02"),
    Engine("qwen2.5-coder-1.5b", 40.7, 8, "PERFORMANCE.md 'Model tiers, Goals', c=8, Xeon AVX-512, 2026-12-02"),
)
CORES_PER_REPLICA = 2


@dataclass(frozen=True)
class ServiceCost:
    """CPU-ms per request of one process kind: fixed + per_token x output tokens, for a miss and for a hit."""

    fixed: float
    per_token: float
    hit_fixed: float
    hit_per_token: float = 0.0

    def miss_ms(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def hit_ms(self, tokens: int) -> float:
        return self.hit_fixed + self.hit_per_token * tokens


# benchmarks.scaling.service_cpu, cache on, concurrency 8 (docs/SCALING.md section 3, runs A-E). Non-streaming: straight
# lines through the misses at 28.3-28.9 (runs A, C), 47.7 (B) and 128 (D) output tokens. Streaming: run E at 128
# tokens, with the non-streaming fixed parts (the per-token share is what streaming adds to). Limiter and cache
# show no growth with tokens; their figures are the runs where they stand above the noise (A, C; all five).
NON_STREAMING = {
    "envoy": ServiceCost(1.36, 0.014, 1.0),
    "gateway": ServiceCost(8.0, 0.34, 2.8),
    "router": ServiceCost(5.4, 0.54, 1.4),
    "limiter": ServiceCost(5.3, 0.0, 1.3),
    "cache": ServiceCost(19.0, 0.0, 1.4),
}
STREAMING = {
    "envoy": ServiceCost(1.36, 0.113, 1.0, 0.037),
    "gateway": ServiceCost(8.0, 0.50, 2.8, 0.107),
    "router": ServiceCost(5.4, 0.52, 1.4),
    "limiter": ServiceCost(5.3, 0.0, 1.3),
    "cache": ServiceCost(19.0, 0.0, 1.4),
}

# redis-server CPU per operation (us): benchmarks.scaling.redis_cpu, our own clients at 32 callers, the highest of
# the three runs in docs/SCALING.md (sizing on the worst run).
REDIS_US = {
    "edge check": 44.9,
    "quota reserve": 57.9,
    "quota settle": 37.7,
    "auth HGETALL": 19.1,
    "cache get": 30.9,
    "cache get_or_lock": 31.5,
    "cache index read, new": 28.5,
    "cache put (1 KiB)": 47.7,
    "cache index add (1.5 KiB)": 38.8,
    "cache release (+PUBLISH)": 24.3,
}
# Client calls per request: benchmarks.scaling.redis_ops (MONITOR), per kind -> {operation: calls}. The gateway's
# key lookups (one HGETALL per key per gateway per 10 s) are left out: ~0 per request for returning keys.
MAIN_OPS = {
    "miss": {"edge check": 2, "quota reserve": 1, "quota settle": 1},
    "hit": {"edge check": 2},
}
CACHE_OPS = {
    "miss": {
        "cache get": 1,
        "cache get_or_lock": 1,
        "cache index read, new": 1,
        "cache put (1 KiB)": 1,
        "cache index add (1.5 KiB)": 1,
        "cache release (+PUBLISH)": 1,
    },
    "hit": {"cache get": 1},
}

PHASES = (100_000, 1_000_000, 10_000_000, 100_000_000)


def redis_us(ops: dict[str, dict[str, int]], kind: str) -> float:
    return sum(REDIS_US[name] * n for name, n in ops[kind].items())


def calls(ops: dict[str, dict[str, int]], kind: str) -> int:
    return sum(ops[kind].values())


@dataclass(frozen=True)
class Assumptions:
    peak_factor: float
    hit_rate: float
    output_tokens: int
    mix: tuple[float, float, float]
    utilization: float
    engine_utilization: float
    usd_per_core_hour: float
    non_streaming: bool


def plan(a: Assumptions, per_day: int) -> list[tuple[str, str, str]]:
    """(part, count, why) rows for one phase."""
    avg = per_day / 86_400
    peak = avg * a.peak_factor
    generated = peak * (1 - a.hit_rate)
    rows = [("load", f"{avg:,.1f} avg / {peak:,.1f} peak rps", f"{generated:,.1f} rps generated at peak")]
    cores = 0.0
    for engine, share in zip(ENGINES, a.mix, strict=True):
        per_replica = engine.tok_s / a.output_tokens * a.engine_utilization
        replicas = max(1, math.ceil(generated * share / per_replica)) if share > 0 else 0
        cores += replicas * CORES_PER_REPLICA
        rows.append(
            (f"triton {engine.variant}", str(replicas), f"{generated * share:,.2f} rps / {per_replica:.2f} per replica")
        )
    for part, cost in (NON_STREAMING if a.non_streaming else STREAMING).items():
        ms = (1 - a.hit_rate) * cost.miss_ms(a.output_tokens) + a.hit_rate * cost.hit_ms(a.output_tokens)
        need = peak * ms / 1000
        count = max(2, math.ceil(need / a.utilization))  # two for availability; a Python process uses one core
        cores += count
        rows.append((part, str(count), f"{need:,.2f} cores at peak ({ms:.1f} CPU-ms/request)"))
    for name, ops in (("redis keys+quotas", MAIN_OPS), ("redis cache", CACHE_OPS)):
        us = (1 - a.hit_rate) * redis_us(ops, "miss") + a.hit_rate * redis_us(ops, "hit")
        n_calls = (1 - a.hit_rate) * calls(ops, "miss") + a.hit_rate * calls(ops, "hit")
        need = peak * us / 1e6
        nodes = max(1, math.ceil(need / a.utilization))
        cores += nodes * 2  # a replica per primary
        rows.append(
            (
                name,
                f"{nodes} primary + {nodes} replica",
                f"{peak * n_calls:,.0f} calls/s, {need:.3f} cores at peak ({us:.0f} us/request)",
            )
        )
    core_hours = cores * 24
    rows.append(
        (
            "total",
            f"{cores:,.0f} cores",
            f"{core_hours:,.0f} core-hours/day provisioned for peak, ~${core_hours * a.usd_per_core_hour:,.0f}/day at "
            f"the assumed ${a.usd_per_core_hour}/core-hour",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-factor", type=float, default=3.0)
    parser.add_argument("--hit-rate", type=float, default=0.3)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--mix", default="0.70,0.25,0.05", help="share of generated requests per tier, small first")
    parser.add_argument("--utilization", type=float, default=0.5, help="target peak utilization of services, Redis")
    parser.add_argument("--engine-utilization", type=float, default=0.7, help="of a replica's measured tok/s")
    parser.add_argument("--usd-per-core-hour", type=float, default=0.04)
    parser.add_argument("--non-streaming", action="store_true", help="clients without SSE (default: streaming)")
    args = parser.parse_args()
    shares = tuple(float(x) for x in args.mix.split(","))
    if len(shares) != 3 or abs(sum(shares) - 1) > 1e-6:
        parser.error("--mix needs three shares that add up to 1")
    a = Assumptions(
        args.peak_factor,
        args.hit_rate,
        args.output_tokens,
        (shares[0], shares[1], shares[2]),
        args.utilization,
        args.engine_utilization,
        args.usd_per_core_hour,
        args.non_streaming,
    )
    print(f"assumptions: {a}")
    for engine in ENGINES:
        print(f"measured: {engine.variant} {engine.tok_s} tok/s at c={engine.concurrency} ({engine.source})")
    for per_day in PHASES:
        print(f"\n{per_day:,} requests/day")
        for part, count, why in plan(a, per_day):
            print(f"  {part:<30}{count:>22}   {why}")


if __name__ == "__main__":
    main()
