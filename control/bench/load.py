"""The load generator: fixed concurrency (closed loop) or Poisson arrivals (open loop), always bounded.

It only schedules: sending is a `Sender` passed in (HTTP in production, a fake in tests), and the clock and sleep
are injected so tests can drive time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from control.bench.stream import RequestResult
from control.bench.workload import BenchRequest

Sender = Callable[[BenchRequest], Awaitable[RequestResult]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class LoadPlan:
    # Exactly one of: N requests always in flight, or Poisson arrivals at `rate` per second.
    concurrency: int | None = None
    rate: float | None = None
    # Stop issuing after this many requests and/or this many seconds (whichever comes first); requests already
    # in flight are awaited.
    requests: int | None = None
    duration_s: float | None = None
    # Open loop only: arrivals wait while this many are in flight, so a stalled target cannot grow memory without
    # bound. The number of delayed arrivals is reported.
    max_in_flight: int = 512

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency or rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give requests and/or duration: a benchmark must be bounded")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be > 0, got {self.duration_s}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")

    def describe(self) -> str:
        load = f"concurrency {self.concurrency}" if self.concurrency is not None else f"Poisson {self.rate:g} req/s"
        bounds = []
        if self.requests is not None:
            bounds.append(f"{self.requests} requests")
        if self.duration_s is not None:
            bounds.append(f"{self.duration_s:g} s")
        return f"{load}, at most {' / '.join(bounds)}"


@dataclass(frozen=True)
class RunOutcome:
    results: list[RequestResult]  # in completion order
    started: float
    finished: float
    # Open loop: arrivals that had to wait for a free slot (max_in_flight), i.e. the offered rate was not met.
    delayed_arrivals: int = 0

    @property
    def wall_s(self) -> float:
        return self.finished - self.started


class _Budget:
    def __init__(self, plan: LoadPlan, requests: Iterable[BenchRequest], clock: Clock, started: float) -> None:
        self._plan, self._clock, self._started = plan, clock, started
        self._requests: Iterator[BenchRequest] = iter(requests)
        self.issued = 0

    def take(self) -> BenchRequest | None:
        plan = self._plan
        if plan.requests is not None and self.issued >= plan.requests:
            return None
        if plan.duration_s is not None and self._clock() - self._started >= plan.duration_s:
            return None
        request = next(self._requests, None)
        if request is not None:
            self.issued += 1
        return request


async def run_load(
    plan: LoadPlan,
    requests: Iterable[BenchRequest],
    send: Sender,
    *,
    gaps: Iterable[float] | None = None,
    clock: Clock = time.perf_counter,
    sleep: Sleep = asyncio.sleep,
    on_result: Callable[[RequestResult], None] | None = None,
) -> RunOutcome:
    """Sends `requests` per `plan`. Open loop needs `gaps` (seconds between arrivals, e.g. workload.poisson_gaps)."""
    started = clock()
    budget = _Budget(plan, requests, clock, started)
    results: list[RequestResult] = []

    def record(result: RequestResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    if plan.concurrency is not None:

        async def worker() -> None:
            while (request := budget.take()) is not None:
                record(await send(request))

        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
        return RunOutcome(results, started, clock())

    if gaps is None:
        raise ValueError("an open-loop (rate) plan needs arrival gaps")
    slots = asyncio.Semaphore(plan.max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    delayed = 0

    async def one(request: BenchRequest) -> None:
        try:
            record(await send(request))
        finally:
            slots.release()

    due = started
    for gap in gaps:
        due += gap
        if plan.duration_s is not None and due - started >= plan.duration_s:
            break  # the next arrival falls after the end: do not sleep until then
        wait = due - clock()
        if wait > 0:
            await sleep(wait)
        if slots.locked():
            delayed += 1
        await slots.acquire()
        request = budget.take()
        if request is None:
            slots.release()
            break
        task = asyncio.create_task(one(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return RunOutcome(results, started, clock(), delayed)
