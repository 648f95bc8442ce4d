"""llmesh bench load generation: closed-loop concurrency, open-loop arrivals, bounds, with a fake sender and clock."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from control.bench.load import LoadPlan, RunOutcome, run_load
from control.bench.stream import OK, RequestResult
from control.bench.workload import BenchRequest, WorkloadGenerator, WorkloadSpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        # Tasks already created start before time moves on, as they would on a real loop.
        await asyncio.sleep(0)
        self.now += seconds


class FakeSender:
    """Answers after `service_s` of fake time (or a real yield), tracking how many requests overlap."""

    def __init__(self, clock: FakeClock | None = None, service_s: float = 0.0) -> None:
        self.clock, self.service_s = clock, service_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.sent: list[tuple[int, float]] = []
        self.release: asyncio.Event | None = None

    async def __call__(self, request: BenchRequest) -> RequestResult:
        now = self.clock() if self.clock else 0.0
        self.sent.append((request.index, now))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.release is not None:
                await self.release.wait()
            for _ in range(3):
                await asyncio.sleep(0)  # let other workers start
            if self.clock is not None:
                self.clock.now += self.service_s
            end = self.clock() if self.clock else 0.0
            return RequestResult(request.index, request.kind, request.tier, now, end, OK)
        finally:
            self.in_flight -= 1


def requests() -> WorkloadGenerator:
    return WorkloadGenerator(WorkloadSpec(seed=5))


def test_fixed_concurrency_keeps_n_in_flight_and_stops_at_the_count() -> None:
    sender = FakeSender()
    outcome = asyncio.run(run_load(LoadPlan(concurrency=4, requests=25), requests(), sender))
    assert len(outcome.results) == 25
    assert sender.max_in_flight == 4
    assert sorted(r.index for r in outcome.results) == list(range(25))  # each request once, in sequence order
    assert [i for i, _ in sender.sent][:4] == [0, 1, 2, 3]


def test_duration_bound_stops_issuing_and_awaits_what_is_in_flight() -> None:
    clock = FakeClock()
    sender = FakeSender(clock, service_s=1.0)
    plan = LoadPlan(concurrency=1, duration_s=5.5)
    outcome = asyncio.run(run_load(plan, requests(), sender, clock=clock))
    # Sends at t = 0, 1, 2, 3, 4, 5; at t = 6 the duration has passed.
    assert [t for _, t in sender.sent] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert outcome.wall_s == pytest.approx(6.0)


def test_whichever_bound_comes_first() -> None:
    clock = FakeClock()
    plan = LoadPlan(concurrency=2, requests=3, duration_s=100.0)
    outcome = asyncio.run(run_load(plan, requests(), FakeSender(clock, 1.0), clock=clock))
    assert len(outcome.results) == 3


def test_open_loop_sends_on_the_arrival_schedule() -> None:
    clock = FakeClock()
    sender = FakeSender(clock)
    gaps = [0.5, 0.25, 1.0, 0.25, 2.0, 9.0]
    outcome = asyncio.run(
        run_load(LoadPlan(rate=2.0, requests=5), requests(), sender, gaps=gaps, clock=clock, sleep=clock.sleep)
    )
    assert [t for _, t in sender.sent] == pytest.approx([0.5, 0.75, 1.75, 2.0, 4.0])
    assert len(outcome.results) == 5 and outcome.delayed_arrivals == 0


def test_open_loop_duration_does_not_wait_for_an_arrival_after_the_end() -> None:
    clock = FakeClock()
    sender = FakeSender(clock)
    plan = LoadPlan(rate=1.0, duration_s=3.0)
    outcome = asyncio.run(
        run_load(plan, requests(), sender, gaps=itertools.repeat(1.0), clock=clock, sleep=clock.sleep)
    )
    assert [t for _, t in sender.sent] == [1.0, 2.0]
    assert outcome.finished == pytest.approx(2.0)


def test_open_loop_is_capped_by_max_in_flight_and_counts_delays() -> None:
    async def scenario() -> tuple[RunOutcome, FakeSender]:
        sender = FakeSender()
        sender.release = asyncio.Event()
        plan = LoadPlan(rate=1000.0, requests=6, max_in_flight=2)
        run = asyncio.create_task(run_load(plan, requests(), sender, gaps=itertools.repeat(0.0)))
        for _ in range(20):
            await asyncio.sleep(0)
        assert sender.in_flight == 2  # the third arrival waits for a slot
        sender.release.set()
        return await run, sender

    outcome, sender = asyncio.run(scenario())
    assert len(outcome.results) == 6
    assert sender.max_in_flight == 2
    assert outcome.delayed_arrivals >= 1


def test_on_result_sees_every_answer() -> None:
    seen: list[int] = []
    asyncio.run(
        run_load(
            LoadPlan(concurrency=3, requests=7), requests(), FakeSender(), on_result=lambda r: seen.append(r.index)
        )
    )
    assert sorted(seen) == list(range(7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requests": 5}, "exactly one of concurrency or rate"),
        ({"concurrency": 2, "rate": 1.0, "requests": 5}, "exactly one"),
        ({"concurrency": 2}, "bounded"),
        ({"concurrency": 0, "requests": 5}, "concurrency must be >= 1"),
        ({"rate": -1.0, "requests": 5}, "rate must be > 0"),
        ({"concurrency": 1, "duration_s": 0.0}, "duration must be > 0"),
    ],
)
def test_plans_must_be_valid_and_bounded(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadPlan(**kwargs)  # type: ignore[arg-type]


def test_rate_plan_without_gaps_is_refused() -> None:
    with pytest.raises(ValueError, match="arrival gaps"):
        asyncio.run(run_load(LoadPlan(rate=1.0, requests=1), requests(), FakeSender()))
