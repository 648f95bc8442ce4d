"""API keys: created once (shown to the user once), stored only as SHA-256 hashes, looked up per request."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmesh.errors import Unauthenticated, Unavailable
from llmesh.types import Principal, Tier

KEY_PREFIX = "lm-"
REDIS_KEY = "llmesh:apikey:{digest}"


def hash_key(api_key: str) -> str:
    # Keys are 256-bit random, so a fast unsalted hash is enough: there is nothing to brute-force.
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id_for(digest: str) -> str:
    """A short, stable, loggable id of a key (a prefix of its hash)."""
    return digest[:16]


def parse_bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing API key: send the header 'authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed authorization header: expected 'Bearer <key>'")
    return token.strip()


class ApiKeyStore(Protocol):
    async def lookup(self, digest: str) -> Principal | None: ...

    async def create(self, tier: Tier, note: str = "") -> str: ...


class RedisApiKeyStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def lookup(self, digest: str) -> Principal | None:
        try:
            record = await self._redis.hgetall(REDIS_KEY.format(digest=digest))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"key store unavailable: {exc}") from exc
        if not record:
            return None
        raw_tier = record.get(b"tier", b"")
        tier = raw_tier.decode() if isinstance(raw_tier, bytes) else str(raw_tier)
        if tier not in Tier._value2member_map_:
            return None
        return Principal(key_id=key_id_for(digest), tier=Tier(tier))

    async def create(self, tier: Tier, note: str = "") -> str:
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(api_key)
        await self._redis.hset(
            REDIS_KEY.format(digest=digest),
            mapping={"tier": tier.value, "created": str(int(time.time())), "note": note},
        )
        return api_key


async def authenticate(store: ApiKeyStore, authorization: str | None) -> Principal:
    principal = await store.lookup(hash_key(parse_bearer(authorization)))
    if principal is None:
        raise Unauthenticated("invalid API key")
    return principal
