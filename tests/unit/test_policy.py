import pytest

from llmesh.errors import InvalidRequest, PermissionDenied
from llmesh.types import Tier
from router.policy import RoutingPolicy, TierPolicy


def test_auto_uses_tier_default() -> None:
    policy = RoutingPolicy.open_to_all(["small", "large"])
    route = policy.choose(Tier.FREE, "auto")
    assert route.variant == "small"
    assert "tier free default" in route.reason
    assert policy.choose(Tier.PAID, "").variant == "small"


def test_pinned_variant() -> None:
    route = RoutingPolicy.open_to_all(["small", "large"]).choose(Tier.PAID, "large")
    assert (route.variant, route.reason) == ("large", "pinned by request")


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(InvalidRequest, match="unknown model 'gpt-9'; available: auto, small, large"):
        RoutingPolicy.open_to_all(["small", "large"]).choose(Tier.PAID, "gpt-9")


def test_tier_not_allowed() -> None:
    policy = RoutingPolicy(
        variants=("small", "large"),
        default_variant="small",
        tiers={Tier.FREE: TierPolicy(allowed=("small",)), Tier.PAID: TierPolicy()},
    )
    with pytest.raises(PermissionDenied, match="not available to the free tier"):
        policy.choose(Tier.FREE, "large")
    assert policy.tiers_for("large") == ("paid", "enterprise")


def test_default_must_exist() -> None:
    with pytest.raises(ValueError, match="default variant"):
        RoutingPolicy.open_to_all(["small"], "huge")
