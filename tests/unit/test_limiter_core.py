"""The limiter's decisions with an injected clock and in-process stores: answers, messages, failure policies,
the circuit breaker, pending settlements, the edge, and the policy file (parsing, overrides, hot reload)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from limiter_service.core import Limiter
from limiter_service.loop_lag import LoopLagMonitor
from limiter_service.metrics import LimiterMetrics
from limiter_service.policy import DEFAULT_POLICY_FILE, FailureMode, PolicyError, PolicySource, parse_policy
from limiter_service.server import LimiterServicer
from limiter_service.store import Check, MemoryQuotaStore, StoreUnavailable, WindowState
from llmesh.apikeys import hash_key, key_id_for
from llmesh.errors import InvalidRequest, PermissionDenied, Unavailable
from llmesh.types import Tier
from llmesh.v1 import common_pb2, limiter_pb2

POLICY = """
[tiers.free]
requests_per_hour = 3
tokens_per_hour = 1000
max_concurrent_streams = 3
on_store_failure = "closed"
[tiers.paid]
requests_per_hour = 5
burst_per_minute = 4
tokens_per_hour = 10000
on_store_failure = "open"
[tiers.enterprise]
requests_per_hour = "unlimited"
[edge]
per_ip_per_minute = 3
per_key_per_minute = 2
[orgs.acme]
requests_per_hour = 4
[keys.aaaaaaaaaaaaaaaa]
org = "acme"
[keys.bbbbbbbbbbbbbbbb]
org = "acme"
[keys.cccccccccccccccc]
requests_per_hour = 0
edge_per_minute = 1
"""


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class FlakyStore(MemoryQuotaStore):
    """A shared store that can go down (refuse at once) or hang (never answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "up"
        self.calls = 0

    async def _gate(self) -> None:
        self.calls += 1
        if self.mode == "down":
            raise StoreUnavailable("connection refused")
        if self.mode == "hang":
            await asyncio.sleep(3600)

    async def check(self, subject: str, member: str, now_ms: int, check: Check, dry_run: bool = False) -> WindowState:
        await self._gate()
        return await super().check(subject, member, now_ms, check, dry_run)

    async def settle(self, subject: str, member: str, used_tokens: int, now_ms: int) -> bool:
        await self._gate()
        return await super().settle(subject, member, used_tokens, now_ms)

    async def release(self, subject: str, member: str, now_ms: int, keep_ms: int) -> bool:
        await self._gate()
        return await super().release(subject, member, now_ms, keep_ms)

    async def ping(self) -> None:
        await self._gate()


class LostReplyStore(FlakyStore):
    """Redis ran the script but the reply never came (the call timed out): the first `lost` checks admit, then
    raise, as a call to a paused server does once the pause ends after the client gave up."""

    def __init__(self, lost: int) -> None:
        super().__init__()
        self.lost = lost

    async def check(self, subject: str, member: str, now_ms: int, check: Check, dry_run: bool = False) -> WindowState:
        state = await super().check(subject, member, now_ms, check, dry_run)
        if self.lost and not dry_run:
            self.lost -= 1
            raise StoreUnavailable("Timeout reading from socket")
        return state


def make(tmp_path: Path, text: str = POLICY) -> tuple[Limiter, FlakyStore, Clock, CollectorRegistry]:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    store, clock, registry = FlakyStore(), Clock(), CollectorRegistry()
    limiter = Limiter(
        PolicySource(path),
        store,
        breaker_failures=3,
        metrics=LimiterMetrics(registry),
        store_timeout_s=0.02,
        lease_s=60,
        clock=clock,
    )
    return limiter, store, clock, registry


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_admits_then_refuses_with_which_limit_and_when(tmp_path: Path) -> None:
    limiter, _, clock, registry = make(tmp_path)

    async def main() -> None:
        for _ in range(3):
            d = await limiter.reserve("k1", "free", 10, 20)
            assert d.allowed and d.reservation_id.startswith("r/free/key:k1/")
            clock.t += 10
        assert {q.name: q.remaining for q in d.quotas} == {
            "requests_per_hour": 0,
            "tokens_per_hour": 1000 - 90,
            "concurrent_streams": 0,
        }
        refused = await limiter.reserve("k1", "free", 10, 20)
        assert not refused.allowed and refused.refused_by == "requests_per_hour"
        assert refused.retry_after_ms == 3600_000 - 30_000
        assert "the free tier allows 3 requests per hour" in refused.message and "retry in 3570 s" in refused.message

    asyncio.run(main())
    assert (
        metric(registry, "llmesh_limiter_decisions_total", tier="free", limit="none", result="allowed", store="redis")
        == 3
    )
    assert (
        metric(
            registry,
            "llmesh_limiter_decisions_total",
            tier="free",
            limit="requests_per_hour",
            result="refused",
            store="redis",
        )
        == 1
    )


def test_token_budget_message_and_impossible_requests(tmp_path: Path) -> None:
    limiter, _, _, _ = make(tmp_path)

    async def main() -> None:
        first = await limiter.reserve("k2", "free", 100, 700)
        assert first.allowed
        refused = await limiter.reserve("k2", "free", 100, 200)
        assert refused.refused_by == "tokens_per_hour"
        assert "1000 tokens per hour, 200 left, and this request reserves 300" in refused.message
        # Settling with what was really used refunds the rest.
        assert await limiter.settle(first.reservation_id, 150)
        assert (await limiter.reserve("k2", "free", 100, 200)).allowed
        with pytest.raises(InvalidRequest, match="needs up to 1001 tokens"):
            await limiter.reserve("k2", "free", 1, 1000)
        with pytest.raises(PermissionDenied, match="limit of 0"):
            await limiter.reserve("cccccccccccccccc", "free", 1, 1)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("key_id", "tier", "nonce", "reservation"),
    [("", "free", "", "x"), ("k", "gold", "", "x"), ("k{1}", "free", "", "x"), ("k", "free", "a/b", "x")],
)
def test_bad_input_is_invalid_request(tmp_path: Path, key_id: str, tier: str, nonce: str, reservation: str) -> None:
    limiter, _, _, _ = make(tmp_path)
    with pytest.raises(InvalidRequest):
        asyncio.run(limiter.reserve(key_id, tier, 1, 1, nonce))
    with pytest.raises(InvalidRequest, match="malformed reservation id"):
        asyncio.run(limiter.settle(reservation, 1))


