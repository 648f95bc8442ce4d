"""API key records and the gateway's key cache, with a fake record source and a fake clock (the same cache against a
real Redis, stopped mid-test: tests/integration/test_auth_redis.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from control.keys import KeyAdminError, format_table, parse_expiry, record_json
from gateway.auth import CachedKeyStore, KeyCacheSettings, authenticate
from llmesh.apikeys import KeyRecord, hash_key, parse_record
from llmesh.errors import Unauthenticated, Unavailable
from llmesh.types import Tier

NOW = 1_800_000_000.0  # unix seconds of the fake wall clock at the start of each test
KEY = "lm-" + "a" * 43
DIGEST = hash_key(KEY)


class FakeClock:
    """One clock for both TTLs (monotonic) and wall time: tests step it."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSource:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.fetches: list[str] = []
        self.touches: list[tuple[str, int]] = []
        self.failing = False
        self.touch_fails = False
        self.fetch_gate: asyncio.Event | None = None
        self.touch_gate: asyncio.Event | None = None

    def add(self, key: str, tier: Tier = Tier.PAID, expires: int | None = None, revoked: int | None = None) -> str:
        digest = hash_key(key)
        created = int(NOW) - 100
        self.records[digest] = KeyRecord(digest, tier.value, created, expires=expires, revoked=revoked)
        return digest

    async def fetch(self, digest: str) -> KeyRecord | None:
        self.fetches.append(digest)
        if self.fetch_gate is not None:
            await self.fetch_gate.wait()
        if self.failing:
            raise Unavailable("key store unavailable")
        return self.records.get(digest)

    async def touch(self, digest: str, unix_s: int) -> None:
        if self.touch_gate is not None:
            await self.touch_gate.wait()
        if self.touch_fails:
            raise Unavailable("key store unavailable")
        self.touches.append((digest, unix_s))


def make(**settings: float) -> tuple[CachedKeyStore, FakeSource, FakeClock]:
    source, clock = FakeSource(), FakeClock()
    store = CachedKeyStore(source, KeyCacheSettings(**settings), clock=clock, wall_clock=clock)  # type: ignore[arg-type]
    return store, source, clock


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# ---- records -------------------------------------------------------------------------------------------------


def test_a_record_from_before_expiry_and_revocation_existed_still_works() -> None:
    record = parse_record(DIGEST, {b"tier": b"paid", b"created": b"1700000000", b"note": b"old"})
    assert record is not None
    assert (record.expires, record.revoked, record.last_used) == (None, None, None)
    principal = record.principal(NOW)
    assert principal.tier is Tier.PAID and principal.key_id == DIGEST[:16]
    assert parse_record(DIGEST, {"tier": "free"}) == KeyRecord(digest=DIGEST, tier="free")
    assert parse_record(DIGEST, {}) is None


def test_records_fail_closed() -> None:
    def refusal(fields: dict[bytes, bytes]) -> str | None:
        record = parse_record(DIGEST, {b"tier": b"paid", **fields})
        assert record is not None
        return record.refusal(NOW)

    assert refusal({b"expires": b"soon"}) == "API key expired"
    assert refusal({b"revoked": b"yes"}) == "API key revoked"
    assert refusal({b"revoked": b"0"}) == "API key revoked"
    assert refusal({b"tier": b"platinum"}) == "invalid API key"
    assert refusal({b"expires": str(int(NOW) + 1).encode()}) is None


def test_expiry_is_exact() -> None:
    record = KeyRecord(digest=DIGEST, tier="free", expires=int(NOW) + 60)
    assert record.principal(NOW + 59.9).tier is Tier.FREE
    with pytest.raises(Unauthenticated, match=r"^API key expired$"):
        record.principal(NOW + 60)
    assert record.status(NOW + 60) == "expired"


# ---- the cache -----------------------------------------------------------------------------------------------


def test_lookups_within_the_ttl_cost_one_read() -> None:
    async def scenario() -> None:
        store, source, clock = make(ttl_s=10)
        source.add(KEY)
        for _ in range(5):
            assert (await authenticate(store, f"Bearer {KEY}")).tier is Tier.PAID
            clock.advance(1.9)
        assert len(source.fetches) == 1
        clock.advance(0.6)  # 10.1 s after the first read
        await authenticate(store, f"Bearer {KEY}")
        assert len(source.fetches) == 2

    run(scenario)


