"""Time budgets for calls to a dependency that may hang: the `Watchdog`, a gRPC health probe, channel options.

A process that is stopped (SIGSTOP), wedged or starved keeps its TCP connections, and its kernel still accepts new
ones: a call to it never fails, it stays silent until its deadline. A deadline alone cannot tell such a peer from one
that is slow for a reason (a cache lookup waiting for an identical request in flight, a generation queued behind
others), so a deadline short enough for the first cuts the second off. The watchdog tells them apart: a call still
unanswered after `answer_s` makes it ask the peer something every live process answers at once (a health check)
unless the peer answered other calls meanwhile; a peer that leaves that unanswered for `probe_s` as well is hung,
and the call is abandoned (cancelled) with `DependencyHung`. A hung dependency thus costs a call at most
`answer_s + probe_s`; a live, slow one is waited for, probed every `answer_s`, up to the call's own deadline. With a
circuit breaker (llmesh/breaker.py) in front, that cost is paid once per cooldown, not by every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.errors import Unavailable

T = TypeVar("T")

# Given a deadline in seconds, returns once the peer answered, raises if it did not.
Probe = Callable[[float], Awaitable[None]]

# Client channels reconnect after a peer restarted within about a second, not after gRPC's default backoff (up to
# 120 s, during which every call fails at once). Only connection attempts to an unreachable peer are made this often.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A target naming several servers (`dns:///router-headless:50052`, every pod an address) spreads calls over all
    # of them; a target with one address behaves as before. With the servers' max_connection_age (grpc_util), the
    # name is resolved again at each reconnect, so pods added by an autoscaler are found.
    ("grpc.lb_policy_name", "round_robin"),
)


class DependencyHung(Unavailable):
    """The dependency accepted the call but answered neither it nor a health check within the budget."""


class Watchdog:
    """Runs calls to one dependency within its time budget (see the module docstring).

    `name` appears in error messages and is shown to callers: a role ("the router"), never an address.
    """

    def __init__(self, name: str, probe: Probe, answer_s: float, probe_s: float) -> None:
        if answer_s <= 0 or probe_s <= 0:
            raise ValueError("answer_s and probe_s must be > 0")
        self.name = name
        self._probe = probe
        self.answer_s = answer_s
        self.probe_s = probe_s
        # When the dependency last answered a call or a health check (event loop time): while it answers others,
        # a call waiting for its own answer is slow, not hung, and needs no health check of its own.
        self._answered_at = -math.inf

    @classmethod
    def with_budget(cls, name: str, probe: Probe, budget_s: float) -> Watchdog:
        """Half the budget for the answer, half for the health check."""
        return cls(name, probe, budget_s / 2, budget_s / 2)

    @property
    def budget_s(self) -> float:
        """The most a hung dependency costs one call."""
        return self.answer_s + self.probe_s

    async def alive(self) -> bool:
        """Does the dependency answer a health check within `probe_s`?"""
        try:
            await asyncio.wait_for(self._probe(self.probe_s), self.probe_s)
        except (TimeoutError, grpc.RpcError, OSError):
            return False
        self._answered_at = asyncio.get_running_loop().time()
        return True

    def hung(self) -> DependencyHung:
        return DependencyHung(f"{self.name} did not answer within {self.budget_s * 1000:.0f} ms")

    async def call(self, awaitable: Awaitable[T]) -> T:
        """The awaitable's result; DependencyHung (and the awaitable cancelled) if the dependency is hung."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                waiting_since = loop.time()
                done, _ = await asyncio.wait({task}, timeout=self.answer_s)
                if done:
                    if not task.cancelled() and task.exception() is None:
                        self._answered_at = loop.time()
                    return task.result()
                if self._answered_at >= waiting_since:
                    continue  # it answered other calls meanwhile
                if not await self.alive() and not task.done():
                    raise self.hung()
        finally:
            if not task.done():
                task.cancel()
                # Retrieve its outcome so that a late error is not reported as "never retrieved".
                task.add_done_callback(_consume)


def _consume(task: asyncio.Future[Any]) -> None:
    with contextlib.suppress(BaseException):
        task.exception()


def health_probe(channel: grpc.aio.Channel, service: str = "") -> Probe:
    """A probe calling grpc.health.v1 Check on `channel`: any answer, SERVING or not, comes from a live process."""
    stub = health_pb2_grpc.HealthStub(channel)

    async def probe(timeout_s: float) -> None:
        try:
            await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise

    return probe
