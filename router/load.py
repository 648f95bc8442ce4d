"""Live load per variant pool: requests in flight and recent time-to-first-token, with an injected clock."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class PoolLoad:
    in_flight: int = 0
    # (finished_at, seconds) of recent first tokens; also the waits of requests still without one count.
    ttft_samples: deque[tuple[float, float]] = field(default_factory=deque)
    waiting_since: dict[int, float] = field(default_factory=dict)


class LoadTracker:
    """Per-variant counters the policy reads. Time-to-first-token covers queueing in Triton and prefill."""

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._pools: dict[str, PoolLoad] = {}
        self._next_ticket = 0

    def _pool(self, variant: str) -> PoolLoad:
        return self._pools.setdefault(variant, PoolLoad())

    def started(self, variant: str) -> int:
        """A request was sent; returns a ticket for first_token / finished."""
        pool = self._pool(variant)
        pool.in_flight += 1
        self._next_ticket += 1
        pool.waiting_since[self._next_ticket] = self._clock()
        return self._next_ticket

    def first_token(self, variant: str, ticket: int) -> float:
        pool = self._pool(variant)
        start = pool.waiting_since.pop(ticket, None)
        if start is None:
            return 0.0
        now = self._clock()
        pool.ttft_samples.append((now, now - start))
        return now - start

    def finished(self, variant: str, ticket: int) -> None:
        pool = self._pool(variant)
        pool.in_flight = max(0, pool.in_flight - 1)
        pool.waiting_since.pop(ticket, None)

    def in_flight(self, variant: str) -> int:
        return self._pool(variant).in_flight

    def ttft_p95(self, variant: str) -> float:
        """p95 over the window of finished first tokens and of the waits of requests still waiting for one:
        a pool that stopped answering shows up at once, not only after its slow answers arrive."""
        pool = self._pool(variant)
        now = self._clock()
        while pool.ttft_samples and now - pool.ttft_samples[0][0] > self._window_s:
            pool.ttft_samples.popleft()
        values = sorted([s for _, s in pool.ttft_samples] + [now - t for t in pool.waiting_since.values()])
        if not values:
            return 0.0
        return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
