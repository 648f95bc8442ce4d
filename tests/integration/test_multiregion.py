"""Two regions (groups of network namespaces) joined by a WAN link with latency: docs/DEPLOY.md "Multi-region".

    region a: a-edge (Envoy)  a-g (gateway, router, limiter)  a-t (Triton)  a-r (Redis: key store primary, quotas)
              a-wan (relay to region b's Triton)  a-client
    region b: b-edge  b-g  b-t  b-r (Redis: a replica of a's key store)  b-wan (relays to a's Triton, key store and
              quota store)  b-client

The kernel here has no netem, so the WAN's latency is a relay host per region (tests/fixtures/delay_relay.py) adding
WAN_DELAY_S each way to every byte crossing; cutting the lab's region link cuts everything that crosses.

What is global and what is per region: API keys are written in region a and read from each region's replica;
quotas are global, in region a's Redis, so a key's 20 requests an hour are 20 over both regions; response caches and
Triton pools are per region. Shows: requests served in their own region; a region whose model pool is down served
by the other; quotas exact across regions; with the link between regions cut, each region goes on serving, the
cut-off region failing its free tier closed and its paid tiers open, as when its quota store is down.
"""

from __future__ import annotations

import collections
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests.fixtures.limiter import policy_without_edge_budget
from tests.fixtures.multihost import (
    EDGE_HTTP,
    TRITON_GRPC,
    Frontend,
    client,
    client_popen,
    create_key,
    mesh_certificates,
    result_of,
    start_edge,
    start_frontend,
    start_redis,
    start_triton,
    triton_requests,
    wait_until,
)
from tests.fixtures.netns import Host, Lab, _lab
from triton_models.config import BuildSettings

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

WAN_DELAY_S = 0.025  # one way: 50 ms round trips between the regions
FREE_PER_HOUR = 20
AUTH_PORT, QUOTA_PORT = 6379, 6380
# Relay ports on the wan hosts.
RELAY_TRITON, RELAY_AUTH, RELAY_QUOTA = 18001, 16379, 16380


@dataclass
class Regions:
    lab: Lab
    hosts: dict[str, Host]
    auth_url: str
    frontends: dict[str, Frontend]

    def logs(self, region: str) -> str:
        """The tails of a region's gateway and limiter logs, for failure messages."""
        frontend = self.frontends[region]
        return "\n".join(f"--- {name}:\n{proc.output()[-2500:]}" for name, proc in
                         (("gateway", frontend.gateway), ("limiter", frontend.limiter)))  # fmt: skip

    def edge(self, region: str) -> str:
        return f"http://{self.hosts[f'{region}-edge'].ip}:{EDGE_HTTP}"

    def client(self, region: str) -> Host:
        return self.hosts[f"{region}-client"]

    def served(self) -> dict[str, float]:
        """Requests each region's Triton has answered so far."""
        return {r: triton_requests(self.client("a"), self.hosts[f"{r}-t"]) for r in ("a", "b")}

    def wait_replicated(self) -> None:
        """Until region b's key store replica has everything region a's primary wrote."""

        def offset(host: str, port: int) -> int:
            info = self.hosts[host].run(
                ["redis-cli", "-h", self.hosts[host].ip, "-p", str(port), "info", "replication"]
            )
            fields = dict(line.split(":", 1) for line in info.stdout.split() if ":" in line)
            return int(fields.get("slave_repl_offset", fields.get("master_repl_offset", "-1")))

        wait_until(lambda: offset("b-r", AUTH_PORT) >= offset("a-r", AUTH_PORT) > 0, 30, "key store replication")


@pytest.fixture(scope="module")
def regions(
    model_repository: Path, build_settings: BuildSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Regions]:
    folder = tmp_path_factory.mktemp("regions")
    labs = cast(Generator[Lab, None, None], _lab(regions=("a", "b")))
    lab = next(labs)
    try:
        hosts = {
            f"{region}-{role}": lab.add_host(f"{region}-{role}", region)
            for region in ("a", "b")
            for role in ("edge", "g", "t", "r", "wan", "client")
        }
        certs = mesh_certificates(lab, folder / "tls")
        a, b = (lambda role: hosts[f"a-{role}"]), (lambda role: hosts[f"b-{role}"])
        start_redis(a("r"), folder / "a-auth", AUTH_PORT)
        start_redis(a("r"), folder / "a-quota", QUOTA_PORT)
        # Region b reaches region a's stores and Triton through its WAN relay, and region a reaches b's Triton so.
        lab.add_relay(b("wan"), RELAY_AUTH, a("r").ip, AUTH_PORT, WAN_DELAY_S)
        lab.add_relay(b("wan"), RELAY_QUOTA, a("r").ip, QUOTA_PORT, WAN_DELAY_S)
        lab.add_relay(b("wan"), RELAY_TRITON, a("t").ip, TRITON_GRPC, WAN_DELAY_S)
        lab.add_relay(a("wan"), RELAY_TRITON, b("t").ip, TRITON_GRPC, WAN_DELAY_S)
        start_redis(b("r"), folder / "b-auth", AUTH_PORT, "--replicaof", b("wan").ip, str(RELAY_AUTH))
        for region in (a, b):
            start_triton(region("t"), model_repository, build_settings.cache_dir, certs, build_settings.variant)
        policy = policy_without_edge_budget(folder / "policy")
        auth_url = f"redis://{a('r').ip}:{AUTH_PORT}/0"
        front_a = start_frontend(
            a("g"), certs, model_repository, auth_url, f"redis://{a('r').ip}:{QUOTA_PORT}/0", policy,
            triton_url=f"{a('t').ip}:{TRITON_GRPC}", fallback_triton_url=f"{a('wan').ip}:{RELAY_TRITON}",
        )  # fmt: skip
        front_b = start_frontend(
            b("g"), certs, model_repository, f"redis://{b('r').ip}:{AUTH_PORT}/0",
            f"redis://{b('wan').ip}:{RELAY_QUOTA}/0", policy,
            triton_url=f"{b('t').ip}:{TRITON_GRPC}", fallback_triton_url=f"{b('wan').ip}:{RELAY_TRITON}",
            # The quota store is a WAN round trip away: each call's budget covers a few of them and the queueing of a
            # burst, and the gateway's budget for the limiter covers that.
            limiter_redis_timeout_s=1.0,
            gateway_limiter_timeout_s=3.0,
        )  # fmt: skip
        for region in (a, b):
            start_edge(region("edge"), certs, [region("g")], region("g"), folder / f"edge-{region('edge').name}")
        yield Regions(lab, hosts, auth_url, {"a": front_a, "b": front_b})
    finally:
        labs.close()


