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
LARGE_AND_MEDIUM_BUSY = FakeLoad({"large": 3, "medium": 1.6})


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
        # One rung down, not down the whole ladder; and not into a pool at least as slow.
        (Tier.ENTERPRISE, PLAIN, LARGE_AND_MEDIUM_BUSY, "medium", SHED, "-> medium (p95 1.60s)"),
        (Tier.ENTERPRISE, PLAIN, ALL_BUSY, "large", DEFAULT, "medium is as slow (p95 3.00s) -> stays"),
        (Tier.FREE, HARD, ALL_BUSY, "medium", UP, "load: medium first-token p95 3.00s"),
        (Tier.FREE, PLAIN, ALL_BUSY, "small", DEFAULT, "no smaller variant for the free tier -> stays"),
        # Complexity is explained even when it moves nothing.
        (Tier.ENTERPRISE, HARD, IDLE, "large", DEFAULT, "complexity 0.80 (code) -> stays: no larger variant"),
        (Tier.PAID, PLAIN, IDLE, "medium", DEFAULT, "complexity 0.30 (no cues) -> stays (up at 0.60, down at 0.10)"),
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


# The shipped policy with every variant served; scores from the real scorer (prompt tokens about as the Qwen
# template counts them).
INT8, FP32, GEMMA, Q05, Q15 = (
    "smollm2-135m-int8",
    "smollm2-135m",
    "gemma3-270m",
    "qwen2.5-coder-0.5b",
    "qwen2.5-coder-1.5b",
)
FULL = load_policy(DEFAULT_POLICY_FILE, [Q15, GEMMA, FP32, INT8, Q05])  # any order: the file ranks them
_SCORER = HeuristicScorer()
FACT = _SCORER.score([ChatMessage("user", "What is the capital of France?")], 40)
ARITHMETIC = _SCORER.score([ChatMessage("user", "What is 17 * 23?")], 40)
CODING = _SCORER.score(
    [ChatMessage("user", "Write a Python function that checks whether a string is a palindrome.")], 50
)


def test_shipped_policy_file_fits_served_variants() -> None:
    policy = load_policy(DEFAULT_POLICY_FILE, ["smollm2-135m"])
    assert policy.variants == ("smollm2-135m",)
    assert policy.choose(Tier.FREE, "auto").variant == "smollm2-135m"
    assert FULL.variants == (INT8, FP32, GEMMA, Q05, Q15)
    assert FULL.allowed_for(Tier.FREE) == (INT8, FP32)
    # The ladder `auto` climbs: the base Gemma and the fp32 twin of the int8 SmolLM2 are served only by name.
    assert FULL.auto_for(Tier.FREE) == (INT8,)
    assert FULL.auto_for(Tier.PAID) == FULL.auto_for(Tier.ENTERPRISE) == (INT8, Q05, Q15)
    assert [FULL.default_for(t) for t in (Tier.FREE, Tier.PAID, Tier.ENTERPRISE)] == [INT8, Q05, Q15]
    for tier in Tier:
        assert FULL.choose(tier, FP32).kind is RouteKind.PINNED, "SmolLM2 fp32 stays available by name"
    assert FULL.choose(Tier.PAID, GEMMA).variant == GEMMA


@pytest.mark.parametrize(
    ("tier", "complexity", "variant", "kind", "why"),
    [
        (Tier.FREE, None, INT8, DEFAULT, f"tier free default {INT8}"),
        (Tier.FREE, FACT, INT8, DEFAULT, "complexity 0.04 (no cues) -> stays (up at 0.25, down off)"),
        (Tier.FREE, CODING, INT8, DEFAULT, "complexity 0.29 (code) -> stays: no larger variant for the free tier"),
        (Tier.PAID, None, Q05, DEFAULT, f"tier paid default {Q05}"),
        # Simple requests stay on the paid default: `down` is off in the shipped policy.
        (Tier.PAID, FACT, Q05, DEFAULT, "complexity 0.04 (no cues) -> stays (up at 0.25, down off)"),
        (Tier.PAID, ARITHMETIC, Q05, DEFAULT, "complexity 0.19 (math) -> stays"),
        (Tier.PAID, CODING, Q15, UP, f"tier paid default {Q05}; complexity 0.29 (code) -> up to {Q15}"),
        (Tier.ENTERPRISE, FACT, Q15, DEFAULT, f"tier enterprise default {Q15}; complexity 0.04"),
        (Tier.ENTERPRISE, CODING, Q15, DEFAULT, "-> stays: no larger variant for the enterprise tier"),
    ],
)
def test_shipped_ladder(
    tier: Tier, complexity: ComplexityScore | None, variant: str, kind: RouteKind, why: str
) -> None:
    route = FULL.choose(tier, "auto", complexity, IDLE)
    assert (route.variant, route.kind) == (variant, kind)
    assert why in route.reason


