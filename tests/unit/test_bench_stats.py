"""llmesh bench statistics: percentiles, summaries (counts, throughput, cache, cost) and the comparison rows."""

from __future__ import annotations

import pytest

from control.bench.stats import Distribution, percentile, ratio, summarize, table_rows
from control.bench.stream import OK, TIMEOUT, RequestResult
from control.bench.workload import Price


def result(
    index: int,
    status: str = OK,
    start: float = 0.0,
    end: float = 1.0,
    ttft: float | None = 0.1,
    itl: tuple[float, ...] = (0.02, 0.04),
    prompt: int = 10,
    completion: int = 3,
    variant: str = "small",
    cache: str | None = "",
    tier: str = "paid",
    kind: str = "short",
) -> RequestResult:
    return RequestResult(
        index, kind, tier, start, end, status, ttft, itl, prompt, completion, True, variant, cache, ""
    )  # fmt: skip


def test_percentile_matches_linear_interpolation() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.95) == pytest.approx(95.05)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 100.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0  # unsorted input
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_distribution_of_nothing_is_all_none() -> None:
    assert Distribution.of([]) == Distribution(0, None, None, None, None)
    d = Distribution.of([1.0, 2.0, 3.0, 4.0])
    assert (d.count, d.mean, d.p50) == (4, 2.5, 2.5)


def test_summary_counts_add_up_and_latencies_cover_successes_only() -> None:
    results = [
        result(0, ttft=0.1, start=0.0, end=1.0),
        result(1, ttft=0.3, start=0.5, end=2.5, itl=(0.05,)),
        result(2, status="429", ttft=None, itl=(), start=1.0, end=1.01, prompt=0, completion=0, tier="free"),
        result(3, status=TIMEOUT, ttft=None, itl=(), start=1.0, end=9.0, prompt=0, completion=0),
        result(4, status="429", ttft=None, itl=(), prompt=0, completion=0, tier="free"),
    ]
    s = summarize("t", results, wall_s=4.0)
    assert (s.requests, s.ok) == (5, 2)
    assert s.errors == {"429": 2, TIMEOUT: 1}
    assert s.ok + sum(s.errors.values()) == s.requests
    assert s.ttft.count == 2 and s.ttft.p50 == pytest.approx(0.2)
    assert s.e2e.count == 2 and s.e2e.p50 == pytest.approx(1.5)  # the 8 s timeout is not a latency
    assert s.itl.count == 3 and s.itl.p50 == pytest.approx(0.04)  # gaps pooled over requests
    assert s.request_throughput == pytest.approx(0.5)
    assert s.output_token_throughput == pytest.approx(6 / 4.0)
    assert s.total_token_throughput == pytest.approx(26 / 4.0)
    assert s.by_tier["free"].requests == 2 and s.by_tier["free"].ok == 0
    assert s.by_tier["paid"].requests == 3 and s.by_tier["paid"].ok == 2
    assert sum(g.requests for g in s.by_tier.values()) == s.requests
    assert sum(g.requests for g in s.by_kind.values()) == s.requests
    assert s.by_variant["small"].completion_tokens == 6


def test_cache_hit_rate_counts_only_answers_that_say() -> None:
    results = [result(0, cache="exact"), result(1, cache=""), result(2, cache="hit"), result(3, cache=None)]
    s = summarize("t", results, 1.0)
    assert (s.cache_hits, s.cache_known) == (2, 3)
    assert s.cache_hit_rate == pytest.approx(2 / 3)
    assert summarize("t", [result(0, cache=None)], 1.0).cache_hit_rate is None


def test_cost_uses_the_variant_price_and_cache_hits_are_free() -> None:
    prices = {"small": Price(1.0, 2.0), "big": Price(10.0, 10.0)}
    results = [
        result(0, prompt=1000, completion=500, variant="small"),  # 1.0 + 1.0
        result(1, prompt=100, completion=100, variant="big"),  # 2.0
        result(2, prompt=1000, completion=500, variant="small", cache="exact"),  # free
        result(3, status="500", variant="big", prompt=0, completion=0),  # failed: not billed
    ]
    s = summarize("t", results, 1.0, prices)
    assert s.cost == pytest.approx(4.0)
    assert s.cost_per_1k_tokens == pytest.approx(4.0 * 1000 / (1500 + 200 + 1500))
    assert s.by_variant["small"].cost == pytest.approx(2.0)
    assert s.unpriced_variants == []


def test_unpriced_variants_are_named_and_no_prices_means_no_cost() -> None:
    results = [result(0, variant="small"), result(1, variant="mystery")]
    s = summarize("t", results, 1.0, {"small": Price(1.0, 1.0)})
    assert s.unpriced_variants == ["mystery"]
    assert s.cost == pytest.approx(13 / 1000)
    assert s.cost_per_1k_tokens == pytest.approx(1.0)  # over priced tokens only
    none = summarize("t", results, 1.0)
    assert none.cost is None and none.cost_per_1k_tokens is None and none.unpriced_variants == []


def test_usage_reported_is_false_when_any_answer_lacked_usage() -> None:
    counted = RequestResult(0, "short", "paid", 0.0, 1.0, OK, 0.1, (), 0, 4, False, "x", None, "")
    assert summarize("t", [result(1), counted], 1.0).usage_reported is False
    assert summarize("t", [result(1)], 1.0).usage_reported is True


def test_table_rows_and_ratios_compare_targets() -> None:
    fast = summarize("fast", [result(0, ttft=0.1, end=1.0)], 1.0)
    slow = summarize("slow", [result(0, ttft=0.3, end=2.0)], 2.0)
    rows = {row.label: row for row in table_rows([fast, slow])}
    assert rows["TTFT p50"].values == pytest.approx((100.0, 300.0))
    assert rows["TTFT p50"].unit == "ms" and not rows["TTFT p50"].higher_is_better
    assert ratio(rows["TTFT p50"].values, 1) == pytest.approx(3.0)
    assert ratio(rows["requests/s"].values, 1) == pytest.approx(0.5)
    assert rows["cache hit rate"].values == (0.0, 0.0)
    assert ratio(rows["cost"].values, 1) is None  # no prices
    assert ratio((0.0, 1.0), 1) is None
