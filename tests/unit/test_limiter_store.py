"""Quota store semantics with an explicit clock, against the in-process store.

The same behaviours run against real Redis and a real Redis Cluster in tests/integration/test_limiter_redis.py, so
the Lua scripts and `MemoryQuotaStore` are held to one definition.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from limiter_service.store import (
    NEVER,
    REFUSED_BURST,
    REFUSED_CONCURRENCY,
    REFUSED_NONE,
    REFUSED_RELEASED,
    REFUSED_REQUESTS,
    REFUSED_TOKENS,
    UNLIMITED,
    Check,
    MemoryQuotaStore,
    QuotaStore,
)

HOUR, MINUTE = 3_600_000, 60_000
T0 = 1_700_000_000_000


def hourly(requests: int = UNLIMITED, budget: int = UNLIMITED, burst: int = UNLIMITED, **kw: int) -> Check:
    return Check(window_ms=HOUR, request_limit=requests, token_limit=budget, burst_limit=burst, **kw)


def subject() -> str:
    return f"key:test-{uuid.uuid4().hex[:12]}"


async def behave_request_window_is_exact(store: QuotaStore) -> None:
    s, c = subject(), hourly(requests=3)
    for i in range(3):
        assert (await store.check(s, f"m{i}", T0 + i * 1000, c)).admitted
    refused = await store.check(s, "m3", T0 + 10_000, c)
    assert not refused.admitted and refused.refused == REFUSED_REQUESTS
    # The oldest use (at T0) leaves the window at T0 + 1 h: that is exactly when a retry is admitted.
    assert refused.retry_after_ms == T0 + HOUR - (T0 + 10_000)
    assert refused.requests == 3 and refused.oldest_ms == T0
    assert not (await store.check(s, "m3", T0 + HOUR - 1, c)).admitted
    again = await store.check(s, "m3", T0 + HOUR, c)
    assert again.admitted and again.requests == 3


async def behave_no_double_burst_at_window_edge(store: QuotaStore) -> None:
    # A fixed window would allow 4 at 0:59 and 4 more at 1:00. A sliding one allows 4 in any 60 minutes.
    s, c = subject(), hourly(requests=4)
    edge = T0 + HOUR - 1000
    for i in range(4):
        assert (await store.check(s, f"a{i}", edge, c)).admitted
    for t in (T0 + HOUR, T0 + HOUR + 30 * MINUTE, edge + HOUR - 1):
        assert not (await store.check(s, "b", t, c)).admitted
    assert (await store.check(s, "b", edge + HOUR, c)).admitted


async def behave_burst_per_minute(store: QuotaStore) -> None:
    s, c = subject(), hourly(requests=100, burst=2)
    assert (await store.check(s, "a", T0, c)).admitted
    assert (await store.check(s, "b", T0 + 20_000, c)).admitted
    refused = await store.check(s, "c", T0 + 30_000, c)
    assert refused.refused == REFUSED_BURST and refused.retry_after_ms == MINUTE - 30_000
    assert refused.burst == 2 and refused.oldest_burst_ms == T0
    assert (await store.check(s, "c", T0 + MINUTE, c)).admitted


async def behave_refusal_names_the_limit_that_frees_last(store: QuotaStore) -> None:
    s, c = subject(), hourly(requests=2, burst=2)
    for m in ("a", "b"):
        await store.check(s, m, T0, c)
    refused = await store.check(s, "c", T0 + 1000, c)
    assert refused.refused == REFUSED_REQUESTS and refused.retry_after_ms == HOUR - 1000


async def behave_tokens_reserve_then_settle_refunds(store: QuotaStore) -> None:
    s, c = subject(), hourly(budget=100, concurrency_limit=10, tokens=60, lease_ms=MINUTE)
    first = await store.check(s, "a", T0, c)
    assert first.admitted and first.tokens == 60 and first.active == 1
    refused = await store.check(s, "b", T0 + 1000, c)
    assert refused.refused == REFUSED_TOKENS and refused.retry_after_ms == HOUR - 1000
    assert await store.settle(s, "a", 10, T0 + 2000)
    admitted = await store.check(s, "b", T0 + 3000, c)
    assert admitted.admitted and admitted.tokens == 70 and admitted.active == 1


async def behave_settle_is_idempotent(store: QuotaStore) -> None:
    s, c = subject(), hourly(budget=1000, tokens=100, lease_ms=MINUTE)
    await store.check(s, "a", T0, c)
    assert await store.settle(s, "a", 30, T0 + 1)
    assert not await store.settle(s, "a", 0, T0 + 2)
    assert not await store.settle(s, "never-admitted", 0, T0 + 2)
    state = await store.check(s, "probe", T0 + 3, hourly(budget=1000), dry_run=True)
    assert state.tokens == 30 and state.active == 0


async def behave_expired_lease_frees_slot_keeps_charge(store: QuotaStore) -> None:
    # The gateway died mid-request: it never settles. The slot frees when the lease ends; the tokens stay charged.
    s = subject()
    c = hourly(budget=1000, concurrency_limit=1, tokens=100, lease_ms=5000)
    assert (await store.check(s, "a", T0, c)).admitted
    busy = await store.check(s, "b", T0 + 1000, c)
    assert busy.refused == REFUSED_CONCURRENCY and 0 < busy.retry_after_ms <= 1000
    later = await store.check(s, "b", T0 + 5000, c)
    assert later.admitted and later.tokens == 200 and later.active == 1
    assert not await store.settle(s, "a", 0, T0 + 6000), "a settle after the lease must not refund"
    assert await store.settle(s, "b", 40, T0 + 6000)
    state = await store.check(s, "probe", T0 + 7000, hourly(budget=1000), dry_run=True)
    assert state.tokens == 140 and state.active == 0


async def behave_settle_frees_concurrency(store: QuotaStore) -> None:
    s, c = subject(), hourly(concurrency_limit=2, tokens=1, lease_ms=HOUR)
    assert (await store.check(s, "a", T0, c)).admitted
    assert (await store.check(s, "b", T0, c)).admitted
    assert not (await store.check(s, "c", T0, c)).admitted
    await store.settle(s, "a", 1, T0 + 1)
    assert (await store.check(s, "c", T0 + 2, c)).admitted


async def behave_same_member_is_admitted_once(store: QuotaStore) -> None:
    s, c = subject(), hourly(requests=5, budget=1000, tokens=10, lease_ms=MINUTE)
    for _ in range(3):
        state = await store.check(s, "retry", T0, c)
        assert state.admitted
    assert state.requests == 1 and state.tokens == 10 and state.active == 1


async def behave_retry_reports_what_remained_at_admission(store: QuotaStore) -> None:
    # A gateway retries a Reserve whose reply it lost; the reply it then gets must say what was left when the use
    # was admitted, not what is left now, or two admitted requests would both be told "0 remaining".
    s, c = subject(), hourly(requests=5, burst=5, short_window_ms=MINUTE)
    for i in range(4):
        assert (await store.check(s, f"m{i}", T0 + i, c)).requests == i + 1
    again = await store.check(s, "m1", T0 + 10, c)
    assert again.admitted and again.requests == 2 and again.burst == 2
    # A caller whose clock reading is behind the newest logged use still lands after it in admission order.
    late = await store.check(s, "late", T0 + 1, c)
    assert late.admitted and late.requests == 5
    assert (await store.check(s, "late", T0 + 20, c)).requests == 5
    assert (await store.check(s, "m3", T0 + 20, c)).requests == 4


async def behave_never_fits(store: QuotaStore) -> None:
    s = subject()
    too_big = await store.check(s, "a", T0, hourly(budget=100, tokens=101))
    assert too_big.refused == REFUSED_TOKENS and too_big.retry_after_ms == NEVER
    blocked = await store.check(s, "a", T0, hourly(requests=0))
    assert blocked.refused == REFUSED_REQUESTS and blocked.retry_after_ms == NEVER
    # "never" wins over a limit that would free later.
    await store.check(s, "x", T0, hourly(requests=1))
    both = await store.check(s, "b", T0, hourly(requests=1, budget=5, tokens=6))
    assert both.refused == REFUSED_TOKENS and both.retry_after_ms == NEVER


async def behave_dry_run_changes_nothing(store: QuotaStore) -> None:
    s, c = subject(), hourly(requests=2, budget=100, tokens=10, lease_ms=MINUTE)
    state = await store.check(s, "a", T0, c, dry_run=True)
    assert state.admitted and state.requests == 0 and state.tokens == 0 and state.oldest_ms == -1
    await store.check(s, "a", T0, c)
    state = await store.check(s, "b", T0, c, dry_run=True)
    assert state.requests == 1 and state.tokens == 10 and state.active == 1


async def behave_tokens_leave_the_window(store: QuotaStore) -> None:
    s, c = subject(), hourly(budget=100, tokens=80)
    await store.check(s, "a", T0, c)
    await store.check(s, "b", T0 + 10 * MINUTE, hourly(budget=100, tokens=20))
    refused = await store.check(s, "c", T0 + 20 * MINUTE, c)
    # 80 more need the first 80 gone: that is the use at T0.
    assert refused.refused == REFUSED_TOKENS and refused.retry_after_ms == HOUR - 20 * MINUTE
    state = await store.check(s, "c", T0 + HOUR, c)
    assert state.admitted and state.tokens == 100 and state.requests == 2


async def behave_hits_count_each(store: QuotaStore) -> None:
    s, c = subject(), Check(window_ms=MINUTE, request_limit=5, hits=3)
    assert (await store.check(s, "a", T0, c)).requests == 3
    refused = await store.check(s, "b", T0 + 1, c)
    assert refused.refused == REFUSED_REQUESTS and refused.retry_after_ms == MINUTE - 1


async def behave_reset_forgets(store: QuotaStore) -> None:
    s, c = subject(), hourly(requests=1, budget=10, tokens=5, lease_ms=MINUTE)
    await store.check(s, "a", T0, c)
    assert not (await store.check(s, "b", T0, c)).admitted
    await store.reset(s)
    state = await store.check(s, "b", T0, c)
    assert state.admitted and state.requests == 1 and state.tokens == 5 and state.active == 1


async def behave_unlimited_is_unlimited(store: QuotaStore) -> None:
    s, c = subject(), hourly(tokens=5, lease_ms=MINUTE)
    for i in range(50):
        state = await store.check(s, f"m{i}", T0, c)
        assert state.admitted and state.refused == REFUSED_NONE


async def behave_release_undoes_an_admitted_use(store: QuotaStore) -> None:
    s, c = subject(), hourly(requests=5, budget=100, tokens=30, lease_ms=MINUTE, concurrency_limit=1)
    await store.check(s, "kept", T0, hourly(requests=5, budget=100, tokens=10))
    assert (await store.check(s, "a", T0 + 1, c)).admitted
    assert await store.release(s, "a", T0 + 2, MINUTE)
    state = await store.check(s, "probe", T0 + 3, c, dry_run=True)
    assert (state.requests, state.tokens, state.active) == (1, 10, 0), "not counted, refunded, slot free"
    assert not await store.release(s, "a", T0 + 4, MINUTE), "idempotent"
    assert not await store.settle(s, "a", 30, T0 + 5), "nothing left to settle"
    # The same member again (a retry that was queued somewhere) is refused, not admitted anew.
    again = await store.check(s, "a", T0 + 6, c)
    assert not again.admitted and again.refused == REFUSED_RELEASED and again.retry_after_ms == NEVER
    assert (again.requests, again.tokens, again.active) == (1, 10, 0)


async def behave_release_before_the_reserve_arrives_refuses_it(store: QuotaStore) -> None:
    s, c = subject(), hourly(budget=100, tokens=30, lease_ms=MINUTE)
    assert not await store.release(s, "late", T0 + 1000, MINUTE)
    late = await store.check(s, "late", T0, c)  # stamped before the release: it waited in a paused server
    assert not late.admitted and late.refused == REFUSED_RELEASED
    assert (late.requests, late.tokens, late.active) == (0, 0, 0)
    assert (await store.check(s, "other", T0 + 1001, c)).admitted
    # The tombstone lives one lease (keep_ms); status reads (dry runs) never see it.
    assert (await store.check(s, "late", T0 + 1002, c, dry_run=True)).admitted


async def behave_a_reserve_older_than_its_lease_is_stale(store: QuotaStore) -> None:
    """A reserve that arrives after uses stamped a whole lease later is refused: its caller gave up long ago."""
    s, c = subject(), hourly(budget=100, tokens=10, lease_ms=MINUTE)
    assert (await store.check(s, "recent", T0 + MINUTE, c)).admitted
    stale = await store.check(s, "old", T0, c)
    assert not stale.admitted and stale.refused == REFUSED_RELEASED
    assert (await store.check(s, "old-but-fine", T0 + 1, c)).admitted


BEHAVIOURS: list[Callable[[QuotaStore], Awaitable[None]]] = [
    behave_request_window_is_exact,
    behave_no_double_burst_at_window_edge,
    behave_burst_per_minute,
    behave_refusal_names_the_limit_that_frees_last,
    behave_tokens_reserve_then_settle_refunds,
    behave_settle_is_idempotent,
    behave_expired_lease_frees_slot_keeps_charge,
    behave_settle_frees_concurrency,
    behave_same_member_is_admitted_once,
    behave_retry_reports_what_remained_at_admission,
    behave_never_fits,
    behave_dry_run_changes_nothing,
    behave_tokens_leave_the_window,
    behave_hits_count_each,
    behave_reset_forgets,
    behave_unlimited_is_unlimited,
    behave_release_undoes_an_admitted_use,
    behave_release_before_the_reserve_arrives_refuses_it,
    behave_a_reserve_older_than_its_lease_is_stale,
]


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=lambda b: b.__name__.removeprefix("behave_"))
def test_memory_store(behaviour: Callable[[QuotaStore], Awaitable[None]]) -> None:
    asyncio.run(behaviour(MemoryQuotaStore()))


def test_sweep_forgets_idle_subjects() -> None:
    store = MemoryQuotaStore()
    asyncio.run(store.check("key:a", "m", T0, hourly(requests=5)))
    store.sweep(T0 + HOUR - 1)
    assert len(store) == 1
    store.sweep(T0 + HOUR)
    assert len(store) == 0
