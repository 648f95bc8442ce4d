"""Which variant serves a request: tier limits, complexity moves it up or down, load moves it down.

A pure function of (tier, requested model, complexity score, load view) and the policy table, so the whole table is
unit-testable with fake load. Variants are ordered smallest (cheapest) to largest.
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmesh.errors import InvalidRequest, PermissionDenied
from llmesh.types import RouteInfo, RouteKind, Tier
from router.complexity import ComplexityScore

log = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_POLICY_FILE = Path(__file__).with_name("policy.toml")
# The kinds `choose` gives an `auto` request (the route's last deciding factor).
_AUTO_KINDS = frozenset(
    {RouteKind.TIER_DEFAULT, RouteKind.COMPLEXITY_UP, RouteKind.COMPLEXITY_DOWN, RouteKind.LOAD_SHED}
)


class LoadView(Protocol):
    def ttft_p95(self, variant: str) -> float: ...

    def in_flight(self, variant: str) -> int: ...


@dataclass(frozen=True)
class TierPolicy:
    # Empty = every variant this deployment serves.
    allowed: tuple[str, ...] = ()
    # Empty = the smallest allowed variant.
    default: str = ""
    # The configured default that `default` replaces because it is not served (load_policy); named in each reason.
    stands_in_for: str = ""


@dataclass(frozen=True)
class RoutingPolicy:
    # Smallest to largest; only variants this deployment serves.
    variants: tuple[str, ...]
    tiers: Mapping[Tier, TierPolicy] = field(default_factory=dict)
    # Complexity at or above `complexity_up` moves one size up, at or below `complexity_down` one size down.
    complexity_up: float = 0.6
    complexity_down: float = 0.1
    # Time-to-first-token budget; a pool whose p95 reaches `degrade_at` of it sheds new work to a smaller variant.
    ttft_budget_s: float = 2.0
    degrade_at: float = 0.75
    # Served only to requests that name them (and to tiers whose explicit default they are): `auto` routing,
    # complexity, load and failover never move a request onto them.
    pinned_only: tuple[str, ...] = ()
    # Price of 1k output tokens by variant, in cost units (for benchmarks; policy.toml [prices]).
    prices_per_1k: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def open_to_all(cls, variants: Sequence[str], default_variant: str = "") -> RoutingPolicy:
        if not variants:
            raise ValueError("no model variants found")
        if default_variant and default_variant not in variants:
            raise ValueError(f"default variant {default_variant!r} is not one of {list(variants)}")
        tiers = {tier: TierPolicy(default=default_variant) for tier in Tier}
        return cls(tuple(variants), tiers)

    def allowed_for(self, tier: Tier) -> tuple[str, ...]:
        allowed = self.tiers.get(tier, TierPolicy()).allowed
        return tuple(v for v in self.variants if not allowed or v in allowed)

    def tiers_for(self, variant: str) -> tuple[Tier, ...]:
        return tuple(tier for tier in Tier if variant in self.allowed_for(tier))

    def auto_for(self, tier: Tier) -> tuple[str, ...]:
        """The tier's ladder: the variants `auto` may choose for it, smallest first. Allowed ones, less those served
        only when pinned (but its own default)."""
        allowed = self.allowed_for(tier)
        default = self.tiers.get(tier, TierPolicy()).default
        return tuple(v for v in allowed if v not in self.pinned_only or v == default) or allowed

    def default_for(self, tier: Tier) -> str:
        allowed = self.auto_for(tier)
        default = self.tiers.get(tier, TierPolicy()).default
        return default if default in allowed else allowed[0]

    def fallbacks(self, tier: Tier, variant: str) -> tuple[str, ...]:
        """Smaller variants on the tier's ladder to fail over to from an `auto` route to `variant`, largest first.
        Every smaller rung, not one: when a pool has no healthy replica, any answer beats none."""
        rank = self.variants.index(variant)
        return tuple(v for v in reversed(self.auto_for(tier)) if self.variants.index(v) < rank)

    def price_per_1k(self, variant: str) -> float:
        """Cost units per 1k output tokens of `variant`."""
        try:
            return self.prices_per_1k[variant]
        except KeyError:
            raise LookupError(
                f"no price for variant {variant!r}: give it [prices.params_millions] or "
                "[prices.usd_per_1k_output_tokens] in the routing policy file"
            ) from None

    def validate_pin(self, tier: Tier, requested: str) -> None:
        if requested not in self.variants:
            known = ", ".join([AUTO, *self.variants])
            raise InvalidRequest(f"unknown model {requested!r}; available: {known}")
        if requested not in self.allowed_for(tier):
            raise PermissionDenied(f"model {requested!r} is not available to the {tier.value} tier")

    def validate_route(self, tier: Tier, requested: str, route: RouteInfo) -> None:
        """A decision made earlier (by Prepare) is honoured only if `choose` could have made it now: a pin names
        the requested variant, an `auto` route lands on a variant `auto` may choose for the tier."""
        pinned = requested not in ("", AUTO)
        if route.kind is RouteKind.PINNED or pinned:
            if route.kind is not RouteKind.PINNED or route.variant != requested:
                raise InvalidRequest(
                    f"prepared route ({route.kind.value} to {route.variant!r}) does not match the requested model "
                    f"{requested or AUTO!r}"
                )
            self.validate_pin(tier, requested)
            return
        if route.kind not in _AUTO_KINDS:
            raise InvalidRequest(f"prepared route kind {route.kind.value} is not a routing decision")
        if route.variant not in self.auto_for(tier):
            raise InvalidRequest(
                f"prepared route variant {route.variant!r} is not one `auto` may choose for the {tier.value} tier "
                f"({', '.join(self.auto_for(tier))})"
            )

    def choose(
        self,
        tier: Tier,
        requested: str,
        complexity: ComplexityScore | None = None,
        load: LoadView | None = None,
    ) -> RouteInfo:
        """Pinned: the named variant if the tier may use it. `auto`: the tier's default, one rung of its ladder up
        or down by complexity, then one rung down if that pool is loaded. The reason names every step."""
        if requested not in ("", AUTO):
            self.validate_pin(tier, requested)
            return RouteInfo(variant=requested, reason="pinned by request", kind=RouteKind.PINNED)
        ladder = self.auto_for(tier)
        variant = self.default_for(tier)
        kind = RouteKind.TIER_DEFAULT
        stands_in_for = self.tiers.get(tier, TierPolicy()).stands_in_for
        reasons = [f"tier {tier.value} default {variant}"]
        if stands_in_for and stands_in_for != variant:
            reasons[0] += f" (in place of {stands_in_for}, not served to this tier)"
        if complexity is not None:
            variant, moved, why = self._by_complexity(tier, ladder, variant, complexity)
            kind = moved or kind
            reasons.append(why)
        if load is not None:
            variant, shed, notes = self._by_load(tier, ladder, variant, load)
            kind = shed or kind
            reasons.extend(notes)
        return RouteInfo(variant=variant, reason="; ".join(reasons), kind=kind)

    def _by_complexity(
        self, tier: Tier, ladder: tuple[str, ...], variant: str, complexity: ComplexityScore
    ) -> tuple[str, RouteKind | None, str]:
        index = ladder.index(variant)
        said = f"complexity {complexity.value:.2f} ({', '.join(complexity.cues) or 'no cues'})"
        if complexity.value >= self.complexity_up:
            if index + 1 < len(ladder):
                return ladder[index + 1], RouteKind.COMPLEXITY_UP, f"{said} -> up to {ladder[index + 1]}"
            return variant, None, f"{said} -> stays: no larger variant for the {tier.value} tier"
        if complexity.value <= self.complexity_down:
            if index > 0:
                return ladder[index - 1], RouteKind.COMPLEXITY_DOWN, f"{said} -> down to {ladder[index - 1]}"
            return variant, None, f"{said} -> stays: no smaller variant for the {tier.value} tier"
        down = f"down at {self.complexity_down:.2f}" if self.complexity_down >= 0 else "down off"
        return variant, None, f"{said} -> stays (up at {self.complexity_up:.2f}, {down})"

    def _by_load(
        self, tier: Tier, ladder: tuple[str, ...], variant: str, load: LoadView
    ) -> tuple[str, RouteKind | None, list[str]]:
        """One rung down when the pool's first tokens are slow. Not further: each step costs answer quality (two
        rungs down from the 1.5B is SmolLM2), and shedding every tier's overflow down the whole ladder would pile it
        onto the smallest pool, the free tier's. Not onto a pool at least as slow: that would cost quality and not
        time."""
        p95 = load.ttft_p95(variant)
        if p95 < self.degrade_at * self.ttft_budget_s:
            return variant, None, []
        busy = f"load: {variant} first-token p95 {p95:.2f}s near the {self.ttft_budget_s:.1f}s budget"
        index = ladder.index(variant)
        if index == 0:
            return variant, None, [f"{busy}; no smaller variant for the {tier.value} tier -> stays"]
        smaller = ladder[index - 1]
        smaller_p95 = load.ttft_p95(smaller)
        if smaller_p95 >= p95:
            return variant, None, [f"{busy}; {smaller} is as slow (p95 {smaller_p95:.2f}s) -> stays"]
        return smaller, RouteKind.LOAD_SHED, [f"{busy} -> {smaller} (p95 {smaller_p95:.2f}s)"]


def _nearest(wanted: str, candidates: Sequence[str], rank: Mapping[str, int]) -> str:
    """The candidate nearest `wanted` in the policy's order, the smaller on a tie; the smallest if unranked."""
    if wanted not in rank:
        return candidates[0]
    return min(candidates, key=lambda v: (abs(rank[v] - rank[wanted]), rank[v]))


