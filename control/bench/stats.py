"""Benchmark statistics from request results: percentiles, throughput, errors, cache hit rate, cost.

Latency percentiles cover successful requests only; ITL pools every gap between successive content chunks of
every successful streamed request. Throughput divides by the run's wall time (first send to last answer).
Cost: each answer's tokens at its variant's price (`model` field of the reply names the variant); answers served
from the response cache count as free, since nothing was generated for them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from control.bench.stream import RequestResult
from control.bench.workload import Price

QUANTILES = (0.5, 0.95, 0.99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default): q=0 is the minimum, q=1 the maximum."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None)
        p50, p95, p99 = (percentile(values, q) for q in QUANTILES)
        return cls(len(values), sum(values) / len(values), p50, p95, p99)


@dataclass(frozen=True)
class GroupCounts:
    requests: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None


@dataclass(frozen=True)
class Summary:
    target: str
    requests: int
    ok: int
    # Error kind (HTTP status or timeout/connection/stream_error/bad_response) -> count.
    errors: dict[str, int]
    wall_s: float
    request_throughput: float  # successful requests per second
    output_token_throughput: float  # completion tokens per second
    total_token_throughput: float  # prompt + completion tokens per second
    prompt_tokens: int
    completion_tokens: int
    ttft: Distribution
    itl: Distribution
    e2e: Distribution
    cache_hits: int
    # Successful answers whose reply said whether it came from the cache.
    cache_known: int
    cache_hit_rate: float | None
    cost: float | None
    cost_per_1k_tokens: float | None
    unpriced_variants: list[str]
    usage_reported: bool  # False: completion tokens were counted from content chunks
    by_tier: dict[str, GroupCounts] = field(default_factory=dict)
    by_kind: dict[str, GroupCounts] = field(default_factory=dict)
    by_variant: dict[str, GroupCounts] = field(default_factory=dict)
    delayed_arrivals: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _answer_cost(result: RequestResult, prices: Mapping[str, Price]) -> float | None:
    if result.cache_hit:
        return 0.0
    price = prices.get(result.variant)
    return None if price is None else price.cost(result.prompt_tokens, result.completion_tokens)


def _groups(results: Iterable[RequestResult], key: str, prices: Mapping[str, Price]) -> dict[str, GroupCounts]:
    groups: dict[str, GroupCounts] = {}
    for r in results:
        name = getattr(r, key) or "(none)"
        g = groups.get(name, GroupCounts())
        cost = g.cost
        if r.ok:
            answer = _answer_cost(r, prices)
            if answer is not None:
                cost = (cost or 0.0) + answer
        groups[name] = GroupCounts(
            requests=g.requests + 1,
            ok=g.ok + int(r.ok),
            prompt_tokens=g.prompt_tokens + (r.prompt_tokens if r.ok else 0),
            completion_tokens=g.completion_tokens + (r.completion_tokens if r.ok else 0),
            cost=cost,
        )
    return dict(sorted(groups.items()))


def summarize(
    target: str,
    results: Sequence[RequestResult],
    wall_s: float,
    prices: Mapping[str, Price] | None = None,
    delayed_arrivals: int = 0,
) -> Summary:
    prices = prices or {}
    ok = [r for r in results if r.ok]
    errors = Counter(r.status for r in results if not r.ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    completion_tokens = sum(r.completion_tokens for r in ok)
    known = [r for r in ok if r.cache is not None]
    hits = sum(1 for r in known if r.cache_hit)

    unpriced = sorted({r.variant or "(none)" for r in ok if _answer_cost(r, prices) is None})
    costs = [c for c in (_answer_cost(r, prices) for r in ok) if c is not None]
    cost = sum(costs) if prices and costs else None
    priced_tokens = sum(r.prompt_tokens + r.completion_tokens for r in ok if _answer_cost(r, prices) is not None)

    return Summary(
        target=target,
        requests=len(results),
        ok=len(ok),
        errors=dict(sorted(errors.items())),
        wall_s=wall_s,
        request_throughput=_ratio(len(ok), wall_s),
        output_token_throughput=_ratio(completion_tokens, wall_s),
        total_token_throughput=_ratio(prompt_tokens + completion_tokens, wall_s),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        itl=Distribution.of([gap for r in ok for gap in r.itl]),
        e2e=Distribution.of([r.e2e for r in ok]),
        cache_hits=hits,
        cache_known=len(known),
        cache_hit_rate=hits / len(known) if known else None,
        cost=cost,
        cost_per_1k_tokens=cost * 1000.0 / priced_tokens if cost is not None and priced_tokens else None,
        unpriced_variants=unpriced if prices else [],
        usage_reported=all(r.usage_reported for r in ok),
        by_tier=_groups(results, "tier", prices),
        by_kind=_groups(results, "kind", prices),
        by_variant=_groups(ok, "variant", prices),
        delayed_arrivals=delayed_arrivals,
    )


@dataclass(frozen=True)
class Row:
    """One line of the comparison table: a label and one value per target (None = not available)."""

    label: str
    values: tuple[float | None, ...]
    unit: str  # "ms", "/s", "%", "$", "" (a count)
    # Whether a larger value is better: the ratio column reads "x faster/slower" accordingly.
    higher_is_better: bool


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else fraction * 100.0


def table_rows(summaries: Sequence[Summary]) -> list[Row]:
    """The rows shown in the terminal and Markdown tables."""

    def row(label: str, unit: str, higher: bool, get: Any) -> Row:
        return Row(label, tuple(get(s) for s in summaries), unit, higher)

    rows = [
        row("requests", "", True, lambda s: float(s.requests)),
        row("succeeded", "", True, lambda s: float(s.ok)),
        row("errors", "", False, lambda s: float(s.requests - s.ok)),
        row("requests/s", "/s", True, lambda s: s.request_throughput),
        row("output tokens/s", "/s", True, lambda s: s.output_token_throughput),
        row("total tokens/s", "/s", True, lambda s: s.total_token_throughput),
    ]
    for name in ("ttft", "itl", "e2e"):
        label = {"ttft": "TTFT", "itl": "ITL", "e2e": "end-to-end"}[name]
        for q in ("p50", "p95", "p99"):
            rows.append(row(f"{label} {q}", "ms", False, lambda s, n=name, q=q: _ms(getattr(getattr(s, n), q))))
    rows.append(row("cache hit rate", "%", True, lambda s: _percent(s.cache_hit_rate)))
    rows.append(row("cost", "$", False, lambda s: s.cost))
    rows.append(row("cost per 1k tokens", "$", False, lambda s: s.cost_per_1k_tokens))
    return rows


def ratio(values: tuple[float | None, ...], index: int) -> float | None:
    """values[index] / values[0], or None when either is missing or the base is 0."""
    base, other = values[0], values[index]
    if base is None or other is None or base == 0:
        return None
    return other / base
