"""The mesh's one circuit breaker: after `failure_threshold` consecutive failures a dependency is skipped for
`cooldown_s`; then one caller probes it (half-open) while the others keep skipping; the probe's outcome closes
or re-opens the circuit. An outage then costs a request microseconds instead of a timeout.

The clock is injected (tests step it); `on_change` is called on every state change (health, metrics, logs),
also from the constructor when the breaker starts open.

Two ways to probe. A caller that may pay for a probe asks `allow()`: after the cooldown the first one to ask is the
probe. A caller that must never pay for one (a hot path with a latency budget) checks `closed` instead and leaves
probing to a background task, which calls the dependency and reports with `record_success` / `record_failure`
directly: from open, a success closes the circuit and a failure keeps it open (no transition, no `on_change`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

Clock = Callable[[], float]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        cooldown_s: float,
        failure_threshold: int = 1,
        clock: Clock = time.monotonic,
        open_at_start: bool = False,
        on_change: Callable[[BreakerState, str], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cooldown_s < 0:
            raise ValueError("cooldown_s must be >= 0")
        self._cooldown_s = cooldown_s
        self._threshold = failure_threshold
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._retry_at = 0.0
        self.last_error = ""
        self.transitions = 0
        if open_at_start:
            self._set(BreakerState.OPEN, "open at start")
            self._retry_at = clock()  # the first caller probes at once

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is BreakerState.CLOSED

    def allow(self) -> bool:
        """May the caller use the dependency now? While open, the first caller after the cooldown is the probe."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if self._state is BreakerState.OPEN and now >= self._retry_at:
            self._set(BreakerState.HALF_OPEN, self.last_error)
            # Should the probe never report back (cancelled caller), another probe is allowed after a cooldown.
            self._retry_at = now + self._cooldown_s
            return True
        if self._state is BreakerState.HALF_OPEN and now >= self._retry_at:
            self._retry_at = now + self._cooldown_s
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        if self._state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED, "")

    def record_failure(self, error: str = "") -> None:
        self._failures += 1
        self.last_error = error
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._failures >= self._threshold
        ):
            self._retry_at = self._clock() + self._cooldown_s
            self._set(BreakerState.OPEN, error)

    def _set(self, state: BreakerState, reason: str) -> None:
        if state is self._state:
            return
        self._state = state
        self.transitions += 1
        if self._on_change is not None:
            self._on_change(state, reason)
