"""Quota stores: where usage lives. A small Protocol, an in-process implementation, and the shared result types.

The Redis implementation (limiter_service/redis_store.py, one Lua script per operation) is the real one; the
in-process `MemoryQuotaStore` has the same semantics and serves two purposes: unit tests with an injected clock,
and the local per-process limits a tier falls back to when it fails open during a Redis outage. The same behaviour
tests run against both (tests/unit/test_limiter_store.py, tests/integration/test_limiter_redis.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

UNLIMITED = -1

# Values of `WindowState.refused`, shared with the Lua script.
REFUSED_NONE, REFUSED_REQUESTS, REFUSED_BURST, REFUSED_TOKENS, REFUSED_CONCURRENCY = 0, 1, 2, 3, 4
# The use was released before it was admitted (its caller gave up on the answer), or arrived stale: its stamp plus
# its lease is not after a use logged since. Never admitted, whatever the limits say.
REFUSED_RELEASED = 5
# A use stamped at or before the newest logged one is logged this much after it (reserve.lua does the same).
TIE_MS = 0.001
NEVER = -1  # retry_after_ms when the use can never fit (a limit of 0, or more tokens than the whole budget)


class StoreUnavailable(Exception):
    """The store could not answer (connection refused, timeout, cluster down)."""


class Check(NamedTuple):
    """What one use asks for, and the limits it must fit. Limits below 0 are unlimited.

    (Named tuples, here and below: a check is built and read once per request, on the hot path.)"""

    window_ms: int  # the long window: requests and tokens
    request_limit: int
    token_limit: int = UNLIMITED
    short_window_ms: int = 60_000  # the burst window
    burst_limit: int = UNLIMITED
    concurrency_limit: int = UNLIMITED
    hits: int = 1
    tokens: int = 0
    # How long an unsettled use holds a concurrency slot; 0 = uses that are never settled (edge checks).
    lease_ms: int = 0


class WindowState(NamedTuple):
    """A subject's usage after a check (after admitting the use, if it was admitted)."""

    admitted: bool
    refused: int
    retry_after_ms: int
    requests: int  # uses in the long window
    burst: int  # uses in the short window
    tokens: int  # tokens charged in the long window (reserved for unsettled uses)
    active: int  # admitted, not settled, lease not expired
    oldest_ms: int  # admission time of the oldest use in the long window; -1 if none
    oldest_burst_ms: int  # same for the short window