def _prices(section: Mapping[str, Any]) -> dict[str, float]:
    """[prices] -> cost units per 1k output tokens: explicit ones, else proportional to parameters."""
    rate = float(section.get("usd_per_1k_per_billion_params", 0.0))
    params = {str(k): float(v) for k, v in section.get("params_millions", {}).items()}
    explicit = {str(k): float(v) for k, v in section.get("usd_per_1k_output_tokens", {}).items()}
    bad = [k for k, v in [("usd_per_1k_per_billion_params", rate), *params.items(), *explicit.items()]
           if not math.isfinite(v) or v < 0]  # fmt: skip
    if bad:
        raise ValueError(f"[prices]: negative or non-finite values for {bad}")
    return {**{name: rate * millions / 1000 for name, millions in params.items()}, **explicit}


def load_policy(path: Path, served: Sequence[str], default_variant: str = "") -> RoutingPolicy:
    """Read the policy file and fit it to the variants actually served (missing ones are dropped, and tier defaults
    that are missing replaced by the nearest served variant the tier may use)."""
    with path.open("rb") as handle:
        raw: dict[str, Any] = tomllib.load(handle)
    order = [str(v) for v in raw.get("variants", {}).get("order", [])]
    # Served variants the file does not rank are treated as larger than every ranked one.
    variants = tuple([v for v in order if v in served] + sorted(v for v in served if v not in order))
    if not variants:
        raise ValueError("no model variants are served")
    rank = {v: i for i, v in enumerate([*order, *(v for v in variants if v not in order)])}
    pinned_only = tuple(str(v) for v in raw.get("variants", {}).get("pinned_only", []) if v in variants)
    unpinned = [v for v in variants if v not in pinned_only] or list(variants)
    tiers: dict[Tier, TierPolicy] = {}
    for tier in Tier:
        section = raw.get("tiers", {}).get(tier.value, {})
        allowed = tuple(v for v in section.get("allowed", []) if v in variants)
        if section.get("allowed") and not allowed:
            # Not "allow all": a free key must not reach the largest model because a deployment left out the small.
            allowed = (unpinned[0],)
            log.warning(
                "none of tier %s's allowed variants %s is served; allowing only %s",
                tier.value, section["allowed"], allowed[0],
            )  # fmt: skip
        default = default_variant or str(section.get("default", ""))
        usable = [v for v in variants if not allowed or v in allowed]
        stands_in_for = ""
        if default and default not in usable:
            ladder = [v for v in usable if v not in pinned_only] or usable
            default, stands_in_for = _nearest(default, ladder, rank), default
            log.warning(
                "tier %s default %s is not served to that tier; using %s, the nearest served variant it may use",
                tier.value, stands_in_for, default,
            )  # fmt: skip
        tiers[tier] = TierPolicy(allowed=allowed, default=default, stands_in_for=stands_in_for)
    thresholds = raw.get("complexity", {})
    load = raw.get("load", {})
    prices = _prices(raw.get("prices", {}))
    if unpriced := [v for v in variants if v not in prices]:
        log.info("no price for served variants %s (policy file [prices])", unpriced)
    return RoutingPolicy(
        variants=variants,
        tiers=tiers,
        complexity_up=float(thresholds.get("up", 0.6)),
        complexity_down=float(thresholds.get("down", 0.1)),
        ttft_budget_s=float(load.get("ttft_budget_s", 2.0)),
        degrade_at=float(load.get("degrade_at", 0.75)),
        pinned_only=pinned_only,
        prices_per_1k=prices,
    )
