"""The limiter's outage policy on the gateway's side: what a request gets while the limiter itself does not answer.

While the limiter's own store (Redis) fails, the limiter decides per tier (`on_store_failure` in
limiter_service/policy.toml). While the limiter process is hung or unreachable there is nobody to ask, so the gateway
applies the same choice itself:

- A fail-open tier is admitted without a quota check as soon as the limiter leaves a Reserve and a health check
  unanswered for its time budget (the watchdog, llmesh/budgets.py; 100 ms by default). Wrongly suspecting a busy
  limiter costs little: one request goes unchecked (and what the limiter admits for it later is released).
- A fail-closed tier is refused (UNAVAILABLE) only once the outage is confirmed: the limiter left a health check
  unanswered for `confirm_s` as well. A busy limiter (a burst of hundreds of requests on a small machine can keep it
  from answering anything for 100 ms) must not turn into refusals; a fail-closed request meanwhile waits for its own
  answer, up to the call's deadline.

A confirmed outage opens a circuit breaker: until its cooldown has passed, every request gets its tier's policy at
once, without asking the limiter; then one request tries again. A limiter that answers, even slowly or with an
error of its own, is never overruled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.pipeline import QuotaGate, Reservation
from llmesh.breaker import BreakerState, CircuitBreaker
from llmesh.budgets import DependencyHung, Probe, Watchdog
from llmesh.errors import DeadlineExceeded, MeshError, Unavailable
from llmesh.types import Principal, Tier

log = logging.getLogger(__name__)

# The reservation id of a request admitted without the limiter: there is nothing to settle.
UNCHECKED = ""


def parse_tiers(text: str) -> frozenset[Tier]:
    """ "paid,enterprise" -> those tiers; an unknown name is an error (a typo must not silently fail closed)."""
    tiers = set()
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        try:
            tiers.add(Tier(name))
        except ValueError:
            known = ", ".join(t.value for t in Tier)
            raise ValueError(f"unknown tier {name!r} in limiter_fail_open_tiers (known: {known})") from None
    return frozenset(tiers)


class LimiterOutagePolicy:
    """A QuotaGate in front of the limiter's (`gate`) that applies the outage policy while it does not answer.

    `probe` is the limiter's health check; `hang_budget_s` what a suspected outage costs a fail-open request;
    `confirm_s` how long the limiter must leave a health check unanswered for the outage to count as real.
    """

    def __init__(
        self,
        gate: QuotaGate,
        probe: Probe,
        fail_open: frozenset[Tier],
        hang_budget_s: float = 0.1,
        confirm_s: float = 1.0,
        cooldown_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gate = gate
        self._watchdog = Watchdog.with_budget("the limiter", probe, hang_budget_s)
        self._confirmer = Watchdog("the limiter", probe, confirm_s, confirm_s)
        self._confirming: asyncio.Task[bool] | None = None
        self._fail_open = fail_open
        self._cooldown_s = cooldown_s
        self.breaker = CircuitBreaker(cooldown_s, failure_threshold=1, clock=clock, on_change=self._changed)
        # Requests decided by the policy, by outcome ("admitted", "refused"), for tests and logs.
        self.decided: dict[str, int] = {"admitted": 0, "refused": 0}

    def _changed(self, state: BreakerState, reason: str) -> None:
        if state is BreakerState.OPEN:
            log.warning(
                "limiter does not answer (%s); tiers %s admitted unchecked, others refused; retrying in %.1fs",
                reason, sorted(t.value for t in self._fail_open), self._cooldown_s,
            )  # fmt: skip
        elif state is BreakerState.CLOSED:
            log.info("limiter answers again; quotas are checked")

    def _outage(self, principal: Principal) -> Reservation:
        if principal.tier in self._fail_open:
            self.decided["admitted"] += 1
            return Reservation(UNCHECKED, 0)
        self.decided["refused"] += 1
        raise Unavailable(
            f"quotas cannot be checked right now and the {principal.tier.value} tier is not served without them; "
            "retry shortly"
        )

    def _confirmation(self) -> asyncio.Task[bool]:
        """One health check at a time with the long deadline; True (and the breaker open) if it went unanswered."""
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.ensure_future(self._confirm())
        return self._confirming

    async def _confirm(self) -> bool:
        if await self._confirmer.alive():
            return False
        self.breaker.record_failure(f"no answer for {self._confirmer.probe_s:.1f}s")
        return True

    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        if not self.breaker.allow():
            return self._outage(principal)
        call = asyncio.ensure_future(self._gate.reserve(principal, request_id, prompt_tokens, max_tokens))
        try:
            try:
                # On a verdict only the shield is cancelled: the call goes on until decided below.
                reservation = await self._watchdog.call(asyncio.shield(call))
            except DependencyHung:
                self._confirmation()  # runs on its own; later requests share it
                if principal.tier in self._fail_open:
                    call.cancel()  # the gate releases whatever the limiter may still admit for it
                    return self._outage(principal)
                reservation = await call
        except (Unavailable, DeadlineExceeded):
            # The limiter's own answer (its store is down and the tier fails closed; it was too slow), or no
            # connection at all: only a limiter confirmed silent (now, or by another request meanwhile) is overruled.
            if self.breaker.state is BreakerState.OPEN or await asyncio.shield(self._confirmation()):
                return self._outage(principal)
            raise
        except MeshError:
            self.breaker.record_success()  # an answer (a refusal, a bad request): the limiter is there
            raise
        except asyncio.CancelledError:
            call.cancel()  # our caller left: the gate releases what the limiter admits for it
            raise
        self.breaker.record_success()
        return reservation

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        if reservation.id != UNCHECKED:
            await self._gate.settle(reservation, used_tokens)
