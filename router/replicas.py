"""Triton replicas behind one router: least-outstanding choice, ejection on failure, re-admission on recovery.

Plain logic with the replica transport behind a Protocol; the probe timer and Triton client live elsewhere.
`on_healthy_change(count)` is called whenever the number of healthy replicas changes (the server's health follows it).
"""

from __future__ import annotations

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
        self.states = list(replicas)
        if not self.states:
            raise ValueError("at least one Triton replica is needed")
        self._eject_after = eject_after_failures
        self._on_healthy_change = on_healthy_change
        self._turn = 0

    def pick(self, tier: Tier, variant: str, exclude: set[str]) -> ReplicaState | None:
        """The replica with the fewest requests outstanding that serves `variant` for this tier, or None."""
        candidates = [s for s in self.states if variant not in s.down and s.name not in exclude]
        dedicated = [s for s in candidates if s.dedicated]
        shared = [s for s in candidates if not s.dedicated]
        # Enterprise prefers its dedicated replicas and may spill onto shared ones; other tiers never use dedicated.
        candidates = (dedicated or shared) if tier is Tier.ENTERPRISE else shared
        if not candidates:
            return None
        self._turn += 1
        # Ties rotate, so idle replicas share the work instead of the first one taking all of it.
        return min(candidates, key=lambda s: (s.outstanding, (self.states.index(s) - self._turn) % len(self.states)))

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
        for state in self.states:
            for variant in variants:
                if await state.replica.ready(variant):
                    if variant in state.down:
                        healthy = self.healthy_count()
                        state.down.discard(variant)
                        log.info("re-admitted %s on replica %s", variant, state.name)
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
