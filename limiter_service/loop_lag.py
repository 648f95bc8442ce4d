"""Tell a slow Redis from a busy limiter.

A Redis call's timeout is wall-clock time on this process's event loop. When the loop itself is saturated (a
burst of hundreds of concurrent checks on a small machine), a reply that Redis sent in time can sit unread past
the timeout. Counting that as a store failure opens the circuit breaker and makes fail-closed tiers answer
UNAVAILABLE while Redis is fine. `LoopLagMonitor` ticks on the loop and remembers when it last ran late, so a
timeout that overlapped such a stall is retried instead of counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopLagMonitor:
    def __init__(self, period_s: float = 0.01, late_s: float = 0.03, clock: Callable[[], float] = time.monotonic):
        self._period_s = period_s
        self._late_s = late_s
        self._clock = clock
        self._last_tick = clock()
        self._last_late = float("-inf")

    async def run(self) -> None:
        """Background task on the loop being watched."""
        while True:
            await asyncio.sleep(self._period_s)
            self.tick()

    def tick(self) -> None:
        now = self._clock()
        if now - self._last_tick > self._period_s + self._late_s:
            self._last_late = now
        self._last_tick = now

    def stalled_since(self, started: float) -> bool:
        """Whether the loop ran late at any point since `started` (a value of the same clock), including now."""
        now = self._clock()
        return self._last_late >= started or now - self._last_tick > self._period_s + self._late_s

    def now(self) -> float:
        return self._clock()
