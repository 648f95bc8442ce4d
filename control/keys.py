"""`llmesh keys create | list | revoke`: the operator's side of the API key store (records in Redis, see
llmesh.apikeys). Nothing here ever prints a key, except `create`, once; `list` names keys by their key id (the first
16 hex digits of the key's SHA-256), which is safe to show and log.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.auth import KeyCacheSettings, RedisApiKeyStore
from llmesh.apikeys import (
    KEY_ID_PATTERN,
    KEY_PREFIX,
    REDIS_KEY,
    REVOKED,
    KeyRecord,
    hash_key,
    key_id_for,
    parse_record,
)
from llmesh.redis_auth import operator_redis_auth
from llmesh.types import Tier

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION = re.compile(r"(?:\d{1,9}[smhdw])+")
_DURATION_PART = re.compile(r"(\d+)([smhdw])")
# Far enough for any real key; keeps the stored number and datetime arithmetic in range.
MAX_LIFETIME_S = 100 * 365 * 86_400
_SCAN_BATCH = 500

# Sets a field of an existing record only (never creates a record from a key id alone); keeps the first revocation.
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""


class KeyAdminError(Exception):
    """An operator mistake or an unreachable store; the message is printed as is."""


def parse_expiry(text: str, now: float) -> int:
    """Unix seconds of an expiry given as a duration from `now` (`30d`, `12h`, `1w2d`; units s m h d w) or an ISO
    8601 date or time (`2027-01-31` is that day's start in UTC; a time without an offset is UTC)."""
    value = text.strip()
    if _DURATION.fullmatch(value):
        seconds = sum(int(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(value))
        if seconds <= 0:
            raise KeyAdminError(f"expiry {text!r} is not in the future")
        if seconds > MAX_LIFETIME_S:
            raise KeyAdminError(f"expiry {text!r} is more than 100 years away")
        return int(now) + seconds
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise KeyAdminError(
            f"expiry {text[:40]!r} is neither a duration (30d, 12h, 1w2d) nor an ISO date (2027-01-31, "
            "2027-01-31T12:00:00+00:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    expires = when.timestamp()
    if expires <= now:
        raise KeyAdminError(f"expiry {text!r} is not in the future")
    if expires - now > MAX_LIFETIME_S:
        raise KeyAdminError(f"expiry {text!r} is more than 100 years away")
    return int(expires)


def public_url(url: str) -> str:
    """The URL without a password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(redis_url: str) -> aioredis.Redis:
    """A client of the key store; its credentials as llmesh.redis_auth.operator_redis_auth finds them (env vars, or
    the password `llmesh up` made for its own Redis)."""
    options = operator_redis_auth(os.environ).client_options(redis_url)
    return aioredis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=2.0, **options)


def _iso(unix_s: int | None) -> str | None:
    return None if unix_s is None else datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


def _short(unix_s: int | None, empty: str = "-") -> str:
    return empty if unix_s is None else datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M")


def _printable(text: str, limit: int = 40) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def record_json(record: KeyRecord, now: float) -> dict[str, Any]:
    return {
        "id": record.key_id,
        "tier": record.tier,
        "status": record.status(now),
        "created": _iso(record.created),
        "last_used": _iso(record.last_used),
        "expires": _iso(record.expires),
        "revoked": _iso(record.revoked),
        "note": record.note,
    }


def format_table(records: Sequence[KeyRecord], now: float) -> str:
    """One line per key, times in UTC; never the key or its full hash."""
    header = ("ID", "TIER", "STATUS", "CREATED (UTC)", "LAST USED", "EXPIRES", "REVOKED", "NOTE")
    rows = [
        (
            r.key_id,
            _printable(r.tier, 12),
            r.status(now),
            _short(r.created),
            _short(r.last_used, "never"),
            _short(r.expires, "never"),
            _short(r.revoked),
            _printable(r.note),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in (header, *rows)]
    return "\n".join(lines)


async def list_records(client: aioredis.Redis) -> list[KeyRecord]:
    """Every stored key, oldest first."""
    prefix = REDIS_KEY.format(digest="")
    names = [n async for n in client.scan_iter(match=prefix + "*", count=1000)]
    records: list[KeyRecord] = []
    for start in range(0, len(names), _SCAN_BATCH):
        batch = names[start : start + _SCAN_BATCH]
        pipe = client.pipeline(transaction=False)
        for name in batch:
            pipe.hgetall(name)
        for name, fields in zip(batch, await pipe.execute(), strict=True):
            text = name.decode() if isinstance(name, bytes) else str(name)
            record = parse_record(text.removeprefix(prefix), fields)
            if record is not None:
                records.append(record)
    records.sort(key=lambda r: (r.created or 0, r.digest))
    return records


async def find_record(client: aioredis.Redis, key: str) -> KeyRecord:
    """The record of an API key (`lm-...`) or a key id (16 hex digits)."""
    if key.startswith(KEY_PREFIX):
        digests = [hash_key(key)]
    elif KEY_ID_PATTERN.fullmatch(key):
        prefix = REDIS_KEY.format(digest="")
        names = [n async for n in client.scan_iter(match=REDIS_KEY.format(digest=key) + "*", count=1000)]
        digests = [(n.decode() if isinstance(n, bytes) else str(n)).removeprefix(prefix) for n in names]
    else:
        raise KeyAdminError("expected an API key (lm-...) or a key id (16 hex digits, as `llmesh keys list` shows)")
    if len(digests) > 1:
        raise KeyAdminError(f"key id {key} names {len(digests)} keys; pass the API key itself")
    record = parse_record(digests[0], await client.hgetall(REDIS_KEY.format(digest=digests[0]))) if digests else None
    if record is None:
        shown = key if not key.startswith(KEY_PREFIX) else "with that value"
        raise KeyAdminError(f"no API key {shown} in the key store")
    return record


async def revoke(client: aioredis.Redis, key: str, now: float) -> tuple[KeyRecord, bool]:
    """Mark a key revoked at `now` (its record stays, for `list`); (record, False) if it already was revoked."""
    record = await find_record(client, key)
    script = client.register_script(_REVOKE)
    changed = await script(keys=[REDIS_KEY.format(digest=record.digest)], args=[REVOKED, int(now)])
    if changed == -1:
        raise KeyAdminError(f"no API key {record.key_id} in the key store (deleted meanwhile)")
    return record, changed == 1


async def keys_command(
    action: str,
    redis_url: str,
    *,
    tier: str | None = None,
    note: str = "",
    expires: str | None = None,
    key: str = "",
    as_json: bool = False,
    wall_clock: Any = time.time,
) -> int:
    """Run one `llmesh keys` action; prints results to stdout, mistakes to stderr; returns the exit code."""
    now = wall_clock()
    client = connect(redis_url)
    try:
        if action == "create":
            if tier not in Tier._value2member_map_:
                raise KeyAdminError(f"--tier must be one of {', '.join(t.value for t in Tier)}")
            expires_at = parse_expiry(expires, now) if expires else None
            api_key = await RedisApiKeyStore(client, wall_clock=wall_clock).create(Tier(str(tier)), note, expires_at)
            if as_json:
                info = {"key": api_key, "id": key_id_for(hash_key(api_key)), "tier": tier, "expires": _iso(expires_at)}
                print(json.dumps(info))
            else:
                print(api_key)
            return 0
        if action == "list":
            records = await list_records(client)
            if as_json:
                print(json.dumps([record_json(r, now) for r in records], indent=2))
            elif records:
                print(format_table(records, now))
            else:
                print("no API keys (create one: llmesh keys create --tier paid)")
            return 0
        if action == "revoke":
            record, changed = await revoke(client, key, now)
            if changed:
                print(
                    f"revoked key {record.key_id} ({record.tier}); running gateways refuse it within their key cache "
                    f"TTL ({KeyCacheSettings().ttl_s:g} s by default)"
                )
            else:
                print(f"key {record.key_id} was already revoked at {_iso(record.revoked)}")
            return 0
        raise KeyAdminError(f"unknown keys action {action!r}")
    except KeyAdminError as exc:
        print(f"llmesh: {exc}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(f"llmesh: cannot use the key store at {public_url(redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
