"""API key format, hashing and stored records, shared by every part that names a key (gateway, limiter, operator
tools).

Keys are shown once at creation and stored only as SHA-256 hashes; a key's id is a short prefix of its hash. A
record (a Redis hash at REDIS_KEY) holds `tier`, `created` and `note`, and optionally `expires` (unix seconds),
`revoked` (unix seconds) and `last_used` (unix seconds, written by gateways at most once a minute per key). Records
written before a field existed simply lack it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmesh.errors import Unauthenticated
from llmesh.types import Principal, Tier

KEY_PREFIX = "lm-"
REDIS_KEY = "llmesh:apikey:{digest}"
KEY_ID_LENGTH = 16
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}")

# Fields of a key record.
TIER = "tier"
CREATED = "created"
NOTE = "note"
EXPIRES = "expires"
REVOKED = "revoked"
LAST_USED = "last_used"

# What a refused key is told. Only a caller holding the exact key can see "revoked" or "expired", so neither helps
# anyone guess a key.
INVALID_KEY = "invalid API key"
REVOKED_KEY = "API key revoked"
EXPIRED_KEY = "API key expired"


def hash_key(api_key: str) -> str:
    # Keys are 256-bit random, so a fast unsalted hash is enough: there is nothing to brute-force.
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id_for(digest: str) -> str:
    """A short, stable, loggable id of a key (a prefix of its hash)."""
    return digest[:KEY_ID_LENGTH]


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _seconds(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored key, as read from the key store. `tier` is the raw text (an unknown tier is refused, not fatal)."""

    digest: str
    tier: str
    created: int | None = None
    note: str = ""
    expires: int | None = None
    revoked: int | None = None
    last_used: int | None = None

    @property
    def key_id(self) -> str:
        return key_id_for(self.digest)

    def refusal(self, now: float) -> str | None:
        """Why the key may not be used at unix time `now`, as the caller is told; None if it may."""
        if self.revoked is not None:
            return REVOKED_KEY
        if self.expires is not None and now >= self.expires:
            return EXPIRED_KEY
        if self.tier not in Tier._value2member_map_:
            return INVALID_KEY
        return None

    def status(self, now: float) -> str:
        """active, revoked, expired or invalid (unknown tier), for operators."""
        return {None: "active", REVOKED_KEY: "revoked", EXPIRED_KEY: "expired"}.get(self.refusal(now), "invalid")

    def principal(self, now: float) -> Principal:
        """The caller this key names, or Unauthenticated if it is revoked, expired or of an unknown tier."""
        refusal = self.refusal(now)
        if refusal is not None:
            raise Unauthenticated(refusal)
        return Principal(key_id=self.key_id, tier=Tier(self.tier))


def parse_record(digest: str, fields: Mapping[Any, Any]) -> KeyRecord | None:
    """A record from a stored hash's fields; None for an empty hash (no such key).

    Fails closed: an `expires` that is not an integer counts as long expired, and any non-empty `revoked` as revoked.
    """
    if not fields:
        return None
    values = {_text(k): _text(v) for k, v in fields.items()}
    expires = values.get(EXPIRES)
    revoked = values.get(REVOKED)
    last_used = values.get(LAST_USED)
    created = values.get(CREATED)
    return KeyRecord(
        digest=digest,
        tier=values.get(TIER, ""),
        created=_seconds(created) if created else None,
        note=values.get(NOTE, ""),
        expires=(_seconds(expires) or 0) if expires else None,
        revoked=(_seconds(revoked) or 0) if revoked else None,
        last_used=_seconds(last_used) if last_used else None,
    )


def parse_bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing API key: send the header 'authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed authorization header: expected 'Bearer <key>'")
    return token.strip()
