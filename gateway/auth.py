"""API key store: keys are created once (shown to the user once), stored only as hashes, looked up per request."""

from __future__ import annotations

import secrets
import time
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmesh.apikeys import KEY_PREFIX, REDIS_KEY, hash_key, key_id_for, parse_bearer
from llmesh.errors import Unauthenticated, Unavailable
from llmesh.types import Principal, Tier


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
