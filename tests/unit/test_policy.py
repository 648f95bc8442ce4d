"""The routing table: tier x complexity x load -> variant, with a fake clock and fake load."""

from pathlib import Path

import pytest

from llmesh.errors import InvalidRequest, PermissionDenied
from llmesh.types import ChatMessage, RouteInfo, RouteKind, Tier
from router.complexity import ComplexityScore, HeuristicScorer
from router.load import LoadTracker
from router.policy import DEFAULT_POLICY_FILE, RoutingPolicy, TierPolicy, load_policy

VARIANTS = ("small", "medium", "large")
POLICY = RoutingPolicy(
    VARIANTS,
    {
        Tier.FREE: TierPolicy(allowed=("small", "medium"), default="small"),
        Tier.PAID: TierPolicy(default="medium"),
        Tier.ENTERPRISE: TierPolicy(default="large"),
    },
    complexity_up=0.6,
    complexity_down=0.1,
    ttft_budget_s=2.0,
    degrade_at=0.75,
)


class FakeLoad:
    def __init__(self, p95: dict[str, float]) -> None:
        self.p95 = p95

    def ttft_p95(self, variant: str) -> float:
        return self.p95.get(variant, 0.0)

    def in_flight(self, variant: str) -> int:
        return 0


SIMPLE, PLAIN, HARD = ComplexityScore(0.05, ()), ComplexityScore(0.3, ()), ComplexityScore(0.8, ("code",))
IDLE, LARGE_BUSY, ALL_BUSY = FakeLoad({}), FakeLoad({"large": 1.8}), FakeLoad({"large": 3, "medium": 3, "small": 3})


DEFAULT, UP, DOWN, SHED = (
    RouteKind.TIER_DEFAULT,
    RouteKind.COMPLEXITY_UP,
    RouteKind.COMPLEXITY_DOWN,
    RouteKind.LOAD_SHED,
)


@pytest.mark.parametrize(
    ("tier", "complexity", "load", "variant", "kind", "why"),
    [
        (Tier.FREE, PLAIN, IDLE, "small", DEFAULT, "tier free default small"),
        (Tier.FREE, HARD, IDLE, "medium", UP, "complexity 0.80 (code) -> up to medium"),
        (Tier.FREE, SIMPLE, IDLE, "small", DEFAULT, "tier free default small"),
        (Tier.PAID, PLAIN, IDLE, "medium", DEFAULT, "tier paid default medium"),
        (Tier.PAID, HARD, IDLE, "large", UP, "up to large"),
        (Tier.PAID, SIMPLE, IDLE, "small", DOWN, "down to small"),
        (Tier.PAID, HARD, LARGE_BUSY, "medium", SHED, "load: large first-token p95 1.80s near the 2.0s budget"),
        (Tier.ENTERPRISE, PLAIN, IDLE, "large", DEFAULT, "tier enterprise default large"),
        (Tier.ENTERPRISE, PLAIN, LARGE_BUSY, "medium", SHED, "load: large"),
        (Tier.ENTERPRISE, PLAIN, ALL_BUSY, "small", SHED, "-> small"),
        (Tier.FREE, HARD, ALL_BUSY, "small", SHED, "load: medium"),
    ],
)
def test_policy_table(
    tier: Tier, complexity: ComplexityScore, load: FakeLoad, variant: str, kind: RouteKind, why: str
) -> None:
    route = POLICY.choose(tier, "auto", complexity, load)
    assert (route.variant, route.kind) == (variant, kind), "the kind is the factor that decided last"
    assert why in route.reason


def test_pinned_variant_wins_over_load() -> None:
    route = POLICY.choose(Tier.PAID, "large", HARD, ALL_BUSY)
    assert route == RouteInfo("large", "pinned by request", RouteKind.PINNED)


def test_a_prepared_route_is_valid_only_if_choose_could_make_it_now() -> None:
    POLICY.validate_route(Tier.PAID, "auto", RouteInfo("small", "", RouteKind.LOAD_SHED))
    POLICY.validate_route(Tier.PAID, "large", RouteInfo("large", "", RouteKind.PINNED))
    with pytest.raises(InvalidRequest, match="'large' is not one `auto` may choose for the free tier"):
        POLICY.validate_route(Tier.FREE, "auto", RouteInfo("large", "", RouteKind.COMPLEXITY_UP))
    with pytest.raises(InvalidRequest, match="does not match the requested model 'medium'"):
        POLICY.validate_route(Tier.PAID, "medium", RouteInfo("large", "", RouteKind.PINNED))
    with pytest.raises(InvalidRequest, match="kind fallback is not a routing decision"):
        POLICY.validate_route(Tier.PAID, "auto", RouteInfo("small", "", RouteKind.FALLBACK))
    with pytest.raises(PermissionDenied):
        POLICY.validate_route(Tier.FREE, "large", RouteInfo("large", "", RouteKind.PINNED))


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(InvalidRequest, match="unknown model 'gpt-9'; available: auto, small, medium, large"):
        POLICY.choose(Tier.PAID, "gpt-9")