def test_a_revoked_key_stops_working_within_the_ttl() -> None:
    async def scenario() -> None:
        store, source, clock = make(ttl_s=10)
        source.add(KEY)
        await authenticate(store, f"Bearer {KEY}")
        source.records[DIGEST] = replace(source.records[DIGEST], revoked=int(clock.now))
        clock.advance(9.9)
        await authenticate(store, f"Bearer {KEY}")  # still cached
        clock.advance(0.1)
        with pytest.raises(Unauthenticated, match=r"^API key revoked$"):
            await authenticate(store, f"Bearer {KEY}")
        # A deleted record (the old way to revoke) is refused too, as an unknown key.
        del source.records[DIGEST]
        clock.advance(10)
        with pytest.raises(Unauthenticated, match=r"^invalid API key$"):
            await authenticate(store, f"Bearer {KEY}")

    run(scenario)


def test_a_cached_key_expires_on_time_without_a_read() -> None:
    async def scenario() -> None:
        store, source, clock = make(ttl_s=10)
        source.add(KEY, expires=int(NOW) + 5)
        await authenticate(store, f"Bearer {KEY}")
        clock.advance(5)
        with pytest.raises(Unauthenticated, match=r"^API key expired$"):
            await authenticate(store, f"Bearer {KEY}")
        assert len(source.fetches) == 1

    run(scenario)


def test_unknown_keys_are_remembered_for_the_shorter_negative_ttl() -> None:
    async def scenario() -> None:
        store, source, clock = make(ttl_s=10, negative_ttl_s=2)
        for _ in range(3):
            with pytest.raises(Unauthenticated, match=r"^invalid API key$"):
                await authenticate(store, f"Bearer {KEY}")
        assert len(source.fetches) == 1
        source.add(KEY)  # created right after a miss: works once the negative entry is stale
        clock.advance(1.9)
        with pytest.raises(Unauthenticated):
            await authenticate(store, f"Bearer {KEY}")
        clock.advance(0.1)
        assert (await authenticate(store, f"Bearer {KEY}")).tier is Tier.PAID
        assert len(source.fetches) == 2

    run(scenario)


def test_the_cache_is_a_bounded_lru_and_bad_keys_cannot_evict_good_ones() -> None:
    async def scenario() -> None:
        store, source, _ = make(ttl_s=60, max_entries=2, max_negative_entries=3)
        keys = [f"lm-key{i}" for i in range(3)]
        for key in keys:
            source.add(key)
        await store.lookup(hash_key(keys[0]))
        await store.lookup(hash_key(keys[1]))
        await store.lookup(hash_key(keys[0]))  # keys[0] is now the most recently used
        await store.lookup(hash_key(keys[2]))  # evicts keys[1]
        reads = len(source.fetches)
        await store.lookup(hash_key(keys[0]))
        await store.lookup(hash_key(keys[2]))
        assert len(source.fetches) == reads
        await store.lookup(hash_key(keys[1]))
        assert len(source.fetches) == reads + 1
        for i in range(100):
            assert await store.lookup(hash_key(f"lm-made-up-{i}")) is None
        assert len(store) == 2 + 3
        reads = len(source.fetches)
        assert await store.lookup(hash_key(keys[1])) is not None
        assert await store.lookup(hash_key(keys[2])) is not None
        assert len(source.fetches) == reads

    run(scenario)


def test_a_redis_blip_serves_known_keys_from_cache_up_to_the_max_stale_age() -> None:
    async def scenario() -> None:
        store, source, clock = make(ttl_s=10, max_stale_s=60, retry_s=1)
        source.add(KEY)
        revoked = source.add("lm-revoked", revoked=int(NOW))
        await authenticate(store, f"Bearer {KEY}")
        with pytest.raises(Unauthenticated):
            await store.lookup(revoked)
        source.failing = True
        clock.advance(11)
        assert (await authenticate(store, f"Bearer {KEY}")).tier is Tier.PAID
        assert store.stale_answers == 1 and not store.store_ok
        # A revoked key stays revoked; a key never seen cannot be judged: 503, not 401.
        with pytest.raises(Unauthenticated, match="revoked"):
            await store.lookup(revoked)
        with pytest.raises(Unavailable, match=r"^key store unavailable$"):
            await authenticate(store, "Bearer lm-never-seen")
        # Within retry_s of the failure nothing asks Redis (no timeout per request while it is down).
        reads = len(source.fetches)
        for _ in range(20):
            await authenticate(store, f"Bearer {KEY}")
        assert len(source.fetches) == reads
        clock.advance(1)
        await authenticate(store, f"Bearer {KEY}")  # one probe, which fails
        await authenticate(store, f"Bearer {KEY}")
        assert len(source.fetches) == reads + 1
        clock.advance(60 - 12 + 0.1)  # the last good read is now older than max_stale_s
        with pytest.raises(Unavailable):
            await authenticate(store, f"Bearer {KEY}")
        source.failing = False
        clock.advance(1)
        assert (await authenticate(store, f"Bearer {KEY}")).tier is Tier.PAID
        assert store.store_ok

    run(scenario)


