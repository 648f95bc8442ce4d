"""Replica choice, ejection and re-admission, with fake replicas."""

import asyncio

from llmesh.types import Tier
from router.replicas import ReplicaPool, ReplicaState
from tests.fixtures.router import FakeReplica


def pool(*names: str, dedicated: tuple[str, ...] = ()) -> ReplicaPool:
    return ReplicaPool(ReplicaState(FakeReplica(n), dedicated=n in dedicated) for n in names)


def test_least_outstanding_and_rotation() -> None:
    p = pool("a", "b")
    p.states[0].outstanding = 2
    assert p.pick(Tier.FREE, "v", set()).name == "b"  # type: ignore[union-attr]
    p.states[0].outstanding = 0
    picks = {p.pick(Tier.FREE, "v", set()).name for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {"a", "b"}, "idle replicas share the work"


def test_ejection_is_per_variant_and_probe_readmits() -> None:
    p = pool("a", "b")
    a = p.states[0]
    p.record_failure(a, "v", "boom")
    assert {p.pick(Tier.FREE, "v", set()).name for _ in range(4)} == {"b"}  # type: ignore[union-attr]
    assert p.pick(Tier.FREE, "w", {"b"}).name == "a"  # type: ignore[union-attr]
    asyncio.run(p.probe(["v", "w"]))
    assert a.healthy and "a" in {p.pick(Tier.FREE, "v", set()).name for _ in range(4)}  # type: ignore[union-attr]


def test_probe_ejects_unready_replica() -> None:
    p = pool("a", "b")
    p.states[1].replica.ready_variants = set()  # type: ignore[attr-defined]
    asyncio.run(p.probe(["v"]))
    assert not p.states[1].healthy and p.healthy_count() == 1
    assert p.pick(Tier.PAID, "v", {"a"}) is None


def test_dedicated_replicas_only_for_enterprise() -> None:
    p = pool("shared", "dedicated", dedicated=("dedicated",))
    assert {p.pick(Tier.PAID, "v", set()).name for _ in range(4)} == {"shared"}  # type: ignore[union-attr]
    assert {p.pick(Tier.ENTERPRISE, "v", set()).name for _ in range(4)} == {"dedicated"}  # type: ignore[union-attr]
    # Enterprise spills onto shared capacity when its own is gone; the others never take dedicated capacity.
    assert p.pick(Tier.ENTERPRISE, "v", {"dedicated"}).name == "shared"  # type: ignore[union-attr]
    assert p.pick(Tier.FREE, "v", {"shared"}) is None


def test_healthy_count_changes_are_reported_once_each() -> None:
    counts: list[int] = []
    p = ReplicaPool((ReplicaState(FakeReplica(n)) for n in ("a", "b")), on_healthy_change=counts.append)
    a, b = p.states
    p.record_failure(a, "v", "boom")
    p.record_failure(a, "w", "boom")  # a is already out of the count: no change
    p.record_failure(b, "v", "boom")
    assert counts == [1, 0]
    b.replica.ready_variants = set()  # type: ignore[attr-defined]
    asyncio.run(p.probe(["v", "w"]))  # a comes back whole; b stays down
    assert counts == [1, 0, 1] and p.healthy_count() == 1
