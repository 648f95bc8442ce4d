"""Pure parts of the mesh benchmark: prompts, aggregation over rounds, ratios, the goal table, latency summaries."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from benchmarks.engine.__main__ import ANCHOR, QUESTIONS, percentile

LLMESH = "llmesh"
# The restructure issue's numbers for the same measures ("llmesh then", "llama.cpp then"), shown beside today's.
THEN = {
    "single_stream_tok_s": (109.0, 127.0),
    "ttft_p50_c1_ms": (88.0, 50.0),
    "ttft_p50_c8_ms": (159.0, 144.0),
    "cache_hit_http_p50_ms": (5.2, None),
}


def salted_prompts(tag: str, first: int, count: int, questions: Sequence[str] = QUESTIONS) -> list[str]:
    """`count` distinct user turns numbered from `first`: "Request <tag>-<n>. <question>".

    The number keeps the response cache from answering: distinct text misses the exact layer, and the semantic
    layer's lexical guard refuses any pair whose numbers differ. Both systems get the same list.
    """
    return [f"Request {tag}-{n}. {questions[n % len(questions)]}" for n in range(first, first + count)]


def aggregate(rows: Iterable[Mapping[str, object]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median over rounds of every numeric measure, per concurrency (as text) and system."""
    grouped: dict[tuple[str, str], list[Mapping[str, object]]] = {}
    for row in rows:
        grouped.setdefault((str(row["concurrency"]), str(row["system"])), []).append(row)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (c, system), runs in sorted(grouped.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and k not in ("round", "concurrency")]
        table.setdefault(c, {})[system] = {k: statistics.median(float(r[k]) for r in runs) for k in keys}  # type: ignore[arg-type]
    return table


def ratios(mine: Mapping[str, float], anchor: Mapping[str, float]) -> dict[str, float]:
    """llmesh / llama.cpp for each measure (> 1 is better for tok/s, worse for latencies)."""
    return {
        k: mine[k] / anchor[k]
        for k in ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms")
        if k in mine and anchor.get(k)
    }


@dataclass(frozen=True)
class Goal:
    measure: str
    llmesh: float | None
    anchor: float | None
    goal: str
    # None when this run did not measure what the goal needs.
    met: bool | None

    def as_dict(self) -> dict[str, object]:
        then_mesh, then_anchor = THEN[self.measure]
        return {
            "measure": self.measure,
            "llmesh": self.llmesh,
            "llama_cpp": self.anchor,
            "goal": self.goal,
            "met": self.met,
            "llmesh_then": then_mesh,
            "llama_cpp_then": then_anchor,
        }


def _cell(table: Mapping[str, Mapping[str, Mapping[str, float]]], c: int, system: str, key: str) -> float | None:
    value = table.get(str(c), {}).get(system, {}).get(key)
    return None if value is None else float(value)


def goals(table: Mapping[str, Mapping[str, Mapping[str, float]]], cache_hit_http_p50_ms: float | None) -> list[Goal]:
    """The restructure issue's speed goals, met or missed in this run."""
    tok_mesh, tok_anchor = _cell(table, 1, LLMESH, "tok_s"), _cell(table, 1, ANCHOR, "tok_s")
    t1_mesh, t1_anchor = _cell(table, 1, LLMESH, "ttft_p50_ms"), _cell(table, 1, ANCHOR, "ttft_p50_ms")
    t8_mesh, t8_anchor = _cell(table, 8, LLMESH, "ttft_p50_ms"), _cell(table, 8, ANCHOR, "ttft_p50_ms")

    def both(a: float | None, b: float | None) -> bool:
        return a is not None and b is not None

    return [
        Goal(
            "single_stream_tok_s", tok_mesh, tok_anchor, ">= 1.0x llama.cpp",
            tok_mesh >= tok_anchor if both(tok_mesh, tok_anchor) else None,  # type: ignore[operator]
        ),
        Goal(
            "ttft_p50_c1_ms", t1_mesh, t1_anchor, "<= llama.cpp + 10 ms",
            t1_mesh <= t1_anchor + 10.0 if both(t1_mesh, t1_anchor) else None,  # type: ignore[operator]
        ),
        Goal(
            "ttft_p50_c8_ms", t8_mesh, t8_anchor, "<= llama.cpp",
            t8_mesh <= t8_anchor if both(t8_mesh, t8_anchor) else None,  # type: ignore[operator]
        ),
        Goal(
            "cache_hit_http_p50_ms", cache_hit_http_p50_ms, None, "<= 3 ms",
            None if cache_hit_http_p50_ms is None else cache_hit_http_p50_ms <= 3.0,
        ),
    ]  # fmt: skip


def latency_summary(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean in milliseconds of latencies given in seconds."""
    ms = [1000 * s for s in samples_s]
    return {
        "n": float(len(ms)),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


def layer_differences(p50_ms: Mapping[str, float]) -> dict[str, float]:
    """Where a path's time goes: each layer's p50 minus the p50 of the layer it calls (keys as in PATH_ORDER)."""
    steps = {
        "router over Triton (template, tokenize, route, detokenize, hop)": ("router Generate", "triton direct"),
        "gateway over router Generate (auth, Prepare, cache Lookup, quota, hop)": ("gateway gRPC", "router Generate"),
        "Envoy hop, gRPC (edge rate limit, proxy)": ("envoy gRPC", "gateway gRPC"),
        "Envoy HTTP/JSON + SSE over Envoy gRPC": ("envoy HTTP", "envoy gRPC"),
    }
    return {name: p50_ms[a] - p50_ms[b] for name, (a, b) in steps.items() if a in p50_ms and b in p50_ms}


def format_goal(goal: Goal) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    then_mesh, then_anchor = THEN[goal.measure]
    verdict = {True: "met", False: "MISSED", None: "not measured"}[goal.met]
    return (
        f"{goal.measure:<24}{num(goal.llmesh):>10}{num(goal.anchor):>11}   {goal.goal:<22}{verdict:<14}"
        f"(then {num(then_mesh)} vs {num(then_anchor)})"
    )


def cpu_model(cpuinfo: str) -> str:
    """The first "model name" of /proc/cpuinfo's text, else ""."""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""