def test_org_keys_share_one_budget(tmp_path: Path) -> None:
    limiter, _, _, _ = make(tmp_path)

    async def main() -> None:
        results = [await limiter.reserve(k, "paid", 1, 1) for k in ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"] * 3]
        assert [r.allowed for r in results] == [True] * 4 + [False] * 2
        assert "org acme allows 4 requests per hour" in results[-1].message
        status = await limiter.status("bbbbbbbbbbbbbbbb", "paid")
        assert status.subject == "org:acme"

    asyncio.run(main())


def test_nonce_makes_reserve_idempotent(tmp_path: Path) -> None:
    limiter, _, _, _ = make(tmp_path)

    async def main() -> None:
        first = await limiter.reserve("k3", "free", 1, 1, nonce="n1")
        again = await limiter.reserve("k3", "free", 1, 1, nonce="n1")
        assert first.reservation_id == again.reservation_id
        status = await limiter.status("k3", "free")
        assert {q.name: q.remaining for q in status.quotas}["requests_per_hour"] == 2

    asyncio.run(main())


def test_store_down_each_tier_follows_its_policy_then_recovers(tmp_path: Path) -> None:
    limiter, store, clock, registry = make(tmp_path)

    async def main() -> None:
        # In Redis, paid is at its limit.
        for _ in range(5):
            clock.t += 20
            assert (await limiter.reserve("p1", "paid", 1, 1)).allowed
        assert not (await limiter.reserve("p1", "paid", 1, 1)).allowed

        store.mode = "down"
        with pytest.raises(Unavailable, match="fails closed"):
            await limiter.reserve("f1", "free", 1, 1)
        # Paid fails open: its local limits start empty and allow the tier's numbers per process.
        local = [await limiter.reserve("p1", "paid", 1, 1) for _ in range(5)]
        assert [d.allowed for d in local] == [True, True, True, True, False]
        assert local[0].degraded and local[0].reservation_id.startswith("l/")
        assert local[-1].refused_by == "burst_per_minute"
        assert limiter.degraded
        calls = store.calls
        await limiter.reserve("p2", "paid", 1, 1)
        assert store.calls == calls, "with the circuit open, the store is not called"
        assert metric(registry, "llmesh_limiter_redis_degraded") == 1

        # A probe that fails keeps it open; one that answers closes it, and Redis' state rules again.
        assert not await limiter.probe_store()
        store.mode = "up"
        assert await limiter.probe_store()
        assert not limiter.degraded and metric(registry, "llmesh_limiter_redis_degraded") == 0
        again = await limiter.reserve("p1", "paid", 1, 1)
        assert not again.allowed and not again.degraded
        assert (await limiter.reserve("f1", "free", 1, 1)).allowed

    asyncio.run(main())


def test_hanging_store_costs_one_timeout_then_nothing(tmp_path: Path) -> None:
    limiter, store, _, _ = make(tmp_path)
    store.mode = "hang"

    async def main() -> None:
        for _ in range(3):  # each waits store_timeout_s (20 ms), then decides locally
            assert (await limiter.reserve("p3", "paid", 1, 1)).degraded
        assert limiter.degraded
        calls = store.calls
        for _ in range(20):
            await limiter.reserve("p3", "paid", 1, 1)
        assert store.calls == calls

    asyncio.run(asyncio.wait_for(main(), timeout=10))


class StalledStore(FlakyStore):
    """Redis answered in time, but this process's loop was too busy to read the reply: the first `stalls` calls
    block the whole loop (time.sleep, as a CPU-bound burst would) past the timeout, and the admission they made
    is kept, as Redis would keep it."""

    def __init__(self, stalls: int) -> None:
        super().__init__()
        self.stalls = stalls

    async def check(self, subject: str, member: str, now_ms: int, check: Check, dry_run: bool = False) -> WindowState:
        state = await MemoryQuotaStore.check(self, subject, member, now_ms, check, dry_run)
        self.calls += 1
        if self.stalls:
            self.stalls -= 1
            time.sleep(0.05)  # the loop is stalled: the monitor cannot tick
            raise StoreUnavailable("Timeout reading from socket")
        return state


@pytest.mark.parametrize("stalls", [1, 2, 6])
def test_timeouts_while_the_loop_is_stalled_are_retried_not_counted(tmp_path: Path, stalls: int) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    store, registry, monitor = StalledStore(stalls), CollectorRegistry(), LoopLagMonitor(period_s=0.005, late_s=0.02)
    limiter = Limiter(
        PolicySource(path), store, breaker_failures=1, metrics=LimiterMetrics(registry), loop_monitor=monitor
    )

    async def main() -> None:
        ticker = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.02)
        try:
            decision = await limiter.reserve("f1", "free", 1, 1, nonce="n1")
            assert decision.allowed and not decision.degraded
            # Admitted once, and the retry reported what remained after that one admission.
            assert {v.name: v.remaining for v in decision.quotas}["requests_per_hour"] == 2
            assert store.calls == stalls + 1 and not limiter.degraded
            assert metric(registry, "llmesh_limiter_stall_retries_total") == stalls
            assert metric(registry, "llmesh_limiter_redis_errors_total") == 0
        finally:
            ticker.cancel()

    asyncio.run(main())