def test_shipped_paid_simple_requests_can_be_sent_down(tmp_path: Path) -> None:
    text = DEFAULT_POLICY_FILE.read_text()
    assert "down = -1.0\n" in text
    tuned = tmp_path / "policy.toml"
    tuned.write_text(text.replace("down = -1.0\n", "down = 0.06\n"))
    policy = load_policy(tuned, list(FULL.variants))
    route = policy.choose(Tier.PAID, "auto", FACT)
    assert (route.variant, route.kind) == (INT8, RouteKind.COMPLEXITY_DOWN)
    assert f"complexity 0.04 (no cues) -> down to {INT8}" in route.reason
    assert policy.choose(Tier.PAID, "auto", ARITHMETIC).variant == Q05


@pytest.mark.parametrize("pinned", [Q15, Q05, GEMMA])
def test_free_key_cannot_pin_a_larger_model(pinned: str) -> None:
    # PermissionDenied is gRPC PERMISSION_DENIED (llmesh/grpc_util.py), HTTP 403 at the edge.
    with pytest.raises(PermissionDenied, match=f"model '{pinned}' is not available to the free tier"):
        FULL.choose(Tier.FREE, pinned)
    with pytest.raises(PermissionDenied):
        FULL.validate_route(Tier.FREE, pinned, RouteInfo(pinned, "", RouteKind.PINNED))
    assert FULL.tiers_for(Q15) == (Tier.PAID, Tier.ENTERPRISE)


@pytest.mark.parametrize(
    ("tier", "complexity", "busy", "variant", "kind", "why"),
    [
        (Tier.FREE, FACT, {INT8: 3.0}, INT8, DEFAULT, "no smaller variant for the free tier -> stays"),
        (Tier.PAID, FACT, {Q05: 1.6}, INT8, SHED, f"load: {Q05} first-token p95 1.60s near the 2.0s budget -> {INT8}"),
        (Tier.PAID, CODING, {Q15: 1.6}, Q05, SHED, f"up to {Q15}; load: {Q15} first-token p95 1.60s"),
        # One rung: a paid coding request never sheds from the 1.5B to SmolLM2, even when the 0.5B is also slow.
        (Tier.PAID, CODING, {Q15: 3.0, Q05: 2.0}, Q05, SHED, f"-> {Q05} (p95 2.00s)"),
        (Tier.PAID, CODING, {Q15: 2.0, Q05: 3.0}, Q15, UP, f"{Q05} is as slow (p95 3.00s) -> stays"),
        (Tier.ENTERPRISE, FACT, {Q15: 1.6}, Q05, SHED, f"-> {Q05}"),
        (Tier.ENTERPRISE, FACT, {Q15: 3.0, Q05: 1.6}, Q05, SHED, f"-> {Q05}"),
        (Tier.ENTERPRISE, FACT, {Q15: 3.0, Q05: 3.0}, Q15, DEFAULT, "-> stays"),
        # Pools the ladder skips do not matter.
        (Tier.PAID, FACT, {GEMMA: 9.0, FP32: 9.0}, Q05, DEFAULT, "stays (up at 0.25, down off)"),
    ],
)
def test_shipped_ladder_under_load(
    tier: Tier, complexity: ComplexityScore, busy: dict[str, float], variant: str, kind: RouteKind, why: str
) -> None:
    route = FULL.choose(tier, "auto", complexity, FakeLoad(busy))
    assert (route.variant, route.kind) == (variant, kind)
    assert why in route.reason


def test_under_any_load_each_tier_moves_at_most_one_rung_and_stays_on_its_ladder() -> None:
    import itertools

    for tier, complexity in itertools.product(Tier, (None, FACT, ARITHMETIC, CODING)):
        ladder = FULL.auto_for(tier)
        unloaded = FULL.choose(tier, "auto", complexity, IDLE).variant
        for slow in itertools.product((0.0, 1.6, 3.0), repeat=len(FULL.variants)):
            route = FULL.choose(tier, "auto", complexity, FakeLoad(dict(zip(FULL.variants, slow, strict=True))))
            assert route.variant in ladder
            assert 0 <= ladder.index(unloaded) - ladder.index(route.variant) <= 1, (tier, complexity, slow, route)
            if tier is Tier.FREE:
                assert not route.variant.startswith("qwen"), route
            assert route.variant not in (GEMMA, FP32), route


def test_failover_stays_on_the_ladder() -> None:
    assert FULL.fallbacks(Tier.PAID, Q15) == (Q05, INT8), "never the base Gemma or the fp32 twin"
    assert FULL.fallbacks(Tier.ENTERPRISE, Q05) == (INT8,)
    assert FULL.fallbacks(Tier.FREE, INT8) == ()
    with pytest.raises(InvalidRequest, match=f"'{GEMMA}' is not one `auto` may choose for the paid tier"):
        FULL.validate_route(Tier.PAID, "auto", RouteInfo(GEMMA, "", RouteKind.LOAD_SHED))


