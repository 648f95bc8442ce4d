"""llmesh bench workloads: reproducible request sequences, the mix, tiers, cacheable repeats, the file format."""

from __future__ import annotations

import itertools
import json
import statistics
import tomllib
from collections import Counter

import pytest

from control.bench.command import EXAMPLE_WORKLOAD
from control.bench.workload import (
    BenchRequest,
    Price,
    WorkloadGenerator,
    WorkloadSpec,
    poisson_gaps,
    spec_from_mapping,
)


def take(spec: WorkloadSpec, n: int, tiers: tuple[str, ...] = ("default",)) -> list[BenchRequest]:
    return list(itertools.islice(WorkloadGenerator(spec, tiers), n))


def test_same_seed_same_sequence_other_seed_differs() -> None:
    first = take(WorkloadSpec(seed=7), 200, ("free", "paid"))
    again = take(WorkloadSpec(seed=7), 200, ("free", "paid"))
    other = take(WorkloadSpec(seed=8), 200, ("free", "paid"))
    assert first == again
    assert [r.index for r in first] == list(range(200))
    assert [r.messages for r in first] != [r.messages for r in other]
    assert [(r.kind, r.tier) for r in first] != [(r.kind, r.tier) for r in other]


def test_mix_weights_give_the_expected_shares() -> None:
    spec = WorkloadSpec(mix={"short": 4, "long": 1, "shared_prefix": 2, "repeat": 3})
    kinds = Counter(r.kind for r in take(spec, 4000))
    for kind, share in {"short": 0.4, "long": 0.1, "shared_prefix": 0.2, "repeat": 0.3}.items():
        assert kinds[kind] / 4000 == pytest.approx(share, abs=0.03), kinds


def test_a_kind_with_weight_zero_never_appears() -> None:
    kinds = {r.kind for r in take(WorkloadSpec(mix={"short": 1, "repeat": 0}), 300)}
    assert kinds == {"short"}


def test_tiers_by_weight_and_unweighted_tiers_count_one() -> None:
    spec = WorkloadSpec(tier_weights={"paid": 3, "free": 1, "off": 0})
    tiers = Counter(r.tier for r in take(spec, 4000, ("free", "paid", "off")))
    assert tiers["off"] == 0
    assert tiers["paid"] / 4000 == pytest.approx(0.75, abs=0.03)
    even = Counter(r.tier for r in take(WorkloadSpec(), 4000, ("a", "b")))
    assert even["a"] / 4000 == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="weight 0"):
        WorkloadGenerator(WorkloadSpec(tier_weights={"x": 0}), ("x",))


def test_repeats_are_byte_identical_requests_from_a_small_pool() -> None:
    spec = WorkloadSpec(repeat_pool=3, temperature=0.0)
    repeats = [r for r in take(spec, 600) if r.kind == "repeat"]
    bodies = {json.dumps(r.payload(stream=True), sort_keys=True) for r in repeats}
    assert len(repeats) > 100
    assert len(bodies) == 3  # a response cache can answer all but the first of each
    assert all(r.temperature == 0.0 and r.seed == spec.seed for r in repeats)


def test_short_prompts_are_unique_and_shared_prefix_is_shared() -> None:
    requests = take(WorkloadSpec(shared_prefix_words=150, long_words=250), 600)
    shorts = [r.messages for r in requests if r.kind == "short"]
    assert len(set(shorts)) == len(shorts)
    shared = [r.messages for r in requests if r.kind == "shared_prefix"]
    systems = {m[0] for m in shared}
    assert len(systems) == 1 and next(iter(systems))[0] == "system"
    assert len(next(iter(systems))[1].split()) >= 150
    assert len({m[1] for m in shared}) == len(shared)  # the question after the prefix differs
    longs = [r.messages[0][1] for r in requests if r.kind == "long"]
    assert longs and all(len(text.split()) >= 250 for text in longs)


def test_payload_is_openai_chat_completions() -> None:
    request = take(WorkloadSpec(model="auto", max_tokens=12), 1)[0]
    streamed = request.payload(stream=True)
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}
    assert streamed["max_tokens"] == 12 and streamed["model"] == "auto"
    assert all(set(m) == {"role", "content"} for m in streamed["messages"])
    assert "stream_options" not in request.payload(stream=False)


def test_example_workload_file_parses_to_the_defaults_plus_its_tiers() -> None:
    spec = spec_from_mapping(tomllib.loads(EXAMPLE_WORKLOAD.read_text()))
    assert spec == WorkloadSpec(tier_weights={"paid": 3.0, "free": 1.0})


def test_spec_from_mapping_reads_every_section() -> None:
    spec = spec_from_mapping(
        {
            "seed": 9,
            "model": "smollm2-135m",
            "max_tokens": 8,
            "temperature": 0.5,
            "mix": {"repeat": 1},
            "kinds": {"repeat_pool": 2, "long_words": 50},
            "tiers": {"free": 2},
            "prices": {"a": 0.5, "b": [0.1, 0.2]},
        }
    )
    assert (spec.seed, spec.model, spec.max_tokens, spec.temperature) == (9, "smollm2-135m", 8, 0.5)
    assert spec.mix == {"repeat": 1.0} and spec.repeat_pool == 2 and spec.long_words == 50
    assert spec.prices == {"a": Price(0.5, 0.5), "b": Price(0.1, 0.2)}
    assert spec.prices["b"].cost(1000, 500) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sede": 1}, "unknown workload key"),
        ({"mix": {"huge": 1}}, "unknown request kind"),
        ({"mix": {"short": 0}}, "at least one > 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": "many"}, "must be an integer"),
        ({"temperature": True}, "must be a number"),
        ({"kinds": {"repeat_pool": 0}}, "repeat_pool must be >= 1"),
        ({"kinds": {"pool": 1}}, "unknown key"),
        ({"prices": {"a": [1, 2, 3]}}, "prompt, completion"),
        ({"mix": 3}, "must be a table"),
    ],
)
def test_bad_workloads_say_what_is_wrong(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_from_mapping(data)


def test_poisson_gaps_are_reproducible_with_the_right_mean() -> None:
    gaps = list(itertools.islice(poisson_gaps(4.0, seed=3), 20000))
    assert gaps[:50] == list(itertools.islice(poisson_gaps(4.0, seed=3), 50))
    assert gaps[:50] != list(itertools.islice(poisson_gaps(4.0, seed=4), 50))
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    # Exponential: the standard deviation equals the mean.
    assert statistics.pstdev(gaps) == pytest.approx(0.25, rel=0.05)
    with pytest.raises(ValueError):
        next(poisson_gaps(0, seed=1))