def test_a_stall_longer_than_the_budget_fails_the_request_not_the_store(tmp_path: Path) -> None:
    # 20 stalls of 50 ms outlast the 0.5 s retry budget: this request follows its tier's outage policy (free: closed),
    # but nothing counts against Redis, so the breaker stays closed and the next request is decided there.
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    store, registry, monitor = StalledStore(20), CollectorRegistry(), LoopLagMonitor(period_s=0.005, late_s=0.02)
    limiter = Limiter(
        PolicySource(path), store, breaker_failures=1, metrics=LimiterMetrics(registry), loop_monitor=monitor
    )

    async def main() -> None:
        ticker = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.02)
        try:
            with pytest.raises(Unavailable):
                await limiter.reserve("f1", "free", 1, 1, nonce="n1")
            assert not limiter.degraded
            assert metric(registry, "llmesh_limiter_redis_errors_total") == 0
            assert 2 <= store.calls <= 8
        finally:
            ticker.cancel()

    asyncio.run(main())


def test_timeouts_on_an_idle_loop_count_against_the_store(tmp_path: Path) -> None:
    # Without a stall the same failure is Redis' own: the (one-failure) breaker opens and free fails closed.
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    store, monitor = FlakyStore(), LoopLagMonitor(period_s=0.005, late_s=0.02)
    store.mode = "down"
    limiter = Limiter(PolicySource(path), store, breaker_failures=1, loop_monitor=monitor)

    async def main() -> None:
        ticker = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.02)
        try:
            with pytest.raises(Unavailable):
                await limiter.reserve("f1", "free", 1, 1)
            assert store.calls == 1 and limiter.degraded
        finally:
            ticker.cancel()

    asyncio.run(main())


