"""Supervision for `llmesh up`: a part that dies is restarted with backoff, with the same argv and ports; a part that
keeps dying stops the mesh.

Plain logic over a small process interface and an injected clock (tests/unit/test_supervisor.py); the launcher
calls `Supervisor.poll()` from its main loop. Only an exited process is restarted: a part that is alive but does
not answer (hung, SIGSTOPped, waiting for its own dependency) is left alone and shows as unhealthy in
`llmesh status`, since the services already bound the time a hung dependency costs and recover by themselves.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from control.process import run_probe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead part is started again, and when the launcher gives up on it and stops the mesh."""

    # Restarts allowed within `window_s`; a part that dies once more stops the mesh. 0: never restart.
    max_restarts: int = 5
    window_s: float = 300.0
    # Wait before the first restart; doubles with each restart, up to backoff_max_s.
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    # A part that stayed healthy this long is restarted after backoff_s again.
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {self.max_restarts}")
        for name in ("window_s", "backoff_s", "backoff_max_s", "reset_after_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is below backoff_s ({self.backoff_s})")


class RestartBudget:
    """One part's restarts under a policy: the delay before the next one, or None once the budget is spent."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._restarts: deque[float] = deque()
        self._delay = policy.backoff_s

    def on_exit(self, now: float, healthy_for: float) -> float | None:
        """A part exited at `now` after being healthy for `healthy_for` seconds (0: it never became ready):
        seconds to wait before restarting it, or None to give up."""
        if healthy_for >= self.policy.reset_after_s:
            self._delay = self.policy.backoff_s
        while self._restarts and now - self._restarts[0] >= self.policy.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.policy.max_restarts:
            return None
        delay = self._delay
        self._delay = min(self._delay * 2, self.policy.backoff_max_s)
        self._restarts.append(now)
        return delay

    @property
    def recent(self) -> int:
        """Restarts counted against the window (as of the last exit)."""
        return len(self._restarts)


class Child(Protocol):
    """What the supervisor needs of a process (control.process.ManagedProcess)."""

    name: str

    @property
    def pid(self) -> int | None: ...

    def start(self) -> object: ...

    def alive(self) -> bool: ...

    def exit_summary(self) -> str: ...

    def exit_description(self) -> str: ...

    def stop(self, grace: float = ...) -> None: ...


class PartState(StrEnum):
    STARTING = "starting"  # started, its probe not yet true
    RUNNING = "running"  # its probe was true once since it started
    BACKOFF = "backoff"  # dead, waiting to be restarted
    FAILED = "failed"  # dead past its restart budget
    STOPPED = "stopped"


@dataclass
class Part:
    process: Child
    probe: Callable[[], bool]
    budget: RestartBudget
    # What it listens on, for `llmesh status` ({"grpc": 8001, "http": 8000, ...}).
    ports: dict[str, int] = field(default_factory=dict)
    state: PartState = PartState.STARTING
    restarts: int = 0
    # Supervisor clock readings.
    started_at: float | None = None
    ready_at: float | None = None
    died_at: float | None = None
    restart_at: float | None = None
    last_exit: str | None = None

    @property
    def name(self) -> str:
        return self.process.name


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


class Supervisor:
    def __init__(
        self, policy: RestartPolicy, startup_timeout_s: float, clock: Callable[[], float], grace_s: float = 10.0
    ) -> None:
        self.policy = policy
        self.startup_timeout_s = startup_timeout_s
        self.clock = clock
        self.grace_s = grace_s
        self.parts: list[Part] = []

    def add(self, process: Child, probe: Callable[[], bool], ports: dict[str, int] | None = None) -> Part:
        """A part the caller has just started (state STARTING until `ready()` or a poll sees its probe true)."""
        part = Part(process, probe, RestartBudget(self.policy), dict(ports or {}), started_at=self.clock())
        self.parts.append(part)
        return part

    def ready(self, part: Part) -> None:
        part.state = PartState.RUNNING
        part.ready_at = self.clock()

    def poll(self) -> str | None:
        """One round: notice exits, restart what is due, mark restarted parts ready once their probe is true.
        Returns why the mesh must stop (a part dead past its restart budget), else None."""
        for part in self.parts:
            now = self.clock()
            if part.state in (PartState.STARTING, PartState.RUNNING) and not part.process.alive():
                failure = self._exited(part, now, part.process.exit_summary())
                if failure is not None:
                    return failure
            elif part.state is PartState.BACKOFF and part.restart_at is not None and now >= part.restart_at:
                failure = self._restart(part, now)
                if failure is not None:
                    return failure
            elif part.state is PartState.STARTING:
                if run_probe(part.probe):
                    self.ready(part)
                    took = f", {self.clock() - part.died_at:.1f} s after it died" if part.died_at is not None else ""
                    log.info(
                        "%s is ready again (pid %s, restart %d%s)", part.name, part.process.pid, part.restarts, took
                    )
                elif part.started_at is not None and now - part.started_at >= self.startup_timeout_s:
                    part.process.stop(self.grace_s)
                    failure = self._exited(part, now, f"was not ready within {self.startup_timeout_s:.0f} s")
                    if failure is not None:
                        return failure
        return None

    def _exited(self, part: Part, now: float, how: str) -> str | None:
        healthy_for = now - part.ready_at if part.state is PartState.RUNNING and part.ready_at is not None else 0.0
        part.last_exit, part.died_at = how, now
        delay = part.budget.on_exit(now, healthy_for)
        if delay is None:
            part.state = PartState.FAILED
            limit = (
                "restarts are off (--restart-max 0)"
                if self.policy.max_restarts == 0
                else f"it was restarted {_times(part.budget.recent)} within {self.policy.window_s:g} s "
                f"(--restart-max {self.policy.max_restarts}, --restart-window-s {self.policy.window_s:g})"
            )
            log.error("%s (pid %s) %s; %s: giving up", part.name, part.process.pid, how, limit)
            return f"{part.process.exit_description()}\n{part.name} {how} and {limit}: giving up"
        part.state, part.restart_at = PartState.BACKOFF, now + delay
        log.warning(
            "%s (pid %s) %s; restarting it in %.1f s (restart %d of %d within %g s)",
            part.name,
            part.process.pid,
            how,
            delay,
            part.budget.recent,
            self.policy.max_restarts,
            self.policy.window_s,
        )
        return None

    def _restart(self, part: Part, now: float) -> str | None:
        part.restarts += 1
        part.state, part.started_at, part.ready_at, part.restart_at = PartState.STARTING, now, None, None
        try:
            part.process.start()
        except OSError as exc:  # the executable is gone, out of memory or pids: a try that failed
            return self._exited(part, now, f"could not be started ({exc})")
        log.info("restarted %s (pid %s, restart %d)", part.name, part.process.pid, part.restarts)
        return None

    def stop_all(self) -> None:
        """Stop every part in reverse start order."""
        for part in reversed(self.parts):
            if part.state is not PartState.STOPPED:
                log.info("stopping %s", part.name)
                part.process.stop(self.grace_s)
                part.state = PartState.STOPPED
