"""Cost per answer: prices per variant, and one workload's cost, latency and quality summed up per policy.

Prices are in the routing policy's unit per 1,000 output tokens (`RoutingPolicy.price_per_1k`, router/policy.toml's
[prices]); with a policy module that has no prices, proportional to the variant's parameter count (its compute per
token) at the policy file's default rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.engine.__main__ import percentile
from router.policy import DEFAULT_POLICY_FILE, RoutingPolicy, load_policy

# Fallback prices when the policy has none: parameters in millions (the models' official totals, as
# router/policy.toml's [prices.params_millions]) at PRICE_PER_BILLION per 1k output tokens.
PARAMS_MILLIONS = {
    "smollm2-135m": 134.5,
    "smollm2-135m-int8": 134.5,
    "gemma3-270m": 268.0,
    "qwen2.5-coder-0.5b": 494.0,
    "qwen2.5-coder-1.5b": 1540.0,
}
PRICE_PER_BILLION = 0.001


def parameter_price(variant: str) -> float:
    if variant not in PARAMS_MILLIONS:
        raise KeyError(f"no parameter count for {variant!r}; add it to benchmarks/quality/cost.py PARAMS_MILLIONS")
    return PRICE_PER_BILLION * PARAMS_MILLIONS[variant] / 1000


def _policy(variants: Sequence[str], policy_file: Path | None) -> RoutingPolicy:
    return load_policy(policy_file or DEFAULT_POLICY_FILE, served=list(variants))


def price_table(variants: Sequence[str], policy_file: Path | None = None) -> tuple[dict[str, float], str]:
    """Price per 1k output tokens of each variant, and where the numbers came from."""
    priced: Callable[[str], float] | None = getattr(_policy(variants, policy_file), "price_per_1k", None)
    if priced is not None:
        return {v: float(priced(v)) for v in variants}, "the routing policy's [prices]"
    return {v: parameter_price(v) for v in variants}, f"{PRICE_PER_BILLION} per billion parameters"


def largest(variants: Sequence[str], policy_file: Path | None = None) -> str:
    """The largest served variant `auto` may route to (the policy's order, pinned-only ones left out)."""
    policy = _policy(variants, policy_file)
    routable = [v for v in policy.variants if v not in policy.pinned_only]
    return (routable or list(policy.variants))[-1]


@dataclass(frozen=True)
class Answer:
    """One answered request of the mixed workload."""

    item: str  # task id or question id
    kind: str  # "hard" (HumanEval) | "simple"
    variant: str  # the response's `model`: who answered
    completion_tokens: int
    seconds: float  # end to end
    correct: bool
    route_reason: str = ""


def cost(answers: Sequence[Answer], prices: dict[str, float]) -> float:
    """Σ price(variant) x tokens / 1000 over the answers."""
    return sum(prices[a.variant] * a.completion_tokens / 1000 for a in answers)


def summarize(answers: Sequence[Answer], prices: dict[str, float]) -> dict[str, object]:
    total = cost(answers, prices)
    tokens = sum(a.completion_tokens for a in answers)
    seconds = [a.seconds for a in answers]
    hard = [a for a in answers if a.kind == "hard"]
    simple = [a for a in answers if a.kind == "simple"]
    by_variant: dict[str, int] = {}
    for a in answers:
        by_variant[a.variant] = by_variant.get(a.variant, 0) + 1
    return {
        "requests": len(answers),
        "output_tokens": tokens,
        "cost": total,
        "cost_per_1k_tokens": 1000 * total / tokens if tokens else 0.0,
        "cost_per_answer": total / len(answers) if answers else 0.0,
        "latency_p50_s": percentile(seconds, 50) if seconds else 0.0,
        "latency_p95_s": percentile(seconds, 95) if seconds else 0.0,
        "humaneval_pass": sum(a.correct for a in hard) / len(hard) if hard else 0.0,
        "simple_accuracy": sum(a.correct for a in simple) / len(simple) if simple else 0.0,
        "quality": sum(a.correct for a in answers) / len(answers) if answers else 0.0,
        "answered_by": by_variant,
    }


def compare(routed: dict[str, object], large: dict[str, object]) -> dict[str, float]:
    """Routing against all-large: cost reduction in % (per answer) and quality difference in points (routed -
    large; negative = routing answers worse)."""

    def number(summary: dict[str, object], key: str) -> float:
        value = summary[key]
        assert isinstance(value, (int, float))
        return float(value)

    large_cost = number(large, "cost_per_answer")
    return {
        "cost_reduction_pct": 100 * (1 - number(routed, "cost_per_answer") / large_cost) if large_cost else 0.0,
        "quality_diff_points": 100 * (number(routed, "quality") - number(large, "quality")),
        "humaneval_diff_points": 100 * (number(routed, "humaneval_pass") - number(large, "humaneval_pass")),
        "simple_diff_points": 100 * (number(routed, "simple_accuracy") - number(large, "simple_accuracy")),
    }
