"""The limiter's decisions: policy -> one atomic store check -> answer. No gRPC here.

Two stores: the shared one (Redis) and this process's own (`MemoryQuotaStore`). Every call to the shared store is
bounded by a short timeout and goes through a circuit breaker (llmesh/breaker.py); while it is down, each tier does
what its `on_store_failure` says: decide with the local store ("open") or refuse with Unavailable ("closed").
Requests never probe a down store (a probe could cost a timeout): `watch_store` does, on a timer.

Unknown outcomes: a store call that timed out may still run in Redis later (a paused or stopped server executes
what it had queued). A reservation whose caller never got the answer is therefore *released* (release.lua): undone
if it was admitted, refused if it arrives later (a tombstone that lives one lease), refused as stale if it arrives
after a lease would have ended. The limiter releases its own timed-out reserve calls (queued until Redis answers);
the gateway releases, by the nonce it chose, Reserve calls whose answer it did not get (`release`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from limiter_service.loop_lag import LoopLagMonitor
from limiter_service.metrics import LimiterMetrics
from limiter_service.policy import FailureMode, Limits, Policy, PolicySource
from limiter_service.store import (
    NEVER,
    REFUSED_BURST,
    REFUSED_CONCURRENCY,
    REFUSED_RELEASED,
    REFUSED_REQUESTS,
    REFUSED_TOKENS,
    Check,
    MemoryQuotaStore,
    QuotaStore,
    StoreUnavailable,
    WindowState,
)
from llmesh.apikeys import hash_key, key_id_for, parse_bearer
from llmesh.breaker import BreakerState, CircuitBreaker
from llmesh.errors import InvalidRequest, PermissionDenied, Unauthenticated, Unavailable
from llmesh.types import Tier

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
MINUTE_MS = 60_000
REQUESTS, BURST, TOKENS, CONCURRENCY = "requests_per_hour", "burst_per_minute", "tokens_per_hour", "concurrent_streams"
_REFUSED_NAME = {
    REFUSED_REQUESTS: REQUESTS,
    REFUSED_BURST: BURST,
    REFUSED_TOKENS: TOKENS,
    REFUSED_CONCURRENCY: CONCURRENCY,
}
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
REMOTE, LOCAL = "r", "l"
T = TypeVar("T")


class QuotaView(NamedTuple):
    name: str
    limit: int
    remaining: int
    reset_unix_ms: int  # when `remaining` next grows; 0 when nothing is counted


class Decision(NamedTuple):
    allowed: bool
    reservation_id: str
    refused_by: str
    retry_after_ms: int
    quotas: tuple[QuotaView, ...]
    message: str
    degraded: bool  # decided by this process's local limits


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    key_id: str
    tier: Tier
    subject: str
    quotas: tuple[QuotaView, ...]
    active: int
    degraded: bool
    on_store_failure: FailureMode


@dataclass(frozen=True, slots=True)
class EdgeStatus:
    """One descriptor's answer. `limit` < 0: the descriptor is not limited."""

    over: bool
    limit: int
    remaining: int
    reset_ms: int  # from now


@dataclass(frozen=True, slots=True)
class EdgeDecision:
    over: bool
    statuses: tuple[EdgeStatus, ...]
    headers: tuple[tuple[str, str], ...]  # for the 429 Envoy sends


def retry_seconds(ms: int) -> int:
    """Whole seconds to wait, rounded up: retrying at that point is admitted (if nothing else changed)."""
    return max(1, math.ceil(ms / 1000))


def _views(limits: Limits, s: WindowState, burst_window_ms: int = MINUTE_MS) -> tuple[QuotaView, ...]:
    oldest_reset = s.oldest_ms + HOUR_MS if s.oldest_ms >= 0 else 0
    out = []
    limit = limits.requests_per_hour
    if limit >= 0:
        out.append(QuotaView(REQUESTS, limit, max(0, limit - s.requests), oldest_reset))
    limit = limits.burst_per_minute
    if limit >= 0:
        reset = s.oldest_burst_ms + burst_window_ms if s.oldest_burst_ms >= 0 else 0
        out.append(QuotaView(BURST, limit, max(0, limit - s.burst), reset))
    limit = limits.tokens_per_hour
    if limit >= 0:
        out.append(QuotaView(TOKENS, limit, max(0, limit - s.tokens), oldest_reset))
    limit = limits.max_concurrent_streams
    if limit >= 0:
        out.append(QuotaView(CONCURRENCY, limit, max(0, limit - s.active), 0))
    return tuple(out)