def test_open_at_start_serves_per_policy_and_reports_each_change(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    store, registry = FlakyStore(), CollectorRegistry()
    reports: list[bool] = []
    limiter = Limiter(
        PolicySource(path),
        store,
        metrics=LimiterMetrics(registry),
        open_at_start=True,
        on_store_change=reports.append,
        store_timeout_s=0.02,
    )
    assert limiter.degraded and reports == [False] and metric(registry, "llmesh_limiter_redis_degraded") == 1

    async def main() -> None:
        assert (await limiter.reserve("p1", "paid", 1, 1)).degraded
        assert store.calls == 0, "requests never probe"
        assert await limiter.probe_store()
        assert reports == [False, True] and metric(registry, "llmesh_limiter_redis_degraded") == 0
        store.mode = "down"
        for _ in range(3):  # the default threshold
            await limiter.reserve("p1", "paid", 1, 1)
        assert reports == [False, True, False] and limiter.degraded
        assert not await limiter.probe_store()
        assert reports == [False, True, False], "a failed probe is no change"

    asyncio.run(main())


def test_watch_store_notices_an_outage_without_traffic_and_probes_until_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    store = FlakyStore()
    reports: list[bool] = []
    limiter = Limiter(PolicySource(path), store, on_store_change=reports.append, store_timeout_s=0.02)

    async def main() -> None:
        watcher = asyncio.create_task(limiter.watch_store(0.01))
        try:
            await asyncio.sleep(0.05)
            assert reports == [] and not limiter.degraded
            store.mode = "down"
            for _ in range(100):
                await asyncio.sleep(0.01)
                if limiter.degraded:
                    break
            assert reports == [False]
            store.mode = "up"
            for _ in range(100):
                await asyncio.sleep(0.01)
                if not limiter.degraded:
                    break
            assert reports == [False, True]
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    asyncio.run(main())


def test_settlements_queue_while_down_and_land_after(tmp_path: Path) -> None:
    limiter, store, _, _ = make(tmp_path)

    async def main() -> None:
        d = await limiter.reserve("p4", "paid", 100, 900)
        store.mode = "down"
        assert not await limiter.settle(d.reservation_id, 120)
        assert not await limiter.settle(d.reservation_id, 120)
        assert limiter.pending_settlements == 2
        store.mode = "up"
        assert await limiter.probe_store()
        assert limiter.pending_settlements == 0
        status = await limiter.status("p4", "paid")
        assert {q.name: q.remaining for q in status.quotas}["tokens_per_hour"] == 10000 - 120

    asyncio.run(main())


def _lost_reply_limiter(tmp_path: Path, lost: int) -> tuple[Limiter, LostReplyStore, CollectorRegistry]:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    store, registry = LostReplyStore(lost), CollectorRegistry()
    limiter = Limiter(PolicySource(path), store, metrics=LimiterMetrics(registry), lease_s=60, store_timeout_s=0.5)
    return limiter, store, registry


async def _usage(store: MemoryQuotaStore, limiter: Limiter, key_id: str, tier: Tier) -> tuple[int, int, int]:
    subject = limiter.policy.policy.quota(key_id, tier).subject
    state = await MemoryQuotaStore.check(store, subject, "probe", 0, Check(3_600_000, -1, lease_ms=1), dry_run=True)
    return state.requests, state.tokens, state.active


@pytest.mark.parametrize("tier", ["free", "paid"])  # free fails closed, paid open (decided locally)
def test_a_reserve_whose_reply_was_lost_is_released_when_the_store_answers(tmp_path: Path, tier: str) -> None:
    limiter, store, registry = _lost_reply_limiter(tmp_path, lost=1)

    async def main() -> None:
        if tier == "free":
            with pytest.raises(Unavailable):
                await limiter.reserve("k1", tier, 10, 20, nonce="n1")
        else:
            assert (await limiter.reserve("k1", tier, 10, 20, nonce="n1")).degraded
        assert limiter.pending_releases == 1
        assert await _usage(store, limiter, "k1", Tier(tier)) == (1, 30, 1), "Redis admitted it after all"
        await limiter.probe_store()  # the store answers: pending releases land
        assert limiter.pending_releases == 0
        assert await _usage(store, limiter, "k1", Tier(tier)) == (0, 0, 0)
        assert metric(registry, "llmesh_limiter_releases_total", origin="limiter", result="released") == 1

    asyncio.run(main())


def test_a_retry_admitted_after_all_keeps_its_reservation(tmp_path: Path) -> None:
    """The lost call admitted n1; the gateway's retry with the same nonce is admitted (once): not released."""
    limiter, store, _ = _lost_reply_limiter(tmp_path, lost=1)

    async def main() -> None:
        with pytest.raises(Unavailable):
            await limiter.reserve("k2", "free", 10, 20, nonce="n1")
        decision = await limiter.reserve("k2", "free", 10, 20, nonce="n1")
        assert decision.allowed and limiter.pending_releases == 0
        await limiter.probe_store()
        assert await _usage(store, limiter, "k2", Tier.FREE) == (1, 30, 1)
        assert await limiter.settle(decision.reservation_id, 12)
        assert await _usage(store, limiter, "k2", Tier.FREE) == (1, 12, 0)

    asyncio.run(main())


def test_release_by_nonce_undoes_and_blocks_a_late_reserve(tmp_path: Path) -> None:
    limiter, store, _, registry = make(tmp_path)

    async def main() -> None:
        d = await limiter.reserve("k3", "free", 10, 20, nonce="g1")
        assert await limiter.release("k3", "free", "g1")
        assert await _usage(store, limiter, "k3", Tier.FREE) == (0, 0, 0)
        assert not await limiter.settle(d.reservation_id, 30)
        # Released before its Reserve arrived (the gateway's deadline passed first): the Reserve is refused.
        assert not await limiter.release("k3", "free", "g2")
        with pytest.raises(Unavailable, match="released"):
            await limiter.reserve("k3", "free", 10, 20, nonce="g2")
        assert await _usage(store, limiter, "k3", Tier.FREE) == (0, 0, 0)
        # While the store is down a release is queued, and lands when it answers.
        d = await limiter.reserve("k3", "free", 10, 20, nonce="g3")
        store.mode = "down"
        assert not await limiter.release("k3", "free", "g3")
        assert limiter.pending_releases == 1
        store.mode = "up"
        await limiter.probe_store()
        assert limiter.pending_releases == 0 and await _usage(store, limiter, "k3", Tier.FREE) == (0, 0, 0)
        assert metric(registry, "llmesh_limiter_releases_total", origin="gateway", result="queued") == 1

    asyncio.run(main())


class PastDeadline:
    """A servicer context whose caller's deadline has already passed (the limiter was stalled meanwhile)."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float:
        return -0.2

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def test_a_reserve_that_arrives_after_its_deadline_reserves_nothing(tmp_path: Path) -> None:
    limiter, store, _, _ = make(tmp_path)
    context = PastDeadline()
    request = limiter_pb2.ReserveRequest(key_id="k4", tier=common_pb2.TIER_FREE, prompt_tokens=5, max_tokens=5)
    with pytest.raises(RuntimeError):
        asyncio.run(LimiterServicer(limiter).Reserve(request, context))  # type: ignore[arg-type]
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert store.calls == 0


def test_release_checks_its_input(tmp_path: Path) -> None:
    limiter, _, _, _ = make(tmp_path)
    for args in (("bad key", "free", "n"), ("k", "gold", "n"), ("k", "free", ""), ("k", "free", "x" * 65)):
        with pytest.raises(InvalidRequest):
            asyncio.run(limiter.release(*args))


def test_local_reservation_settles_locally(tmp_path: Path) -> None:
    limiter, store, _, _ = make(tmp_path)
    store.mode = "down"

    async def main() -> None:
        for _ in range(3):
            await limiter.reserve("x", "paid", 1, 1)  # open the circuit
        d = await limiter.reserve("p5", "paid", 1, 1)
        assert d.reservation_id.startswith("l/")
        assert await limiter.settle(d.reservation_id, 2)
        assert not await limiter.settle(d.reservation_id, 2)

    asyncio.run(main())


def test_edge_limits_per_ip_and_per_key(tmp_path: Path) -> None:
    limiter, store, _, registry = make(tmp_path)
    key = "lm-some-key"
    auth = f"Bearer {key}"

    async def main() -> None:
        ip = [("remote_address", "10.0.0.1")]
        results = [await limiter.edge_check([ip]) for _ in range(4)]
        assert [r.over for r in results] == [False, False, False, True]
        headers = dict(results[-1].headers)
        assert headers["x-ratelimit-limit"] == "3" and headers["x-ratelimit-remaining"] == "0"
        assert 59 <= int(headers["retry-after"]) <= 60

        by_key = [
            await limiter.edge_check([[("remote_address", f"10.0.1.{i}")], [("api_key", auth)]]) for i in range(3)
        ]
        assert [r.over for r in by_key] == [False, False, True]
        assert by_key[-1].statuses[0].over is False and by_key[-1].statuses[1].over is True
        assert dict(by_key[-1].headers)["x-ratelimit-limit"] == "2"

        # A key id with its own edge limit; a malformed header and unknown descriptors are not limited.
        own = f"Bearer lm-{'x' * 10}"
        assert key_id_for(hash_key(own.split()[1])) != "cccccccccccccccc"
        odd = await limiter.edge_check([[("api_key", "Basic abc")], [("path", "/x")], [("a", "1"), ("b", "2")]])
        assert not odd.over and all(s.limit == -1 for s in odd.statuses)

        store.mode = "down"  # edge fails open by default: local per-IP limits
        assert not (await limiter.edge_check([[("remote_address", "10.9.9.9")]])).over

    asyncio.run(main())
    assert metric(
        registry,
        "llmesh_limiter_decisions_total",
        tier="edge",
        limit="per_ip_per_minute",
        result="refused",
        store="redis",
    )


def test_edge_per_key_override(tmp_path: Path) -> None:
    key = "lm-override-me"
    key_id = key_id_for(hash_key(key))
    limiter, _, _, _ = make(tmp_path, POLICY + f"\n[keys.{key_id}]\nedge_per_minute = 1\n")

    async def main() -> None:
        first = await limiter.edge_check([[("api_key", f"Bearer {key}")]])
        second = await limiter.edge_check([[("api_key", f"Bearer {key}")]])
        assert not first.over and second.over

    asyncio.run(main())


def test_default_policy_file_is_valid_and_free_is_20_per_hour() -> None:
    policy = PolicySource(DEFAULT_POLICY_FILE).policy
    free = policy.quota("0123456789abcdef", Tier.FREE)
    assert free.subject == "key:0123456789abcdef"
    assert free.limits.requests_per_hour == 20
    assert free.limits.on_store_failure is FailureMode.CLOSED
    paid, enterprise = policy.tiers[Tier.PAID], policy.tiers[Tier.ENTERPRISE]
    assert enterprise.requests_per_hour > paid.requests_per_hour > 20
    assert paid.on_store_failure is FailureMode.OPEN


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tiers.free]\nrequests_per_hour = 1\n", "missing"),
        (POLICY + "[tiers.gold]\n", "unknown tier"),
        (POLICY.replace("requests_per_hour = 3", "requests_per_hour = -3"), "integer >= 0"),
        (POLICY.replace("requests_per_hour = 3", "request_per_hour = 3"), "unknown setting 'request_per_hour'"),
        (POLICY.replace('on_store_failure = "closed"', 'on_store_failure = "maybe"'), '"open" or "closed"'),
        (POLICY + "[keys.dddddddddddddddd]\norg = 'nope'\n", "no [orgs.nope]"),
        (POLICY + "[keys.eeeeeeeeeeeeeeee]\norg = 'acme'\nrequests_per_hour = 3\n", "org's limits"),
        (POLICY + "[quotas]\n", "unknown section"),
        ("[tiers.free\n", "not valid TOML"),
    ],
)
def test_policy_errors_say_where(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_policy(text)


def test_policy_file_change_takes_effect_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    source = PolicySource(path)
    assert source.reload_if_changed() is None
    path.write_text(POLICY.replace("requests_per_hour = 3", "requests_per_hour = 7"))
    os.utime(path, ns=(1, 1))  # a different stamp even within one mtime tick
    assert source.reload_if_changed() is True
    assert source.policy.tiers[Tier.FREE].requests_per_hour == 7
    path.write_text("[tiers.free\n")
    assert source.reload_if_changed() is False
    assert source.policy.tiers[Tier.FREE].requests_per_hour == 7 and "not valid TOML" in source.last_error
