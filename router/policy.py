"""Which variant serves a request: tier limits, complexity moves it up or down, load moves it down.

A pure function of (tier, requested model, complexity score, load view) and the policy table, so the whole table is
unit-testable with fake load. Variants are ordered smallest (cheapest) to largest.
"""

from __future__ import annotations

import logging
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
    # complexity and load never move a request onto them.
    pinned_only: tuple[str, ...] = ()

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
        """The variants `auto` may choose for the tier: allowed ones, less those served only when pinned."""
        allowed = self.allowed_for(tier)
        default = self.tiers.get(tier, TierPolicy()).default
        return tuple(v for v in allowed if v not in self.pinned_only or v == default) or allowed

    def default_for(self, tier: Tier) -> str:
        allowed = self.auto_for(tier)
        default = self.tiers.get(tier, TierPolicy()).default
        return default if default in allowed else allowed[0]

    def fallbacks(self, tier: Tier, variant: str) -> tuple[str, ...]:
        """Smaller variants the tier may use instead of `variant`, largest first."""
        allowed = self.allowed_for(tier)
        return tuple(v for v in reversed(allowed) if self.variants.index(v) < self.variants.index(variant))

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
        if requested not in ("", AUTO):
            self.validate_pin(tier, requested)
            return RouteInfo(variant=requested, reason="pinned by request", kind=RouteKind.PINNED)
        allowed = self.auto_for(tier)
        variant = self.default_for(tier)
        kind = RouteKind.TIER_DEFAULT
        reasons = [f"tier {tier.value} default {variant}"]
        if complexity is not None:
            index = allowed.index(variant)
            cues = f" ({', '.join(complexity.cues)})" if complexity.cues else ""
            if complexity.value >= self.complexity_up and index + 1 < len(allowed):
                variant, kind = allowed[index + 1], RouteKind.COMPLEXITY_UP
                reasons.append(f"complexity {complexity.value:.2f}{cues} -> up to {variant}")
            elif complexity.value <= self.complexity_down and index > 0:
                variant, kind = allowed[index - 1], RouteKind.COMPLEXITY_DOWN
                reasons.append(f"complexity {complexity.value:.2f} -> down to {variant}")
        if load is not None:
            threshold = self.degrade_at * self.ttft_budget_s
            while (p95 := load.ttft_p95(variant)) >= threshold and allowed.index(variant) > 0:
                smaller = allowed[allowed.index(variant) - 1]
                reasons.append(
                    f"load: {variant} first-token p95 {p95:.2f}s near the {self.ttft_budget_s:.1f}s budget -> {smaller}"
                )
                variant, kind = smaller, RouteKind.LOAD_SHED
        return RouteInfo(variant=variant, reason="; ".join(reasons), kind=kind)


def load_policy(path: Path, served: Sequence[str], default_variant: str = "") -> RoutingPolicy:
    """Read the policy file and fit it to the variants actually served (missing ones are dropped)."""
    with path.open("rb") as handle:
        raw: dict[str, Any] = tomllib.load(handle)
    order = [str(v) for v in raw.get("variants", {}).get("order", [])]
    # Served variants the file does not rank are treated as larger than every ranked one.
    variants = tuple([v for v in order if v in served] + sorted(v for v in served if v not in order))
    if not variants:
        raise ValueError("no model variants are served")
    tiers: dict[Tier, TierPolicy] = {}
    for tier in Tier:
        section = raw.get("tiers", {}).get(tier.value, {})
        allowed = tuple(v for v in section.get("allowed", []) if v in variants)
        if section.get("allowed") and not allowed:
            log.warning("none of tier %s's allowed variants %s is served; allowing all", tier.value, section["allowed"])
        default = default_variant or str(section.get("default", ""))
        tiers[tier] = TierPolicy(allowed=allowed, default=default)
    thresholds = raw.get("complexity", {})
    load = raw.get("load", {})
    return RoutingPolicy(
        variants=variants,
        tiers=tiers,
        complexity_up=float(thresholds.get("up", 0.6)),
        complexity_down=float(thresholds.get("down", 0.1)),
        ttft_budget_s=float(load.get("ttft_budget_s", 2.0)),
        degrade_at=float(load.get("degrade_at", 0.75)),
        pinned_only=tuple(str(v) for v in raw.get("variants", {}).get("pinned_only", []) if v in variants),
    )