def test_tier_not_allowed_is_permission_denied() -> None:
    with pytest.raises(PermissionDenied, match="not available to the free tier"):
        POLICY.choose(Tier.FREE, "large")
    assert POLICY.tiers_for("large") == (Tier.PAID, Tier.ENTERPRISE)


def test_fallbacks_are_smaller_allowed_variants_largest_first() -> None:
    assert POLICY.fallbacks(Tier.PAID, "large") == ("medium", "small")
    assert POLICY.fallbacks(Tier.FREE, "medium") == ("small",)
    assert POLICY.fallbacks(Tier.PAID, "small") == ()


def test_shipped_policy_file_fits_served_variants() -> None:
    policy = load_policy(DEFAULT_POLICY_FILE, ["smollm2-135m"])
    assert policy.variants == ("smollm2-135m",)
    assert policy.choose(Tier.FREE, "auto").variant == "smollm2-135m"
    full = load_policy(DEFAULT_POLICY_FILE, ["gemma3-270m", "smollm2-135m", "smollm2-135m-int8"])
    assert full.variants == ("smollm2-135m-int8", "smollm2-135m", "gemma3-270m")
    assert full.allowed_for(Tier.FREE) == ("smollm2-135m-int8", "smollm2-135m")
    assert full.default_for(Tier.PAID) == "smollm2-135m"
    # Shipped: simple paid requests stay on the tier default (moving them down is a quality trade, off by default).
    assert full.choose(Tier.PAID, "auto", ComplexityScore(0.0, ())).variant == "smollm2-135m"
    # The base (not instruction-tuned) Gemma serves only requests that name it.
    assert full.choose(Tier.PAID, "auto", ComplexityScore(0.9, ("code",))).variant == "smollm2-135m"
    assert full.choose(Tier.PAID, "gemma3-270m").variant == "gemma3-270m"


def test_pinned_only_variants_are_never_chosen_by_auto() -> None:
    import dataclasses

    policy = dataclasses.replace(POLICY, pinned_only=("large",))
    hard = ComplexityScore(0.9, ("math",))
    assert policy.choose(Tier.PAID, "auto", hard).variant == "medium"
    assert policy.choose(Tier.PAID, "large").kind is RouteKind.PINNED
    # Unless a tier names it as its default: then it is that tier's auto choice, and load still degrades it.
    assert policy.choose(Tier.ENTERPRISE, "auto").variant == "large"
    busy = FakeLoad({"large": 1.8})
    assert policy.choose(Tier.ENTERPRISE, "auto", load=busy).variant == "medium"


def test_policy_file_default_override(tmp_path: Path) -> None:
    policy = load_policy(DEFAULT_POLICY_FILE, ["a", "b"], default_variant="b")
    assert policy.default_for(Tier.FREE) == "b"


def test_heuristic_scorer_cues() -> None:
    scorer = HeuristicScorer()
    simple = scorer.score([ChatMessage("user", "hi")], 5)
    assert simple.value < 0.1 and simple.cues == ()
    hard = scorer.score(
        [ChatMessage("user", "Explain step by step and prove it:\n```python\ndef f(x): return x\n```")], 400
    )
    assert hard.value >= 0.6
    assert {"code", "math", "multi-step"} <= set(hard.cues)


def test_load_tracker_p95_counts_waiting_requests() -> None:
    now = [100.0]
    load = LoadTracker(window_s=10, clock=lambda: now[0])
    for _ in range(9):
        ticket = load.started("v")
        now[0] += 0.1
        load.first_token("v", ticket)
        load.finished("v", ticket)
    assert load.ttft_p95("v") == pytest.approx(0.1)
    stuck = load.started("v")
    now[0] += 5.0
    # 1 of 10 is the p95: a request still waiting counts at its current wait.
    assert load.ttft_p95("v") == pytest.approx(5.0)
    assert load.in_flight("v") == 1
    load.finished("v", stuck)
    now[0] += 20.0
    assert load.ttft_p95("v") == 0.0, "samples leave the window"
