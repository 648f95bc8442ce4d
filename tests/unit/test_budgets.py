"""The watchdog (llmesh/budgets.py) and the limiter's outage policy (gateway/limiter_outage.py), with fakes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from gateway.limiter_outage import UNCHECKED, LimiterOutagePolicy, parse_tiers
from gateway.pipeline import Reservation
from llmesh.breaker import BreakerState
from llmesh.budgets import DependencyHung, Watchdog
from llmesh.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from llmesh.types import Principal, Tier
from tests.fixtures.cache import FakeClock

T = TypeVar("T")


class FakePeer:
    """A dependency's health check: answers at once, or hangs (`hung`), or fails."""

    def __init__(self) -> None:
        self.hung = False
        self.delay_s = 0.0
        self.error: Exception | None = None
        self.probes = 0

    async def probe(self, timeout_s: float) -> None:
        self.probes += 1
        if self.error is not None:
            raise self.error
        await asyncio.sleep(self.delay_s)
        if self.hung:
            await asyncio.Event().wait()


async def timed(awaitable: Awaitable[T]) -> tuple[float, T]:
    started = time.monotonic()
    result = await awaitable
    return time.monotonic() - started, result


async def answer_after(seconds: float, value: str = "answer") -> str:
    await asyncio.sleep(seconds)
    return value


def test_a_fast_call_is_never_probed() -> None:
    peer = FakePeer()
    watchdog = Watchdog("the peer", peer.probe, 0.05, 0.05)
    assert asyncio.run(watchdog.call(answer_after(0))) == "answer"
    assert peer.probes == 0


def test_a_slow_but_live_dependency_is_waited_for() -> None:
    peer = FakePeer()
    watchdog = Watchdog("the peer", peer.probe, 0.02, 0.02)
    started = time.monotonic()
    assert asyncio.run(watchdog.call(answer_after(0.3))) == "answer"
    assert time.monotonic() - started >= 0.3
    assert peer.probes >= 3, "probed every answer_s while waiting"


@pytest.mark.parametrize("failure", ["hangs", "refuses"])
def test_a_hung_dependency_costs_at_most_the_budget_and_the_call_is_cancelled(failure: str) -> None:
    peer = FakePeer()
    peer.hung = failure == "hangs"
    peer.error = ConnectionRefusedError() if failure == "refuses" else None
    watchdog = Watchdog.with_budget("the peer", peer.probe, 0.1)
    cancelled = asyncio.Event()

    async def never() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(DependencyHung) as hung:
            await watchdog.call(never())
        elapsed = time.monotonic() - started
        await asyncio.wait_for(cancelled.wait(), 1)
        assert str(hung.value) == "the peer did not answer within 100 ms"
        assert isinstance(hung.value, Unavailable), "a hung dependency is UNAVAILABLE to the caller"
        return elapsed

    elapsed = asyncio.run(main())
    assert 0.05 <= elapsed < 0.1 + 0.15
    assert peer.probes == 1


def test_a_dependency_answering_other_calls_is_not_probed_for_a_slow_one() -> None:
    peer = FakePeer()
    peer.hung = True  # its health check would fail: only its answers to other calls show it is alive
    watchdog = Watchdog("the peer", peer.probe, 0.05, 0.05)

    async def main() -> str:
        slow = asyncio.ensure_future(watchdog.call(answer_after(0.4, "slow")))
        while not slow.done():
            await watchdog.call(answer_after(0.01))
        return await slow

    assert asyncio.run(main()) == "slow"
    assert peer.probes == 0


def test_an_answer_that_arrives_while_probing_is_used() -> None:
    peer = FakePeer()
    peer.hung = True
    watchdog = Watchdog("the peer", peer.probe, 0.02, 0.2)
    assert asyncio.run(watchdog.call(answer_after(0.05))) == "answer"