def test_concurrent_misses_share_one_read_and_a_cancelled_caller_does_not_cancel_it() -> None:
    async def scenario() -> None:
        store, source, _ = make()
        source.add(KEY)
        source.fetch_gate = asyncio.Event()
        waiters = [asyncio.create_task(store.lookup(DIGEST)) for _ in range(5)]
        await settle()
        waiters[0].cancel()
        source.fetch_gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert all(r is not None and not isinstance(r, BaseException) for r in results[1:])
        assert len(source.fetches) == 1

    run(scenario)


def test_last_used_is_written_in_the_background_at_most_once_per_interval() -> None:
    async def scenario() -> None:
        store, source, clock = make(ttl_s=10, last_used_interval_s=60)
        source.add(KEY)
        for _ in range(30):
            await authenticate(store, f"Bearer {KEY}")
            clock.advance(1)
        await settle()
        assert source.touches == [(DIGEST, int(NOW))]
        clock.advance(30)
        await authenticate(store, f"Bearer {KEY}")
        await settle()
        assert source.touches == [(DIGEST, int(NOW)), (DIGEST, int(NOW) + 60)]
        # Refused keys are not touched.
        source.add("lm-old", expires=int(NOW))
        with pytest.raises(Unauthenticated):
            await store.lookup(hash_key("lm-old"))
        await settle()
        assert len(source.touches) == 2
        await store.aclose()

    run(scenario)


def test_a_failing_or_hung_last_used_write_never_blocks_or_fails_a_request() -> None:
    async def scenario() -> None:
        store, source, _ = make(last_used_interval_s=60, max_pending_touches=2)
        source.touch_fails = True
        source.add(KEY)
        assert await store.lookup(DIGEST) is not None
        await settle()
        source.touch_fails = False
        source.touch_gate = asyncio.Event()  # Redis accepts the write but never answers
        keys = [f"lm-k{i}" for i in range(5)]
        for key in keys:
            source.add(key)
        for key in keys:
            await asyncio.wait_for(store.lookup(hash_key(key)), timeout=1)
        await settle()
        assert store.pending_touches == 2  # the rest were skipped, not queued
        await asyncio.wait_for(store.aclose(grace_s=0.01), timeout=1)
        assert store.pending_touches == 0

    run(scenario)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        KeyCacheSettings(ttl_s=-1)
    with pytest.raises(ValueError, match="sizes"):
        KeyCacheSettings(max_entries=0)


# ---- operator side -------------------------------------------------------------------------------------------


def test_parse_expiry() -> None:
    assert parse_expiry("30d", NOW) == int(NOW) + 30 * 86_400
    assert parse_expiry(" 1w2d12h ", NOW) == int(NOW) + 9 * 86_400 + 12 * 3600
    assert parse_expiry("2027-01-31", NOW) == 1_801_353_600  # 00:00 UTC
    assert parse_expiry("2027-01-31T12:00:00+02:00", NOW) == 1_801_353_600 + 10 * 3600
    assert parse_expiry("2027-01-31T12:00:00Z", NOW) == 1_801_353_600 + 12 * 3600
    for bad, why in [
        ("0d", "not in the future"),
        ("2020-01-01", "not in the future"),
        ("200y", "neither a duration"),
        ("36600d", "100 years"),
        ("9999-12-31", "100 years"),
        ("tomorrow", "neither a duration"),
        ("", "neither a duration"),
    ]:
        with pytest.raises(KeyAdminError, match=why):
            parse_expiry(bad, NOW)


def test_listing_shows_ids_and_states_never_keys_or_hashes() -> None:
    records = [
        KeyRecord(DIGEST, "paid", created=int(NOW) - 86_400, note="ci\x1b[2J", last_used=int(NOW) - 60),
        KeyRecord(hash_key("lm-b"), "free", created=int(NOW), expires=int(NOW) - 1),
        KeyRecord(hash_key("lm-c"), "enterprise", created=int(NOW), revoked=int(NOW)),
    ]
    table = format_table(records, NOW)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["ID", "TIER", "STATUS"]
    assert [line.split()[2] for line in lines[1:]] == ["active", "expired", "revoked"]
    assert DIGEST[:16] in table and DIGEST[:17] not in table and KEY not in table
    assert "\x1b" not in table and "never" in table
    shown = json.loads(json.dumps([record_json(r, NOW) for r in records]))
    assert shown[0] == {
        "id": DIGEST[:16],
        "tier": "paid",
        "status": "active",
        "created": "2027-01-14T08:00:00Z",
        "last_used": "2027-01-15T07:59:00Z",
        "expires": None,
        "revoked": None,
        "note": "ci\x1b[2J",
    }
    assert shown[2]["revoked"] == "2027-01-15T08:00:00Z"