def _check_for(limits: Limits, tokens: int, lease_ms: int) -> Check:
    return Check(
        HOUR_MS,
        limits.requests_per_hour,
        limits.tokens_per_hour,
        MINUTE_MS,
        limits.burst_per_minute,
        limits.max_concurrent_streams,
        1,
        tokens,
        lease_ms,
    )


def _valid_id(what: str, value: str) -> str:
    if not _ID.match(value):
        raise InvalidRequest(f"{what} must be 1-64 characters of letters, digits, '_', '.', ':' or '-'; got {value!r}")
    return value


_TIERS = {t.value: t for t in Tier}


def _tier(name: str) -> Tier:
    tier = _TIERS.get(name)
    if tier is None:
        raise InvalidRequest(f"unknown tier {name!r} (known: {', '.join(_TIERS)})")
    return tier


# A store call that failed while this process's event loop was stalled (see loop_lag.py) is retried for at most
# this long in all (well inside the gateway's 1 s deadline for a reservation), and such a failure never counts
# against the store: a 200-request burst on 2 cores stalls the loop for several 100 ms timeouts in a row, and
# counting those had opened the breaker and failed free keys closed while Redis was fine.
_STALL_BUDGET_S = 0.5
_STALL_MAX_ATTEMPTS = 8


class Limiter:
    def __init__(
        self,
        policy: PolicySource,
        store: QuotaStore,
        *,
        local: MemoryQuotaStore | None = None,
        metrics: LimiterMetrics | None = None,
        breaker_failures: int = 3,
        open_at_start: bool = False,
        on_store_change: Callable[[bool], None] | None = None,
        store_timeout_s: float | None = 0.1,
        lease_s: float = 600.0,
        clock: Callable[[], float] = time.time,
        max_pending_settlements: int = 100_000,
        loop_monitor: LoopLagMonitor | None = None,
    ) -> None:
        self.policy = policy
        # When given, a store call that failed while this process's loop was stalled is retried (up to
        # _STALL_RETRIES times) and not counted against the store: the delay was ours, not Redis'.
        self._loop_monitor = loop_monitor
        self._store = store
        self._local = local or MemoryQuotaStore()
        self._metrics = metrics
        # Called with True / False when the store comes back / goes down (the server's health follows it).
        self._on_store_change = on_store_change
        self._store_up: bool | None = None  # None until the breaker first reports
        self._breaker_threshold = breaker_failures
        # `breaker_failures` consecutive failures open the circuit. The cooldown is unused: requests check
        # `closed` and never `allow()`, and watch_store probes on its own timer.
        self._breaker = CircuitBreaker(
            cooldown_s=0.0,
            failure_threshold=breaker_failures,
            open_at_start=open_at_start,
            on_change=self._breaker_changed,
        )
        self._timeout_s = store_timeout_s
        self._lease_ms = int(lease_s * 1000)
        self._clock = clock
        self._nonce_prefix = uuid.uuid4().hex[:12]
        self._nonce_counter = itertools.count()
        # Settlements that could not reach the store; replayed when it answers again (with the time they happened,
        # so a lease that had not expired then still refunds).
        self._pending: collections.deque[tuple[str, str, int, int]] = collections.deque(maxlen=max_pending_settlements)
        # Releases that could not reach the store: (subject, member) -> (when, origin). Origin "limiter" (this
        # process's own timed-out reserve) is dropped if the same member is admitted after all (a retry with the
        # same nonce); origin "gateway" (the caller gave up) always lands.
        self._releases: dict[tuple[str, str], tuple[int, str]] = {}
        self._max_pending = max_pending_settlements

    @property
    def degraded(self) -> bool:
        """True while the circuit is open: decisions follow each tier's on_store_failure."""
        return not self._breaker.closed

    @property
    def pending_settlements(self) -> int:
        return len(self._pending)

    @property
    def pending_releases(self) -> int:
        return len(self._releases)

    def _new_nonce(self) -> str:
        # Unique across processes (random prefix) and cheap (a counter): one per admitted request.
        return f"{self._nonce_prefix}{next(self._nonce_counter):x}"

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # --- the shared store, bounded and behind the breaker -------------------------------------------------------

    def _breaker_changed(self, state: BreakerState, reason: str) -> None:
        """The breaker's on_change: the one place that logs, counts and reports the store going down and back."""
        up, was_up = state is BreakerState.CLOSED, self._store_up
        self._store_up = up
        if up:
            log.warning("quota store answers again: circuit closed")
        elif was_up is None:
            log.info("quota store not probed yet: circuit open until it answers")
        else:
            log.error("quota store failed %d times in a row, circuit open: %s", self._breaker_threshold, reason)
        if self._metrics is not None:
            self._metrics.redis_degraded.set(0 if up else 1)
        if self._on_store_change is not None:
            self._on_store_change(up)

    def _store_failed(self, exc: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.redis_errors.inc()
        self._breaker.record_failure(f"{type(exc).__name__}: {exc}")

    async def _remote(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one store call with the timeout; raise StoreUnavailable without calling while the circuit is open."""
        if not self._breaker.closed:
            raise StoreUnavailable(f"circuit open: {self._breaker.last_error}")
        try:
            if self._timeout_s is None:  # the store bounds its own calls (socket timeouts, no retries)
                result = await call()
            else:
                async with asyncio.timeout(self._timeout_s):
                    result = await call()
        except (StoreUnavailable, TimeoutError) as exc:
            self._store_failed(exc)
            raise StoreUnavailable(str(exc) or "timed out") from exc
        self._breaker.record_success()
        return result

    async def probe_store(self) -> bool:
        """Ping the store; on an answer close the circuit and replay pending settlements. True if it answered."""
        try:
            async with asyncio.timeout(max(self._timeout_s or 0.0, 0.5)):
                await self._store.ping()
        except (StoreUnavailable, TimeoutError) as exc:
            self._breaker.record_failure(f"{type(exc).__name__}: {exc}")
            return False
        self._breaker.record_success()
        await self._replay_settlements()
        return True

    async def watch_store(self, interval_s: float) -> None:
        """Background task: while the circuit is open, probe until the store answers; while it is closed, ping too,
        so health shows an outage even when no traffic comes; replay pending settlements; sweep local state."""
        while True:
            if not self._breaker.closed:
                await self.probe_store()
            else:
                with contextlib.suppress(StoreUnavailable):
                    await self._remote(self._store.ping)
                if self._pending or self._releases:
                    await self._replay_settlements()
            self._local.sweep(self._now_ms())
            await asyncio.sleep(interval_s)

    async def _replay_settlements(self) -> None:
        while self._pending and self._breaker.closed:
            subject, member, used, at_ms = self._pending[0]
            try:
                await self._remote(lambda: self._store.settle(subject, member, used, at_ms))  # noqa: B023
            except StoreUnavailable:
                break
            self._pending.popleft()
        for (subject, member), (at_ms, origin) in list(self._releases.items()):
            if not self._breaker.closed:
                break
            try:
                released = await self._remote(
                    lambda: self._store.release(subject, member, at_ms, self._lease_ms)  # noqa: B023
                )
            except StoreUnavailable:
                break
            self._releases.pop((subject, member), None)
            self._count_release(origin, "released" if released else "none")
        if self._metrics is not None:
            self._metrics.settlements_pending.set(len(self._pending))
            self._metrics.releases_pending.set(len(self._releases))

    def _count_release(self, origin: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.releases.labels(origin, result).inc()

    def _queue_release(self, subject: str, member: str, at_ms: int, origin: str) -> None:
        key = (subject, member)
        if key not in self._releases and len(self._releases) >= self._max_pending:
            log.error("%d releases pending; dropping %s/%s (its lease still ends it)", len(self._releases), *key)
            return
        if self._releases.get(key, (0, ""))[1] != "gateway":
            self._releases[key] = (at_ms, origin)
        self._count_release(origin, "queued")
        if self._metrics is not None:
            self._metrics.releases_pending.set(len(self._releases))

    async def _check(
        self, subject: str, member: str, check: Check, mode: FailureMode, dry_run: bool = False
    ) -> tuple[WindowState, str]:
        # `_remote` inlined: this is the hot path, and every coroutine layer is paid again at each resume.
        now = self._now_ms()
        failure: BaseException | None = None
        sent = False  # a call went out: it may have changed the store even though no answer came
        monitor = self._loop_monitor
        first = monitor.now() if monitor is not None else 0.0
        for attempt in range(1, _STALL_MAX_ATTEMPTS + 1):
            if not self._breaker.closed:
                failure = StoreUnavailable(f"circuit open: {self._breaker.last_error}")
                break
            started = monitor.now() if monitor is not None else 0.0
            sent = True
            try:
                if self._timeout_s is None:  # the store bounds its own calls (socket timeouts, no retries)
                    state = await self._store.check(subject, member, now, check, dry_run)
                else:
                    async with asyncio.timeout(self._timeout_s):
                        state = await self._store.check(subject, member, now, check, dry_run)
            except (StoreUnavailable, TimeoutError) as exc:
                failure = exc
                if monitor is not None and monitor.stalled_since(started):
                    # Not evidence against the store. Same member again: if the lost call was admitted, the retry
                    # admits it once.
                    if attempt < _STALL_MAX_ATTEMPTS and monitor.now() - first < _STALL_BUDGET_S:
                        if self._metrics is not None:
                            self._metrics.stall_retries.inc()
                        continue
                    break
                self._store_failed(exc)
                break
            else:
                self._breaker.record_success()
                if self._releases and self._releases.get((subject, member), (0, ""))[1] == "limiter":
                    del self._releases[(subject, member)]  # admitted after all, on a retry with the same nonce
                return state, REMOTE
        if sent and not dry_run and (check.lease_ms > 0 or check.tokens > 0):
            # No answer, so no way to know whether Redis admitted it (or will, once it runs what it has queued).
            # This decision is taken elsewhere (locally or refused): undo the remote one, whenever Redis answers.
            self._queue_release(subject, member, now, "limiter")
        if mode is FailureMode.CLOSED:
            raise Unavailable(
                "quota store unavailable and this tier fails closed (on_store_failure = closed); retry shortly"
            ) from failure
        return await self._local.check(subject, member, now, check, dry_run), LOCAL

    def _record(self, tier: str, limit: str, result: str, store: str, started: float, operation: str) -> None:
        if self._metrics is None:
            return
        self._metrics.decisions.labels(tier, limit, result, "redis" if store == REMOTE else "local").inc()
        self._metrics.check_seconds.labels(operation).observe(time.perf_counter() - started)

    # --- the gateway's calls ------------------------------------------------------------------------------------

    async def reserve(
        self, key_id: str, tier_name: str, prompt_tokens: int, max_tokens: int, nonce: str = ""
    ) -> Decision:
        started = time.perf_counter()
        _valid_id("key_id", key_id)
        tier = _tier(tier_name)
        tier_name = tier.value
        nonce = _valid_id("nonce", nonce) if nonce else self._new_nonce()
        if prompt_tokens < 0 or max_tokens < 0:
            raise InvalidRequest("prompt_tokens and max_tokens must be >= 0")
        policy = self.policy.policy
        quota = policy.quota(key_id, tier)
        limits = quota.limits
        need = prompt_tokens + max_tokens
        try:
            state, origin = await self._check(
                quota.subject, nonce, _check_for(limits, need, self._lease_ms), limits.on_store_failure
            )
        except Unavailable:
            self._record(tier_name, "none", "unavailable", REMOTE, started, "reserve")
            raise
        views = _views(limits, state)
        if state.refused == REFUSED_RELEASED:
            self._record(tier_name, "none", "unavailable", origin, started, "reserve")
            raise Unavailable(
                f"reservation {nonce} was released before it was admitted (its caller gave up on it); retry with a "
                "new nonce"
            )
        if state.admitted:
            self._record(tier_name, "none", "allowed", origin, started, "reserve")
            return Decision(True, f"{origin}/{tier_name}/{quota.subject}/{nonce}", "", 0, views, "", origin == LOCAL)

        owner = self._owner(quota.subject, key_id, tier, policy.keys)
        refused_by = _REFUSED_NAME[state.refused]
        self._record(tier_name, refused_by, "refused", origin, started, "reserve")
        if state.retry_after_ms == NEVER:
            if state.refused == REFUSED_TOKENS:
                raise InvalidRequest(
                    f"this request needs up to {need} tokens (prompt {prompt_tokens} + max_tokens {max_tokens}) but "
                    f"{owner} has a budget of {limits.tokens_per_hour} tokens per hour; lower max_tokens"
                )
            raise PermissionDenied(f"{owner} has a {refused_by} limit of 0: no requests are allowed")
        wait = retry_seconds(state.retry_after_ms)
        log.info("refused key=%s tier=%s limit=%s retry_after_s=%d", key_id, tier_name, refused_by, wait)
        if state.refused == REFUSED_REQUESTS:
            message = f"rate limit: {owner} allows {limits.requests_per_hour} requests per hour"
        elif state.refused == REFUSED_BURST:
            message = f"rate limit: {owner} allows {limits.burst_per_minute} requests per minute"
        elif state.refused == REFUSED_TOKENS:
            left = max(0, limits.tokens_per_hour - state.tokens)
            message = (
                f"token budget: {owner} allows {limits.tokens_per_hour} tokens per hour, {left} left, and this request "
                f"reserves {need} (prompt {prompt_tokens} + max_tokens {max_tokens})"
            )
        else:
            message = f"concurrency limit: {owner} allows {limits.max_concurrent_streams} requests at once"
        return Decision(
            False, "", refused_by, state.retry_after_ms, views, f"{message}; retry in {wait} s", origin == LOCAL
        )

    @staticmethod
    def _owner(subject: str, key_id: str, tier: Tier, overrides: Mapping[str, object]) -> str:
        if subject.startswith("org:"):
            return f"org {subject[4:]}"
        if key_id in overrides:
            return f"key {key_id}"
        return f"the {tier.value} tier"

    async def settle(self, reservation_id: str, used_tokens: int) -> bool:
        """True when this call settled the reservation; False when there was nothing (left) to settle, or the
        store is down and the settlement was queued (the reservation stays charged in full until it lands)."""
        started = time.perf_counter()
        parts = reservation_id.split("/")
        if len(parts) != 4 or parts[0] not in (REMOTE, LOCAL) or not parts[2] or not parts[3]:
            raise InvalidRequest(f"malformed reservation id {reservation_id!r}")
        origin, _tier_name, subject, member = parts
        if used_tokens < 0:
            raise InvalidRequest("used_tokens must be >= 0")
        now = self._now_ms()
        if origin == LOCAL:
            settled = await self._local.settle(subject, member, used_tokens, now)
        else:
            try:
                settled = await self._remote(lambda: self._store.settle(subject, member, used_tokens, now))
            except StoreUnavailable:
                self._pending.append((subject, member, used_tokens, now))
                if self._metrics is not None:
                    self._metrics.settlements_pending.set(len(self._pending))
                settled = False
        if self._metrics is not None:
            self._metrics.check_seconds.labels("settle").observe(time.perf_counter() - started)
        return settled

    async def release(self, key_id: str, tier_name: str, nonce: str) -> bool:
        """Give back the reservation that Reserve(key_id, tier, nonce) made or will make: its caller never got the
        answer (it timed out, was cancelled, or shut down). True if an admitted reservation was undone; False if
        there was none (yet: a Reserve with this nonce arriving later is refused) or Redis is down (queued)."""
        _valid_id("key_id", key_id)
        tier = _tier(tier_name)
        _valid_id("nonce", nonce)
        subject = self.policy.policy.quota(key_id, tier).subject
        now = self._now_ms()
        # Either store may hold it: the local one if it was decided while Redis was down.
        released = await self._local.release(subject, nonce, now, self._lease_ms)
        try:
            remote = await self._remote(lambda: self._store.release(subject, nonce, now, self._lease_ms))
        except StoreUnavailable:
            self._queue_release(subject, nonce, now, "gateway")
            return released
        self._count_release("gateway", "released" if remote or released else "none")
        return remote or released

    # --- admin --------------------------------------------------------------------------------------------------

    async def status(self, key_id: str, tier_name: str) -> QuotaStatus:
        _valid_id("key_id", key_id)
        tier = _tier(tier_name)
        quota = self.policy.policy.quota(key_id, tier)
        check = _check_for(quota.limits, 0, self._lease_ms)
        # A read: shows the local view while Redis is down, whatever the tier's failure mode.
        state, origin = await self._check(quota.subject, "status", check, FailureMode.OPEN, dry_run=True)
        return QuotaStatus(
            key_id,
            tier,
            quota.subject,
            _views(quota.limits, state),
            state.active,
            origin == LOCAL,
            quota.limits.on_store_failure,
        )

    async def reset(self, key_id: str, tier_name: str) -> QuotaStatus:
        _valid_id("key_id", key_id)
        tier = _tier(tier_name)
        subject = self.policy.policy.quota(key_id, tier).subject
        try:
            await self._remote(lambda: self._store.reset(subject))
        except StoreUnavailable as exc:
            raise Unavailable(f"quota store unavailable, nothing was reset: {exc}") from exc
        await self._local.reset(subject)
        return await self.status(key_id, tier_name)

    # --- the edge (Envoy's rate limit service) ------------------------------------------------------------------

    async def edge_check(self, descriptors: Sequence[Sequence[tuple[str, str]]], hits: int = 1) -> EdgeDecision:
        """Per-IP and per-key request limits for Envoy. Descriptors: [("remote_address", ip)] and
        [("api_key", authorization header)]; others are answered as not limited. Each limited descriptor that
        passes is counted, also when another one is over (as Envoy's reference service does)."""
        started = time.perf_counter()
        policy = self.policy.policy
        hits = max(1, hits)
        jobs: list[tuple[str, int] | None] = []
        for entries in descriptors:
            jobs.append(self._edge_subject(list(entries), policy))
        mode = policy.edge.on_store_failure

        async def one(job: tuple[str, int] | None) -> tuple[EdgeStatus, int, str]:
            if job is None or job[1] < 0:
                return EdgeStatus(False, -1, 0, 0), 0, ""
            subject, limit = job
            check = Check(window_ms=MINUTE_MS, request_limit=limit, short_window_ms=MINUTE_MS, hits=hits)
            state, origin = await self._check(subject, self._new_nonce(), check, mode)
            now = self._now_ms()
            reset = max(0, state.oldest_ms + MINUTE_MS - now) if state.oldest_ms >= 0 else 0
            status = EdgeStatus(not state.admitted, limit, max(0, limit - state.requests), reset)
            if status.over:
                retry = state.retry_after_ms if state.retry_after_ms >= 0 else MINUTE_MS
                return status, retry, origin
            return status, 0, origin

        results = await asyncio.gather(*(one(job) for job in jobs))
        statuses = tuple(r[0] for r in results)
        over = [r for r in results if r[0].over]
        headers: tuple[tuple[str, str], ...] = ()
        if over:
            status, retry, _ = max(over, key=lambda r: r[1])
            headers = (
                ("retry-after", str(retry_seconds(retry))),
                ("x-ratelimit-limit", str(status.limit)),
                ("x-ratelimit-remaining", str(status.remaining)),
                ("x-ratelimit-reset", str(retry_seconds(status.reset_ms or retry))),
            )
        for (status, _, origin), job in zip(results, jobs, strict=True):
            if job is not None and status.limit >= 0:
                limit_name = "per_ip_per_minute" if job[0].startswith("edge:ip:") else "per_key_per_minute"
                self._record("edge", limit_name, "refused" if status.over else "allowed", origin, started, "edge")
        return EdgeDecision(bool(over), statuses, headers)

    @staticmethod
    def _edge_subject(entries: list[tuple[str, str]], policy: Policy) -> tuple[str, int] | None:
        if len(entries) != 1:
            return None
        name, value = entries[0]
        if name == "remote_address" and value and "{" not in value and "}" not in value:
            return f"edge:ip:{value}", policy.edge.per_ip_per_minute
        if name == "api_key":
            try:
                key_id = key_id_for(hash_key(parse_bearer(value)))
            except Unauthenticated:
                return None  # a malformed header is the gateway's to refuse (401); the per-IP limit still applies
            return f"edge:key:{key_id}", policy.edge_key_limit(key_id)
        return None
