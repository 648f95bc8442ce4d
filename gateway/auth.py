"""API key store: keys are created once (shown to the user once), stored only as hashes, looked up per request.

`RedisApiKeyStore` reads and writes the records; `CachedKeyStore` sits in front of it in the gateway so that a
request usually costs no Redis call, a Redis blip does not refuse keys that were just seen working, and a revoked
key stops working within the cache's TTL.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmesh.apikeys import (
    CREATED,
    EXPIRES,
    INVALID_KEY,
    KEY_PREFIX,
    LAST_USED,
    NOTE,
    REDIS_KEY,
    TIER,
    KeyRecord,
    hash_key,
    parse_bearer,
    parse_record,
)
from llmesh.breaker import BreakerState, CircuitBreaker
from llmesh.errors import MeshError, Unauthenticated, Unavailable
from llmesh.types import Principal, Tier

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# Sets a field of an existing hash only: a gateway's late `last_used` write must never re-create the record of a key
# an operator deleted (it would come back as a record without a tier). Fields only move forward (many gateways).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


class ApiKeyStore(Protocol):
    """What the pipeline needs: the caller a key's hash names, None for no such key; Unauthenticated for a revoked
    or expired key; Unavailable when the store cannot answer."""

    async def lookup(self, digest: str) -> Principal | None: ...


class KeyRecordSource(Protocol):
    async def fetch(self, digest: str) -> KeyRecord | None:
        """The stored record, None if there is none; Unavailable if the store cannot answer."""
        ...

    async def touch(self, digest: str, unix_s: int) -> None:
        """Record that the key was used at `unix_s` (never creates a record); Unavailable on store failure."""
        ...


class RedisApiKeyStore:
    def __init__(self, redis: aioredis.Redis, wall_clock: Clock = time.time) -> None:
        self._redis = redis
        self._wall_clock = wall_clock
        self._touch = redis.register_script(_TOUCH)

    async def fetch(self, digest: str) -> KeyRecord | None:
        try:
            fields = await self._redis.hgetall(REDIS_KEY.format(digest=digest))
        except (RedisError, OSError) as exc:
            # The caller sees no address or exception text; the log has them.
            log.warning("key store unavailable: %s", exc)
            raise Unavailable("key store unavailable") from exc
        return parse_record(digest, fields)

    async def touch(self, digest: str, unix_s: int) -> None:
        try:
            await self._touch(keys=[REDIS_KEY.format(digest=digest)], args=[LAST_USED, unix_s])
        except (RedisError, OSError) as exc:
            raise Unavailable("key store unavailable") from exc

    async def lookup(self, digest: str) -> Principal | None:
        """Uncached: one Redis call per lookup."""
        record = await self.fetch(digest)
        return None if record is None else record.principal(self._wall_clock())

    async def create(self, tier: Tier, note: str = "", expires: int | None = None) -> str:
        """A new key of `tier`, valid until unix time `expires` (None: no expiry); returned once, stored hashed."""
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(api_key)
        fields = {TIER: tier.value, CREATED: str(int(self._wall_clock())), NOTE: note}
        if expires is not None:
            fields[EXPIRES] = str(int(expires))
        await self._redis.hset(REDIS_KEY.format(digest=digest), mapping=fields)  # type: ignore[arg-type]
        return api_key


@dataclass(frozen=True)
class KeyCacheSettings:
    # A key's record is re-read after this long: the longest a revoked key keeps working (while Redis answers).
    ttl_s: float = 10.0
    # "No such key" is remembered this long (a new key works at most this late; a flood of bad keys is cheap).
    negative_ttl_s: float = 2.0
    # While Redis fails, a key read successfully within this long keeps its last known state; older ones get 503.
    max_stale_s: float = 300.0
    # Known keys and unknown hashes are kept in separate LRUs, so a flood of made-up keys cannot evict good ones.
    max_entries: int = 10_000
    max_negative_entries: int = 10_000
    # After a failed Redis read, requests use the cache without asking Redis for this long (then one probes).
    retry_s: float = 1.0
    # A key's last_used is written at most this often per gateway, in the background.
    last_used_interval_s: float = 60.0
    # At most this many last_used writes in flight; more are skipped (last_used is a hint, never a cost).
    max_pending_touches: int = 64

    def __post_init__(self) -> None:
        for name in ("ttl_s", "negative_ttl_s", "max_stale_s", "retry_s", "last_used_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"key cache {name} must be >= 0")
        if self.max_entries < 1 or self.max_negative_entries < 1 or self.max_pending_touches < 0:
            raise ValueError("key cache sizes must be >= 1 (max_pending_touches >= 0)")


@dataclass
class _Known:
    record: KeyRecord
    fetched_at: float
    touched_at: float


class CachedKeyStore:
    """A bounded, TTL'd cache of key records in front of a `KeyRecordSource`, with stale reads during outages.

    Expiry and revocation are judged at every use against the wall clock, so a key expires on time even when
    cached; a revocation is seen when the record is next read (within `ttl_s`). Concurrent misses of one key share
    one read. `clock` (monotonic) drives TTLs, `wall_clock` (unix seconds) expiry and last_used.
    """

    def __init__(
        self,
        source: KeyRecordSource,
        settings: KeyCacheSettings | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self._source = source
        self._settings = settings or KeyCacheSettings()
        self._clock = clock
        self._wall_clock = wall_clock
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._reads: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._touches: set[asyncio.Task[None]] = set()
        self._breaker = CircuitBreaker(self._settings.retry_s, clock=clock, on_change=self._breaker_changed)
        self.stale_answers = 0

    @property
    def store_ok(self) -> bool:
        return self._breaker.closed

    @property
    def pending_touches(self) -> int:
        return len(self._touches)

    def __len__(self) -> int:
        return len(self._known) + len(self._unknown)

    async def lookup(self, digest: str) -> Principal | None:
        record = await self._record(digest)
        if record is None:
            return None
        principal = record.principal(self._wall_clock())
        self._maybe_touch(digest)
        return principal

    async def _record(self, digest: str) -> KeyRecord | None:
        now = self._clock()
        known = self._known.get(digest)
        if known is not None and now - known.fetched_at < self._settings.ttl_s:
            self._known.move_to_end(digest)
            return known.record
        unknown_at = self._unknown.get(digest)
        if known is None and unknown_at is not None and now - unknown_at < self._settings.negative_ttl_s:
            self._unknown.move_to_end(digest)
            return None
        try:
            return await self._read(digest)
        except Unavailable:
            known = self._known.get(digest)
            if known is not None and self._clock() - known.fetched_at <= self._settings.max_stale_s:
                self.stale_answers += 1
                return known.record
            raise

    async def _read(self, digest: str) -> KeyRecord | None:
        shared = self._reads.get(digest)
        if shared is None:
            if not self._breaker.allow():
                raise Unavailable("key store unavailable")
            shared = asyncio.ensure_future(self._fetch(digest))
            self._reads[digest] = shared
            shared.add_done_callback(lambda done: self._read_done(digest, done))
        # A cancelled caller must not cancel the read that others wait on.
        return await asyncio.shield(shared)

    def _read_done(self, digest: str, done: asyncio.Future[KeyRecord | None]) -> None:
        self._reads.pop(digest, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have been cancelled

    async def _fetch(self, digest: str) -> KeyRecord | None:
        try:
            record = await self._source.fetch(digest)
        except Unavailable as exc:
            self._breaker.record_failure(str(exc))
            raise
        self._breaker.record_success()
        now = self._clock()
        if record is None:
            self._known.pop(digest, None)
            self._unknown[digest] = now
            self._unknown.move_to_end(digest)
            while len(self._unknown) > self._settings.max_negative_entries:
                self._unknown.popitem(last=False)
            return None
        self._unknown.pop(digest, None)
        previous = self._known.get(digest)
        touched_at = previous.touched_at if previous is not None else float("-inf")
        self._known[digest] = _Known(record, now, touched_at)
        self._known.move_to_end(digest)
        while len(self._known) > self._settings.max_entries:
            self._known.popitem(last=False)
        return record

    def _maybe_touch(self, digest: str) -> None:
        """Write last_used in the background, at most once per interval per key; never waits, never fails."""
        known = self._known.get(digest)
        now = self._clock()
        if known is None or now - known.touched_at < self._settings.last_used_interval_s:
            return
        if not self._breaker.closed or len(self._touches) >= self._settings.max_pending_touches:
            return
        known.touched_at = now
        task = asyncio.ensure_future(self._touch(digest, int(self._wall_clock())))
        self._touches.add(task)
        task.add_done_callback(self._touches.discard)

    async def _touch(self, digest: str, unix_s: int) -> None:
        try:
            await self._source.touch(digest, unix_s)
        except MeshError as exc:
            log.debug("last_used of key %s not written: %s", digest[:16], exc)

    async def aclose(self, grace_s: float = 1.0) -> None:
        """Let pending last_used writes finish (up to `grace_s`), then cancel the rest."""
        pending = set(self._touches)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _breaker_changed(self, state: BreakerState, reason: str) -> None:
        if state is BreakerState.OPEN:
            log.warning(
                "key store failing (%s): serving keys read within %.0f s from cache",
                reason,
                self._settings.max_stale_s,
            )
        elif state is BreakerState.CLOSED:
            log.info("key store answers again")


async def authenticate(store: ApiKeyStore, authorization: str | None) -> Principal:
    principal = await store.lookup(hash_key(parse_bearer(authorization)))
    if principal is None:
        raise Unauthenticated(INVALID_KEY)
    return principal