def test_the_callers_cancellation_cancels_the_call() -> None:
    peer = FakePeer()
    watchdog = Watchdog("the peer", peer.probe, 0.02, 0.02)
    cancelled = asyncio.Event()

    async def never() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        task = asyncio.create_task(watchdog.call(never()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(cancelled.wait(), 1)

    asyncio.run(main())


# ---- the limiter's outage policy -----------------------------------------------------------------------------


class FakeGate:
    """The limiter's QuotaGate: answers (after `delay_s`), or hangs until its deadline, or fails with `error`."""

    def __init__(self) -> None:
        self.hung = False
        self.delay_s = 0.0
        self.error: Exception | None = None
        self.reserves = 0
        self.settled: list[tuple[str, int]] = []
        self.cancelled = 0

    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        self.reserves += 1
        if self.error is not None:
            raise self.error
        try:
            await asyncio.sleep(self.delay_s)
            if self.hung:
                await asyncio.sleep(DEADLINE_S)
                raise DeadlineExceeded("Deadline Exceeded")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Reservation(f"r{self.reserves}", prompt_tokens + max_tokens)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        self.settled.append((reservation.id, used_tokens))


PAID = Principal("k-paid", Tier.PAID)
FREE = Principal("k-free", Tier.FREE)
DEADLINE_S = 0.4  # the gate's own deadline on Reserve
CONFIRM_S = 0.2


def policy(gate: FakeGate, peer: FakePeer, clock: FakeClock) -> LimiterOutagePolicy:
    return LimiterOutagePolicy(
        gate, peer.probe, frozenset({Tier.PAID}), hang_budget_s=0.1, confirm_s=CONFIRM_S, cooldown_s=1.0, clock=clock
    )


def test_a_hung_limiter_fails_open_within_the_budget_closed_once_confirmed_then_recovers() -> None:
    gate, peer, clock = FakeGate(), FakePeer(), FakeClock()
    quotas = policy(gate, peer, clock)

    async def main() -> None:
        reservation = await quotas.reserve(PAID, "r", 10, 20)
        assert reservation.id == "r1"
        await quotas.settle(reservation, 25)
        assert gate.settled == [("r1", 25)]

        gate.hung = peer.hung = True
        elapsed, admitted = await timed(quotas.reserve(PAID, "r", 10, 20))
        assert admitted.id == UNCHECKED and elapsed < 0.1 + 0.15, "fail open within the hang budget"
        await asyncio.sleep(0)  # the abandoned call runs its cancellation
        assert gate.cancelled == 1, "the abandoned call is cancelled (the gate releases what it gets)"
        await quotas.settle(admitted, 30)
        assert gate.settled == [("r1", 25)], "nothing to settle for an unchecked request"

        started = time.monotonic()
        with pytest.raises(Unavailable, match="free tier is not served"):
            await quotas.reserve(FREE, "r", 1, 1)
        assert time.monotonic() - started < DEADLINE_S + 0.2, "refused once confirmed, within the call's deadline"
        assert quotas.breaker.state is BreakerState.OPEN

        # Within the cooldown the limiter is not asked at all: the policy applies at once.
        calls = gate.reserves
        started = time.monotonic()
        with pytest.raises(Unavailable, match="free tier is not served"):
            await quotas.reserve(FREE, "r", 1, 1)
        assert (await quotas.reserve(PAID, "r", 1, 1)).id == UNCHECKED
        assert time.monotonic() - started < 0.05 and gate.reserves == calls
        assert quotas.decided == {"admitted": 2, "refused": 2}

        clock.advance(1.0)
        gate.hung = peer.hung = False
        assert (await quotas.reserve(FREE, "r", 1, 1)).id.startswith("r"), "one request tries again: answered"
        assert quotas.breaker.state is BreakerState.CLOSED

    asyncio.run(main())


def test_a_busy_limiter_is_not_taken_for_a_hung_one() -> None:
    """A burst keeps the limiter from answering anything, its health check included, for longer than the hang
    budget: fail-closed requests wait for their answers instead of being refused, and the breaker stays closed."""
    gate, peer, clock = FakeGate(), FakePeer(), FakeClock()
    quotas = policy(gate, peer, clock)
    gate.delay_s = 0.3
    peer.delay_s = 0.1  # longer than the budget's probe half (0.05 s), shorter than CONFIRM_S

    async def main() -> None:
        results = await asyncio.gather(*(quotas.reserve(FREE, f"r{i}", 1, 1) for i in range(5)))
        assert all(r.id != UNCHECKED for r in results)
        assert quotas.breaker.state is BreakerState.CLOSED
        assert quotas.decided == {"admitted": 0, "refused": 0}

    asyncio.run(main())


def test_a_limiter_that_answers_is_never_overruled() -> None:
    gate, peer, clock = FakeGate(), FakePeer(), FakeClock()
    quotas = policy(gate, peer, clock)

    async def main() -> None:
        # Its own outage answer (its store is down and the tier fails closed) passes through, for every tier.
        gate.error = Unavailable("quota store unavailable")
        with pytest.raises(Unavailable, match="quota store"):
            await quotas.reserve(PAID, "r", 1, 1)
        assert quotas.breaker.state is BreakerState.CLOSED
        gate.error = ResourceExhausted("requests_per_hour limit reached", retry_after_s=3)
        with pytest.raises(ResourceExhausted):
            await quotas.reserve(PAID, "r", 1, 1)

        # Unreachable (connection refused, health check too): the policy.
        gate.error = Unavailable("limiter unavailable: connection refused")
        peer.error = ConnectionRefusedError()
        assert (await quotas.reserve(PAID, "r", 1, 1)).id == UNCHECKED
        assert quotas.breaker.state is BreakerState.OPEN

    asyncio.run(main())


def test_fail_open_tiers_are_parsed_strictly() -> None:
    assert parse_tiers("paid, enterprise") == frozenset({Tier.PAID, Tier.ENTERPRISE})
    assert parse_tiers("") == frozenset()
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        parse_tiers("paid,gold")