class QuotaStore(Protocol):
    async def check(self, subject: str, member: str, now_ms: int, check: Check, dry_run: bool = False) -> WindowState:
        """Atomically admit `member` (unique per use) if every limit allows it; re-checking an admitted member
        admits it once. `dry_run` reports without changing anything."""
        ...

    async def settle(self, subject: str, member: str, used_tokens: int, now_ms: int) -> bool:
        """Charge `used_tokens` instead of the reservation and free the slot; False if nothing was open."""
        ...

    async def release(self, subject: str, member: str, now_ms: int, keep_ms: int) -> bool:
        """Undo a use whose caller never got the check's answer (timeout, cancellation, shutdown): if admitted, it
        is forgotten (not counted, tokens refunded, slot freed); if its check has not arrived yet, a check of
        `member` within `keep_ms` is refused. True when an admitted use was given back. Idempotent."""
        ...

    async def reset(self, subject: str) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot answer."""
        ...


@dataclass
class _Subject:
    log: list[tuple[float, str]] = field(default_factory=list)  # (admitted ms, member), in admission order
    tokens: dict[str, int] = field(default_factory=dict)
    total_tokens: int = 0
    active: dict[str, int] = field(default_factory=dict)  # member -> lease deadline ms
    members: set[str] = field(default_factory=set)  # of `log`, for the retry check
    released: dict[str, int] = field(default_factory=dict)  # member -> refused until (ms)
    expires_ms: int = 0


class MemoryQuotaStore:
    """Per-process store with the semantics of reserve.lua / settle.lua. Not shared between processes."""

    def __init__(self) -> None:
        self._subjects: dict[str, _Subject] = {}

    def __len__(self) -> int:
        return len(self._subjects)

    async def ping(self) -> None:
        return None

    async def reset(self, subject: str) -> None:
        self._subjects.pop(subject, None)

    def sweep(self, now_ms: int) -> None:
        """Forget subjects idle past all their windows (what Redis does with PEXPIRE)."""
        for name in [n for n, s in self._subjects.items() if s.expires_ms <= now_ms]:
            del self._subjects[name]

    def _expire(self, s: _Subject, now_ms: int, window_ms: int) -> None:
        cut = bisect.bisect_right(s.log, (now_ms - window_ms, "\U0010ffff"))
        for _, member in s.log[:cut]:
            s.total_tokens -= s.tokens.pop(member, 0)
            s.members.discard(member)
        del s.log[:cut]
        for member in [m for m, deadline in s.active.items() if deadline <= now_ms]:
            del s.active[member]
        for member in [m for m, until in s.released.items() if until <= now_ms]:
            del s.released[member]

    def _state(self, s: _Subject, now_ms: int, c: Check, admitted: bool, refused: int, retry: int) -> WindowState:
        short_from = bisect.bisect_right(s.log, (now_ms - c.short_window_ms, "\U0010ffff"))
        return WindowState(
            admitted=admitted,
            refused=refused,
            retry_after_ms=retry,
            requests=len(s.log),
            burst=len(s.log) - short_from,
            tokens=s.total_tokens,
            active=len(s.active),
            oldest_ms=int(s.log[0][0]) if s.log else -1,
            oldest_burst_ms=int(s.log[short_from][0]) if short_from < len(s.log) else -1,
        )

    async def check(self, subject: str, member: str, now_ms: int, check: Check, dry_run: bool = False) -> WindowState:
        c = check
        s = self._subjects.get(subject) or _Subject()
        self._expire(s, now_ms, c.window_ms)
        if not dry_run and member in s.released:
            return self._state(s, now_ms, c, False, REFUSED_RELEASED, NEVER)
        if member in s.members:
            # A retry: the counts as they were just after it (the log is in admission order).
            state = self._state(s, now_ms, c, True, REFUSED_NONE, 0)
            index = next(i for i, (_, m) in enumerate(s.log) if m == member)
            short_from = bisect.bisect_right(s.log, (now_ms - c.short_window_ms, "\U0010ffff"))
            return state._replace(requests=index + c.hits, burst=max(0, index + c.hits - short_from))

        refused, retry = REFUSED_NONE, 0

        def refuse(code: int, ms: float) -> None:
            nonlocal refused, retry
            if retry >= 0 and (refused == REFUSED_NONE or ms < 0 or ms > retry):
                refused, retry = code, int(ms)

        if c.request_limit >= 0:
            if c.hits > c.request_limit:
                refuse(REFUSED_REQUESTS, NEVER)
            elif len(s.log) + c.hits > c.request_limit:
                at = s.log[len(s.log) + c.hits - c.request_limit - 1][0]
                refuse(REFUSED_REQUESTS, min(c.window_ms, at + c.window_ms - now_ms))
        if c.burst_limit >= 0:
            short_from = bisect.bisect_right(s.log, (now_ms - c.short_window_ms, "\U0010ffff"))
            burst = len(s.log) - short_from
            if c.hits > c.burst_limit:
                refuse(REFUSED_BURST, NEVER)
            elif burst + c.hits > c.burst_limit:
                at = s.log[short_from + burst + c.hits - c.burst_limit - 1][0]
                refuse(REFUSED_BURST, min(c.short_window_ms, at + c.short_window_ms - now_ms))
        if c.token_limit >= 0 and c.tokens > 0:
            if c.tokens > c.token_limit:
                refuse(REFUSED_TOKENS, NEVER)
            elif s.total_tokens + c.tokens > c.token_limit:
                excess = s.total_tokens + c.tokens - c.token_limit
                freed, at = 0, now_ms
                for at, m in s.log:  # noqa: B007 - `at` is used after the loop
                    freed += s.tokens.get(m, 0)
                    if freed >= excess:
                        break
                refuse(REFUSED_TOKENS, min(c.window_ms, at + c.window_ms - now_ms))
        if c.concurrency_limit >= 0 and c.lease_ms > 0:
            if c.concurrency_limit == 0:
                refuse(REFUSED_CONCURRENCY, NEVER)
            elif len(s.active) >= c.concurrency_limit:
                refuse(REFUSED_CONCURRENCY, min(1000, min(s.active.values()) - now_ms))

        if refused != REFUSED_NONE:
            return self._state(s, now_ms, c, False, refused, retry)
        if dry_run:
            return self._state(s, now_ms, c, True, REFUSED_NONE, 0)
        if c.lease_ms > 0 and s.log and now_ms + c.lease_ms <= s.log[-1][0]:
            return self._state(s, now_ms, c, False, REFUSED_RELEASED, NEVER)
        # Times only grow, so the log's order is admission order even when `now_ms` is behind the newest use.
        at_ms: float = now_ms if not s.log or s.log[-1][0] < now_ms else s.log[-1][0] + TIE_MS
        for i in range(c.hits):
            name = member if i == 0 else f"{member}#{i + 1}"
            s.log.append((at_ms, name))
            s.members.add(name)
        if c.tokens > 0:
            s.tokens[member] = c.tokens
            s.total_tokens += c.tokens
        if c.lease_ms > 0:
            s.active[member] = now_ms + c.lease_ms
        s.expires_ms = now_ms + max(c.window_ms, c.short_window_ms) + c.lease_ms
        self._subjects[subject] = s
        return self._state(s, now_ms, c, True, REFUSED_NONE, 0)

    async def settle(self, subject: str, member: str, used_tokens: int, now_ms: int) -> bool:
        s = self._subjects.get(subject)
        if s is None:
            return False
        deadline = s.active.pop(member, None)
        if deadline is None or deadline <= now_ms:
            return False
        if member in s.tokens:
            s.total_tokens += used_tokens - s.tokens[member]
            s.tokens[member] = used_tokens
        return True

    async def release(self, subject: str, member: str, now_ms: int, keep_ms: int) -> bool:
        s = self._subjects.get(subject)
        if s is None:
            s = self._subjects[subject] = _Subject()
        s.released[member] = now_ms + keep_ms  # pruned by _expire once past
        s.expires_ms = max(s.expires_ms, now_ms + keep_ms)
        released = s.active.pop(member, None) is not None
        if member in s.members:
            released = True
            s.members.discard(member)
            s.log = [(at, m) for at, m in s.log if m != member]
            s.total_tokens -= s.tokens.pop(member, 0)
        return released