def test_requests_are_served_in_their_own_region(regions: Regions) -> None:
    key = create_key(regions.client("a"), regions.auth_url, "paid")
    regions.wait_replicated()
    for region, other in (("a", "b"), ("b", "a")):
        before = regions.served()
        for _ in range(3):
            answer = client(regions.client(region), "chat", regions.edge(region), key)
            assert answer["content"], answer
        after = regions.served()
        assert after[region] - before[region] == 3 and after[other] == before[other], (region, before, after)


def test_quota_is_global_across_regions(regions: Regions) -> None:
    """A fresh free key: 100 requests at once in each region, exactly 20 admitted over both."""
    key = create_key(regions.client("a"), regions.auth_url, "free")
    regions.wait_replicated()
    bursts = [client_popen(regions.client(r), "burst", regions.edge(r), key, "100", "1") for r in ("a", "b")]
    results = [result_of(proc, 240) for proc in bursts]
    admitted = [r["statuses"].get("200", 0) for r in results]
    statuses = collections.Counter(results[0]["statuses"]) + collections.Counter(results[1]["statuses"])
    assert sum(admitted) == FREE_PER_HOUR, (results, regions.logs("b"))
    assert statuses["429"] + statuses["503"] == 200 - FREE_PER_HOUR, results
    assert statuses["429"] >= (200 - FREE_PER_HOUR) // 2, (results, regions.logs("b"))


def test_region_whose_pool_is_down_is_served_by_the_other(regions: Regions) -> None:
    key = create_key(regions.client("a"), regions.auth_url, "paid")
    regions.wait_replicated()
    b_triton = regions.hosts["b-t"]
    b_triton.cut_link()
    try:
        before = regions.served()
        # The first may wait out the router's hang budget on the cut replica before failing over; none is lost.
        for _ in range(3):
            answer = client(regions.client("b"), "chat", regions.edge("b"), key)
            assert answer["content"], answer
        after = regions.served()
        assert after["a"] - before["a"] == 3, (before, after)
    finally:
        b_triton.restore_link()

    def back_home() -> bool:
        before = regions.served()
        client(regions.client("b"), "chat", regions.edge("b"), key)
        return regions.served()["b"] > before["b"]

    wait_until(back_home, 60, "region b's requests served by its own pool again", interval=1.0)


def test_link_between_regions_cut(regions: Regions) -> None:
    """Each region keeps serving. Region a, which holds the quota store, keeps exact quotas; region b cannot reach
    it, so its free tier fails closed (503) and its paid tier open (served, not counted) until the link is back."""
    free, paid = (create_key(regions.client("a"), regions.auth_url, tier) for tier in ("free", "paid"))
    regions.wait_replicated()
    regions.lab.cut_region_link()
    try:
        a_free = client(regions.client("a"), "burst", regions.edge("a"), free, "25", "1")
        assert a_free["statuses"].get("200") == FREE_PER_HOUR, a_free
        b_paid = client(regions.client("b"), "burst", regions.edge("b"), paid, "5", "1")
        assert b_paid["statuses"] == {"200": 5}, b_paid
        b_free = client(regions.client("b"), "burst", regions.edge("b"), free, "5", "1")
        assert b_free["statuses"] == {"503": 5}, b_free
    finally:
        regions.lab.restore_region_link()
    # Back: region b asks the global store again, where region a spent the free key's hour.
    wait_until(
        lambda: client(regions.client("b"), "burst", regions.edge("b"), free, "1", "1")["statuses"] == {"429": 1},
        60,
        "region b refusing the spent key from the global quota",
        interval=1.0,
    )
    fresh = create_key(regions.client("a"), regions.auth_url, "free")
    regions.wait_replicated()
    assert client(regions.client("b"), "burst", regions.edge("b"), fresh, "1", "1")["statuses"] == {"200": 1}
