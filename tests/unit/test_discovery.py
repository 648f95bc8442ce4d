"""DNS discovery of Triton replicas with a fake resolver: live add and remove, failed lookups, fallback replicas."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from llmesh.addresses import host_port
from llmesh.types import Tier
from router.config import RouterSettings
from router.discovery import (
    DnsName,
    LookupFailed,
    Member,
    PoolMembership,
    ReplicaDiscovery,
    ReplicaGroup,
    SystemResolver,
    parse_names,
)
from router.load import LoadTracker
from router.metrics import PrometheusObserver
from router.replicas import ReplicaPool, ReplicaState
from tests.fixtures.router import FakeReplica

VARIANTS = ["v"]


class FakeResolver:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failing: set[str] = set()
        self.lookups = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if host in self.failing:
            raise LookupFailed(f"{host}: timed out")
        return [host_port(ip, port) for ip in self.records.get(host, [])]


class Mesh:
    """A pool fed by discovery over a fake resolver; `made` holds every replica created, by URL."""

    def __init__(self, groups: list[ReplicaGroup], not_ready: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.resolver = FakeResolver()
        self.pool = ReplicaPool(())
        self.made: dict[str, FakeReplica] = {}
        self.not_ready = not_ready

        def make(url: str) -> FakeReplica:
            self.made[url] = FakeReplica(url, () if url in self.not_ready else VARIANTS)
            return self.made[url]

        self.membership = PoolMembership(self.pool, make, VARIANTS, retire_after_s=60)
        self.discovery = ReplicaDiscovery(groups, self.resolver, [self.membership])

    def names(self) -> set[str]:
        return {s.name for s in self.pool.states}

    def picks(self, tier: Tier = Tier.FREE, exclude: set[str] | None = None) -> set[str | None]:
        return {getattr(self.pool.pick(tier, "v", exclude or set()), "name", None) for _ in range(6)}


NAME = DnsName("triton.llmesh.svc", 8001)


def test_replicas_follow_dns_answers_live() -> None:
    async def scenario() -> None:
        mesh = Mesh([ReplicaGroup(names=(NAME,))])
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2"]
        await mesh.discovery.refresh()
        assert mesh.picks() == {"198.18.0.2:8001"}
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2", "198.18.0.3"]
        await mesh.discovery.refresh()
        assert mesh.picks() == {"198.18.0.2:8001", "198.18.0.3:8001"}, "a replica added to DNS takes work"
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.3"]
        await mesh.discovery.refresh()
        assert mesh.names() == {"198.18.0.3:8001"}
        await asyncio.sleep(0.05)
        assert mesh.made["198.18.0.2:8001"].closed, "an idle replica that left is closed"

    asyncio.run(scenario())


def test_name_that_does_not_exist_empties_but_failed_lookup_keeps_last_answer() -> None:
    async def scenario() -> None:
        mesh = Mesh([ReplicaGroup(names=(NAME,))])
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2", "198.18.0.3"]
        await mesh.discovery.refresh()
        mesh.resolver.failing.add("triton.llmesh.svc")
        await mesh.discovery.refresh()
        assert mesh.names() == {"198.18.0.2:8001", "198.18.0.3:8001"}, "a DNS hiccup must not empty the pool"
        mesh.resolver.failing.clear()
        mesh.resolver.records.pop("triton.llmesh.svc")
        await mesh.discovery.refresh()
        assert mesh.names() == set(), "NXDOMAIN (no ready pod behind a headless Service) means no replicas"
        assert mesh.pool.pick(Tier.FREE, "v", set()) is None

    asyncio.run(scenario())


def test_new_replica_is_probed_before_it_takes_work() -> None:
    async def scenario() -> None:
        mesh = Mesh([ReplicaGroup(names=(NAME,))], not_ready={"198.18.0.3:8001"})
        healthy_counts: list[int] = []
        mesh.pool._on_healthy_change = healthy_counts.append
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2", "198.18.0.3"]
        await mesh.discovery.refresh()
        assert mesh.picks() == {"198.18.0.2:8001"}, "a replica still loading its models gets no request"
        assert healthy_counts == [1]
        mesh.made["198.18.0.3:8001"].ready_variants = set(VARIANTS)
        await mesh.pool.probe(VARIANTS)
        assert mesh.picks() == {"198.18.0.2:8001", "198.18.0.3:8001"}
        assert healthy_counts == [1, 2]

    asyncio.run(scenario())


def test_replica_that_left_finishes_its_requests_before_closing() -> None:
    async def scenario() -> None:
        mesh = Mesh([ReplicaGroup(names=(NAME,))])
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2", "198.18.0.3"]
        await mesh.discovery.refresh()
        leaving = next(s for s in mesh.pool.states if s.name == "198.18.0.2:8001")
        leaving.outstanding = 1
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.3"]
        await mesh.discovery.refresh()
        assert mesh.picks() == {"198.18.0.3:8001"}
        await asyncio.sleep(0.3)
        assert not mesh.made["198.18.0.2:8001"].closed, "closed under a request still streaming"
        leaving.outstanding = 0
        await asyncio.sleep(0.3)
        assert mesh.made["198.18.0.2:8001"].closed

    asyncio.run(scenario())


def test_fixed_urls_stay_and_fallback_serves_only_when_no_local_replica_can() -> None:
    async def scenario() -> None:
        mesh = Mesh(
            [
                ReplicaGroup(urls=("127.0.0.1:8001",), names=(NAME,)),
                ReplicaGroup(names=(DnsName("triton.region-b", 8001),), fallback=True),
            ]
        )
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2"]
        mesh.resolver.records["triton.region-b"] = ["198.18.1.2"]
        await mesh.discovery.refresh()
        assert mesh.picks() == {"127.0.0.1:8001", "198.18.0.2:8001"}, "the other region takes no work"
        assert mesh.picks(exclude={"127.0.0.1:8001", "198.18.0.2:8001"}) == {"198.18.1.2:8001"}, (
            "a request that failed on every local replica goes to the other region"
        )
        for state in mesh.pool.states:
            if not state.fallback:
                mesh.pool.record_failure(state, "v", "down")
        assert mesh.picks() == {"198.18.1.2:8001"}, "the region's pool is down: the other region serves"
        mesh.resolver.records.pop("triton.llmesh.svc")
        await mesh.discovery.refresh()
        assert "127.0.0.1:8001" in mesh.names(), "fixed URLs never leave"

    asyncio.run(scenario())


def test_enterprise_dedicated_replicas_from_dns() -> None:
    async def scenario() -> None:
        mesh = Mesh(
            [
                ReplicaGroup(names=(NAME,)),
                ReplicaGroup(names=(DnsName("triton-dedicated", 8001),), dedicated=True),
            ]
        )
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2"]
        mesh.resolver.records["triton-dedicated"] = ["198.18.0.9"]
        await mesh.discovery.refresh()
        assert mesh.picks(Tier.ENTERPRISE) == {"198.18.0.9:8001"}
        assert mesh.picks(Tier.FREE) == {"198.18.0.2:8001"}

    asyncio.run(scenario())


def test_metrics_follow_membership() -> None:
    async def scenario() -> None:
        mesh = Mesh([ReplicaGroup(names=(NAME,))])
        registry = CollectorRegistry()
        observer = PrometheusObserver(registry, mesh.pool, LoadTracker(), VARIANTS)
        mesh.discovery = ReplicaDiscovery(mesh.discovery._groups, mesh.resolver, [mesh.membership, observer])
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2", "198.18.0.3"]
        await mesh.discovery.refresh()
        observer.first_token("v", "198.18.0.3:8001", 0.1)
        text = generate_latest(registry).decode()
        assert 'llmesh_router_replica_healthy{replica="198.18.0.3:8001"} 1.0' in text
        assert 'llmesh_router_ttft_seconds_count{replica="198.18.0.3:8001",variant="v"} 1.0' in text
        mesh.resolver.records["triton.llmesh.svc"] = ["198.18.0.2"]
        await mesh.discovery.refresh()
        assert "198.18.0.3" not in generate_latest(registry).decode(), "a replica that left leaves the metrics"

    asyncio.run(scenario())


def test_a_failing_listener_does_not_stop_the_others() -> None:
    class Broken:
        async def added(self, member: Member) -> None:
            raise RuntimeError("boom")

        async def removed(self, member: Member) -> None:
            raise RuntimeError("boom")

    async def scenario() -> None:
        resolver = FakeResolver()
        resolver.records["t"] = ["198.18.0.2"]
        seen: list[str] = []

        class Recorder:
            async def added(self, member: Member) -> None:
                seen.append(member.url)

            async def removed(self, member: Member) -> None:
                seen.append("-" + member.url)

        discovery = ReplicaDiscovery([ReplicaGroup(names=(DnsName("t", 1),))], resolver, [Broken(), Recorder()])
        await discovery.refresh()
        resolver.records["t"] = []
        await discovery.refresh()
        assert seen == ["198.18.0.2:1", "-198.18.0.2:1"]

    asyncio.run(scenario())


def test_parse_names_and_settings() -> None:
    assert parse_names("a.svc:8001, [::1]:9", "--triton-dns") == [DnsName("a.svc", 8001), DnsName("::1", 9)]
    assert host_port("::1", 9) == "[::1]:9"
    for bad in ("a.svc", "a.svc:", ":8001", "a:99999", "a:x"):
        with pytest.raises(ValueError, match="--triton-dns"):
            parse_names(bad, "--triton-dns")
    with pytest.raises(ValueError, match="no Triton replicas"):
        RouterSettings(triton_url="").replica_groups()
    with pytest.raises(ValueError, match="--fallback-triton-dns"):
        RouterSettings(fallback_triton_dns="nope").replica_groups()
    groups = RouterSettings(triton_url="", triton_dns="t:8001", fallback_triton_url="198.18.1.2:8001").replica_groups()
    assert groups[0].names == (DnsName("t", 8001),) and groups[2].fallback and groups[2].urls == ("198.18.1.2:8001",)


def test_system_resolver_reads_the_hosts_file() -> None:
    # localhost comes from /etc/hosts: no packet leaves the machine.
    answer = asyncio.run(SystemResolver().resolve("localhost", 8001))
    assert "127.0.0.1:8001" in answer or "[::1]:8001" in answer


def test_pool_refuses_a_second_replica_of_one_name() -> None:
    pool = ReplicaPool(())
    pool.add(ReplicaState(FakeReplica("a")), VARIANTS)
    with pytest.raises(ValueError, match="already"):
        pool.add(ReplicaState(FakeReplica("a")), VARIANTS)
    assert pool.remove("a") is not None and pool.remove("a") is None
