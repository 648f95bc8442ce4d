"""API keys against a real Redis: stored hashed, looked up by hash, the CLI prints a working key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import redis
import redis.asyncio as aioredis

from gateway.auth import RedisApiKeyStore, authenticate
from llmesh.apikeys import REDIS_KEY, hash_key
from llmesh.errors import Unauthenticated, Unavailable
from llmesh.types import Tier


def test_created_key_authenticates_and_is_stored_hashed(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_url)
        store = RedisApiKeyStore(client)
        try:
            key = await store.create(Tier.ENTERPRISE, "ci")
            principal = await authenticate(store, f"Bearer {key}")
            assert principal.tier is Tier.ENTERPRISE
            assert principal.key_id == hash_key(key)[:16]
            stored = await client.hgetall(REDIS_KEY.format(digest=hash_key(key)))
            assert key.encode() not in b"".join(stored.values())
            with pytest.raises(Unauthenticated, match="invalid API key"):
                await authenticate(store, f"Bearer {key}x")
            with pytest.raises(Unauthenticated, match="missing API key"):
                await authenticate(store, None)
            with pytest.raises(Unauthenticated, match="malformed"):
                await authenticate(store, key)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_redis_down_is_unavailable_not_a_crash() -> None:
    async def scenario() -> None:
        # Port 1 on loopback: nothing listens there.
        client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        try:
            with pytest.raises(Unavailable, match="key store unavailable"):
                await authenticate(RedisApiKeyStore(client), "Bearer lm-whatever")
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_cli_keys_create(redis_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "control.cli", "keys", "create", "--tier", "free", "--redis-url", redis_url],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ},
        timeout=60,
    )
    key = out.stdout.strip()
    assert key.startswith("lm-") and len(key) > 40
    record = redis.Redis.from_url(redis_url).hgetall(REDIS_KEY.format(digest=hash_key(key)))
    assert record[b"tier"] == b"free"
