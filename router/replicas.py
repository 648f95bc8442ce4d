"""Triton replicas behind one router: least-outstanding choice, ejection on failure, re-admission on recovery.

Plain logic with the replica transport behind a Protocol; the probe timer and Triton client live elsewhere.
`on_healthy_change(count)` is called whenever the number of healthy replicas changes (the server's health follows it).
Replicas come and go at run time (router/discovery.py, DNS): `add` puts one in (out of rotation until a probe finds
it ready), `remove` takes one out (requests already on it finish there).

Fallback replicas (another region's) take work only when no local replica of the variant can: a region serves its
own requests, and its callers reach the other region only while its own pool is down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmesh.types import SamplingParams, Tier
from router.tokens import TokenChunk

log = logging.getLogger(__name__)


class Replica(Protocol):
    @property
    def name(self) -> str: ...

    def stream(
        self,
        variant: str,
        request_id: str,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        tier: Tier,
        grammar: str = "",
    ) -> AsyncIterator[TokenChunk]:
        """Tokens of one generation; `grammar` (engine/grammar.py's text, "" = none) constrains decoding."""
        ...

    async def ready(self, variant: str) -> bool:
        """True when the replica serves `variant`; False (never an exception) when it cannot be reached."""
        ...


@dataclass
class ReplicaState:
    replica: Replica
    # Dedicated replicas serve only the enterprise tier (the seed's dedicated capacity).
    dedicated: bool = False
    # Another region's replica: picked only when no local one can serve the variant.
    fallback: bool = False
    outstanding: int = 0
    # Variants ejected on this replica (a dead process takes all of them; a failed model only its own).
    down: set[str] = field(default_factory=set)
    consecutive_failures: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.replica.name

    @property
    def healthy(self) -> bool:
        return not self.down


class ReplicaPool:
    def __init__(
        self,
        replicas: Iterable[ReplicaState],
        eject_after_failures: int = 1,
        on_healthy_change: Callable[[int], None] | None = None,
    ) -> None:
        # May be empty for a while: replicas found by DNS arrive after start-up (health says NOT_SERVING till then).
        self.states = list(replicas)
        self._eject_after = eject_after_failures
        self._on_healthy_change = on_healthy_change
        self._turn = 0

    def pick(self, tier: Tier, variant: str, exclude: set[str]) -> ReplicaState | None:
        """The replica with the fewest requests outstanding that serves `variant` for this tier, or None; a fallback
        replica only when no local one can."""
        available = [s for s in self.states if variant not in s.down and s.name not in exclude]
        for group in ([s for s in available if not s.fallback], [s for s in available if s.fallback]):
            choice = self._least_outstanding(tier, group)
            if choice is not None:
                return choice
        return None

    def _least_outstanding(self, tier: Tier, candidates: list[ReplicaState]) -> ReplicaState | None:
        dedicated = [s for s in candidates if s.dedicated]
        shared = [s for s in candidates if not s.dedicated]
        # Enterprise prefers its dedicated replicas and may spill onto shared ones; other tiers never use dedicated.
        candidates = (dedicated or shared) if tier is Tier.ENTERPRISE else shared
        if not candidates:
            return None
        self._turn += 1
        # Ties rotate, so idle replicas share the work instead of the first one taking all of it.
        return min(candidates, key=lambda s: (s.outstanding, (self.states.index(s) - self._turn) % len(self.states)))

    def add(self, state: ReplicaState, variants: Sequence[str]) -> None:
        """A new replica, out of rotation for every variant until a probe finds it ready (`probe_one`)."""
        if any(s.name == state.name for s in self.states):
            raise ValueError(f"replica {state.name} is already in the pool")
        state.down.update(variants)
        self.states.append(state)
        log.info("replica %s joined%s", state.name, " (fallback)" if state.fallback else "")

    def remove(self, name: str) -> ReplicaState | None:
        """Takes the replica out of rotation for good; requests already on it go on (they hold its state)."""
        for state in self.states:
            if state.name == name:
                healthy = self.healthy_count()
                self.states.remove(state)
                log.info("replica %s left (%d requests still on it)", name, state.outstanding)
                self._healthy_changed(healthy)
                return state
        return None

    def record_failure(self, state: ReplicaState, variant: str, reason: str) -> None:
        failures = state.consecutive_failures.get(variant, 0) + 1
        state.consecutive_failures[variant] = failures
        if variant not in state.down and failures >= self._eject_after:
            healthy = self.healthy_count()
            state.down.add(variant)
            log.warning("ejected %s on replica %s: %s", variant, state.name, reason)
            self._healthy_changed(healthy)

    def record_success(self, state: ReplicaState, variant: str) -> None:
        state.consecutive_failures[variant] = 0

    async def probe(self, variants: Sequence[str]) -> None:
        """Active health check of every (replica, variant): eject what is not ready, re-admit what recovered."""
        # All at once: a replica behind a cut link takes its probe's whole timeout, which must not delay the
        # verdict on the others (nor a recovered replica's re-admission).
        await asyncio.gather(*(self.probe_one(state, variants) for state in list(self.states)))

    async def probe_one(self, state: ReplicaState, variants: Sequence[str]) -> None:
        answers = await asyncio.gather(*(state.replica.ready(variant) for variant in variants))
        for variant, ready in zip(variants, answers, strict=True):
            if ready:
                if variant in state.down and state in self.states:
                    healthy = self.healthy_count()
                    state.down.discard(variant)
                    log.info("admitted %s on replica %s", variant, state.name)
                    self._healthy_changed(healthy)
                state.consecutive_failures[variant] = 0
            else:
                self.record_failure(state, variant, "health check: not ready or unreachable")

    def healthy_count(self) -> int:
        """Replicas with no variant ejected."""
        return sum(1 for s in self.states if s.healthy)

    def _healthy_changed(self, before: int) -> None:
        after = self.healthy_count()
        if after != before and self._on_healthy_change is not None:
            self._on_healthy_change(after)