@pytest.mark.parametrize(
    ("served", "defaults", "free_allowed"),
    [
        # The tests' mesh: the SmolLM2 pair. Paid and enterprise fall back to the nearest they may use for auto.
        ([INT8, FP32], (INT8, INT8, INT8), (INT8, FP32)),
        # Only the Qwen pair: free gets the smallest served, and only that.
        ([Q05, Q15], (Q05, Q05, Q15), (Q05,)),
        # Paid's 0.5B missing: the 1.5B is nearer to it in size than SmolLM2, not silently the smallest.
        ([INT8, Q15], (INT8, Q15, Q15), (INT8,)),
        ([INT8, Q05], (INT8, Q05, Q05), (INT8,)),
        # Never the base Gemma, though it is nearest to the 0.5B in the order.
        ([INT8, FP32, GEMMA], (INT8, INT8, INT8), (INT8, FP32)),
        ([FP32, GEMMA, Q15], (FP32, Q15, Q15), (FP32,)),
    ],
)
def test_partly_served(served: list[str], defaults: tuple[str, str, str], free_allowed: tuple[str, ...]) -> None:
    policy = load_policy(DEFAULT_POLICY_FILE, served)
    assert tuple(policy.default_for(t) for t in (Tier.FREE, Tier.PAID, Tier.ENTERPRISE)) == defaults
    assert policy.allowed_for(Tier.FREE) == free_allowed
    for tier, complexity in [(t, c) for t in Tier for c in (None, FACT, CODING)]:
        route = policy.choose(tier, "auto", complexity, FakeLoad(dict.fromkeys(served, 3.0)))
        assert route.variant in policy.auto_for(tier)
        assert route.variant != GEMMA
        if tier is Tier.FREE and INT8 in served:
            assert route.variant == INT8
    for pinned in (v for v in served if v not in free_allowed):
        with pytest.raises(PermissionDenied):
            policy.choose(Tier.FREE, pinned)


def test_a_stand_in_default_is_logged_and_named_in_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="router.policy"):
        policy = load_policy(DEFAULT_POLICY_FILE, [INT8, FP32])
    assert f"tier paid default {Q05} is not served to that tier; using {INT8}" in caplog.text
    route = policy.choose(Tier.PAID, "auto", FACT)
    assert route.reason.startswith(f"tier paid default {INT8} (in place of {Q05}, not served to this tier)")
    assert "(in place of" not in policy.choose(Tier.FREE, "auto").reason


def test_prices_are_proportional_to_parameters_unless_given(tmp_path: Path) -> None:
    assert FULL.price_per_1k(Q15) == pytest.approx(0.00154)
    assert FULL.price_per_1k(Q15) / FULL.price_per_1k(Q05) == pytest.approx(1540 / 494)
    assert FULL.price_per_1k(INT8) == FULL.price_per_1k(FP32) == pytest.approx(0.0001345)
    assert FULL.price_per_1k(GEMMA) == pytest.approx(0.000268)
    # Prices do not depend on what is served (a benchmark may price a variant it pinned elsewhere).
    assert load_policy(DEFAULT_POLICY_FILE, [INT8]).price_per_1k(Q15) == FULL.price_per_1k(Q15)
    with pytest.raises(LookupError, match="no price for variant 'small'"):
        POLICY.price_per_1k("small")
    explicit = tmp_path / "policy.toml"
    explicit.write_text(
        DEFAULT_POLICY_FILE.read_text().replace(
            "[prices.usd_per_1k_output_tokens]\n", f'[prices.usd_per_1k_output_tokens]\n"{Q15}" = 0.002\n'
        )
    )
    priced = load_policy(explicit, list(FULL.variants))
    assert priced.price_per_1k(Q15) == 0.002
    assert priced.price_per_1k(Q05) == FULL.price_per_1k(Q05)
    negative = tmp_path / "negative.toml"
    negative.write_text('[variants]\norder = ["a"]\n[prices.params_millions]\na = -1.0\n')
    with pytest.raises(ValueError, match="negative or non-finite values for \\['a'\\]"):
        load_policy(negative, ["a"])


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
    assert policy.default_for(Tier.PAID) == policy.default_for(Tier.ENTERPRISE) == "b"
    # None of free's variants is served: free gets the smallest served one only, whatever the override.
    assert policy.allowed_for(Tier.FREE) == ("a",)
    assert policy.default_for(Tier.FREE) == "a"
    full = load_policy(DEFAULT_POLICY_FILE, list(FULL.variants), default_variant=FP32)
    assert [full.default_for(t) for t in Tier] == [FP32] * 3, "an override may name a pinned-only variant"


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


def test_gateway_cost_counter_prices_are_the_policy_prices() -> None:
    # The gateway cannot import the router (services are independent), so its default price list repeats the
    # policy's; this keeps the two in step.
    from gateway.config import GatewaySettings
    from gateway.metrics import parse_prices
    from triton_models.catalogue import KNOWN_VARIANTS

    gateway = parse_prices(GatewaySettings().prices_per_1k)
    policy = load_policy(DEFAULT_POLICY_FILE, list(KNOWN_VARIANTS))
    assert set(gateway) == set(KNOWN_VARIANTS)
    for variant, price in gateway.items():
        assert price == pytest.approx(policy.price_per_1k(variant), rel=1e-3), variant
