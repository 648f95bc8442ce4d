"""The gateway's memory of quota refusals, so a refused key costs nothing expensive on its next requests.

Tokenizing a prompt (the router's Prepare) comes before the limiter's Reserve, because Reserve needs the prompt's
size. Without this memory, a key that is over its quota could still make the router tokenize up to the longest
allowed prompt on every request it sends. A refusal is remembered per key for a short time (never longer than
its Retry-After), and a request it certainly covers is refused here, before Prepare:

- a request-rate refusal (requests per hour, burst per minute) covers every request of the key;
- a token-budget refusal of a request that needed N tokens covers any request that needs at least N: one whose
  max_tokens + 1 (its smallest possible prompt) is already N or more;
- a concurrency refusal is not remembered (a slot frees whenever one of the key's streams ends).

The memory is short because capacity can come back before Retry-After (a settled request refunds unused tokens,
a released reservation its request). No I/O here; the clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from llmesh.errors import ResourceExhausted

RATE_LIMITS = frozenset({"requests_per_hour", "burst_per_minute"})
TOKEN_LIMIT = "tokens_per_hour"


@dataclass(frozen=True)
class _Refusal:
    until: float
    # The smallest need (tokens) this refusal covers; 0 covers every request.
    min_need: int
    error: ResourceExhausted


class RefusalMemory:
    def __init__(
        self, memory_s: float = 1.0, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._memory_s = memory_s
        self._max_keys = max_keys
        self._clock = clock
        self._refusals: OrderedDict[str, _Refusal] = OrderedDict()

    def remember(self, key_id: str, error: ResourceExhausted, need: int) -> None:
        """Note the limiter's refusal of a request of `key_id` that needed `need` tokens."""
        if self._memory_s <= 0 or error.limit not in RATE_LIMITS | {TOKEN_LIMIT}:
            return
        hold = self._memory_s if error.retry_after_s is None else min(self._memory_s, float(error.retry_after_s))
        min_need = need if error.limit == TOKEN_LIMIT else 0
        self._refusals[key_id] = _Refusal(self._clock() + hold, min_need, error)
        self._refusals.move_to_end(key_id)
        while len(self._refusals) > self._max_keys:
            self._refusals.popitem(last=False)

    def check(self, key_id: str, max_tokens: int) -> None:
        """Raise the remembered refusal if it certainly covers a request with this max_tokens (its prompt is at
        least one token)."""
        refusal = self._refusals.get(key_id)
        if refusal is None:
            return
        now = self._clock()
        if now >= refusal.until:
            del self._refusals[key_id]
            return
        if max_tokens + 1 >= refusal.min_need:
            raise refusal.error
