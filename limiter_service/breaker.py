"""A circuit breaker in front of the quota store: after a few consecutive failures, stop calling it until a
probe succeeds, so an outage costs each request microseconds instead of a timeout."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, open_at_start: bool = False) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._threshold = failure_threshold
        self._failures = 0
        self._open = open_at_start
        self.last_error = ""
        self.transitions = 0

    @property
    def open(self) -> bool:
        return self._open

    def record_success(self) -> None:
        self._failures = 0
        if self._open:
            self._open = False
            self.transitions += 1
            log.warning("quota store answers again: circuit closed")

    def record_failure(self, error: str) -> None:
        self._failures += 1
        self.last_error = error
        if not self._open and self._failures >= self._threshold:
            self._open = True
            self.transitions += 1
            log.error("quota store failed %d times in a row, circuit open: %s", self._failures, error)
