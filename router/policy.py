"""Which variant serves a request. Minimal for now: tier -> allowed variants and a default; pinning by name.

The router issue extends this with complexity scoring and load-aware degradation; the decision stays a pure
function of (tier, requested model, known variants) plus whatever state is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmesh.errors import InvalidRequest, PermissionDenied
from llmesh.types import RouteInfo, Tier

AUTO = "auto"


@dataclass(frozen=True)
class TierPolicy:
    # Empty = every variant this deployment serves.
    allowed: tuple[str, ...] = ()
    # Empty = the router's default variant.
    default: str = ""


@dataclass(frozen=True)
class RoutingPolicy:
    variants: tuple[str, ...]
    default_variant: str
    tiers: Mapping[Tier, TierPolicy]

    @classmethod
    def open_to_all(cls, variants: Sequence[str], default_variant: str = "") -> RoutingPolicy:
        if not variants:
            raise ValueError("no model variants found")
        default = default_variant or variants[0]
        if default not in variants:
            raise ValueError(f"default variant {default!r} is not one of {list(variants)}")
        return cls(tuple(variants), default, {tier: TierPolicy() for tier in Tier})

    def allowed_for(self, tier: Tier) -> tuple[str, ...]:
        policy = self.tiers.get(tier, TierPolicy())
        return policy.allowed or self.variants

    def tiers_for(self, variant: str) -> tuple[str, ...]:
        return tuple(tier.value for tier in Tier if variant in self.allowed_for(tier))

    def choose(self, tier: Tier, requested: str) -> RouteInfo:
        allowed = self.allowed_for(tier)
        if requested in ("", AUTO):
            policy = self.tiers.get(tier, TierPolicy())
            variant = policy.default or (self.default_variant if self.default_variant in allowed else allowed[0])
            return RouteInfo(variant=variant, reason=f"tier {tier.value} default")
        if requested not in self.variants:
            known = ", ".join([AUTO, *self.variants])
            raise InvalidRequest(f"unknown model {requested!r}; available: {known}")
        if requested not in allowed:
            raise PermissionDenied(f"model {requested!r} is not available to the {tier.value} tier")
        return RouteInfo(variant=requested, reason="pinned by request")
