"""API keys against a real Redis: stored hashed, looked up by hash; `llmesh keys create | list | revoke`; the
gateway's key cache rides out a stopped Redis and drops a revoked key within its TTL (also as a real gateway
process)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from control.keys import revoke
from control.process import ManagedProcess, free_port, grpc_health_probe, tail
from gateway.auth import CachedKeyStore, KeyCacheSettings, RedisApiKeyStore, authenticate
from llmesh.apikeys import REDIS_KEY, hash_key
from llmesh.errors import Unauthenticated, Unavailable
from llmesh.types import Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc
from tests.fixtures.limiter import RedisProcess


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control.cli", "keys", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


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
            assert stored and key not in str(stored)
            with pytest.raises(Unauthenticated, match="invalid API key"):
                await authenticate(store, f"Bearer {key}x")
            with pytest.raises(Unauthenticated, match="missing API key"):
                await authenticate(store, None)
            with pytest.raises(Unauthenticated, match="malformed"):
                await authenticate(store, key)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_redis_down_is_unavailable_without_internal_detail() -> None:
    async def scenario() -> None:
        # Port 1 on loopback: nothing listens there.
        client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        try:
            with pytest.raises(Unavailable, match=r"^key store unavailable$"):
                await authenticate(RedisApiKeyStore(client), "Bearer lm-whatever")
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_cli_create_list_revoke(redis_url: str) -> None:
    key = cli("create", "--tier", "free", "--redis-url", redis_url).stdout.strip()
    assert key.startswith("lm-") and len(key) > 40
    digest = hash_key(key)
    sync = redis.Redis.from_url(redis_url)
    assert sync.hgetall(REDIS_KEY.format(digest=digest))[b"tier"] == b"free"

    made = json.loads(cli("create", "--tier", "paid", "--expires-in", "30d", "--json", "--redis-url", redis_url).stdout)
    expires = sync.hget(REDIS_KEY.format(digest=hash_key(made["key"])), "expires")
    assert expires is not None and abs(int(expires) - (time.time() + 30 * 86_400)) < 120
    assert made["id"] == hash_key(made["key"])[:16] and made["tier"] == "paid" and made["expires"].endswith("Z")
    # A record written before expiry, revocation and last_used existed.
    old_digest = hash_key("lm-from-an-older-release")
    sync.hset(REDIS_KEY.format(digest=old_digest), mapping={"tier": "enterprise", "created": "1700000000", "note": ""})

    listed = cli("list", "--json", "--redis-url", redis_url).stdout
    assert key not in listed and digest not in listed and made["key"] not in listed
    by_id = {k["id"]: k for k in json.loads(listed)}
    assert by_id[digest[:16]]["status"] == "active" and by_id[digest[:16]]["last_used"] is None
    assert by_id[made["id"]]["expires"] == made["expires"]
    assert by_id[old_digest[:16]] == {
        "id": old_digest[:16],
        "tier": "enterprise",
        "status": "active",
        "created": "2023-11-14T22:13:20Z",
        "last_used": None,
        "expires": None,
        "revoked": None,
        "note": "",
    }

    revoked = cli("revoke", digest[:16], "--redis-url", redis_url)
    assert f"revoked key {digest[:16]}" in revoked.stdout
    assert "already revoked" in cli("revoke", key, "--redis-url", redis_url).stdout
    table = cli("list", "--redis-url", redis_url).stdout
    row = next(line for line in table.splitlines() if line.startswith(digest[:16]))
    assert row.split()[2] == "revoked" and key not in table and digest not in table

    async def refused() -> None:
        client = aioredis.from_url(redis_url)
        try:
            with pytest.raises(Unauthenticated, match=r"^API key revoked$"):
                await authenticate(RedisApiKeyStore(client), f"Bearer {key}")
        finally:
            await client.aclose()

    asyncio.run(refused())

    for args, message in [
        (("revoke", "0123456789abcdef"), "no API key 0123456789abcdef"),
        (("revoke", "lm-not-a-key"), "no API key with that value"),
        (("revoke", "*"), "expected an API key"),
        (("create", "--tier", "free", "--expires", "yesterday"), "is neither a duration"),
        (("create", "--tier", "free", "--expires", "2001-01-01"), "not in the future"),
    ]:
        failed = cli(*args, "--redis-url", redis_url, check=False)
        assert failed.returncode == 1 and message in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
    down = cli("list", "--redis-url", "redis://127.0.0.1:1/0", check=False)
    assert down.returncode == 1 and "cannot use the key store" in down.stderr and "Traceback" not in down.stderr


def test_key_cache_with_real_redis_stopped_and_started(private_redis: RedisProcess) -> None:
    ttl_s = 0.5

    async def scenario() -> None:
        client = aioredis.from_url(private_redis.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        source = RedisApiKeyStore(client)
        store = CachedKeyStore(
            source,
            KeyCacheSettings(ttl_s=ttl_s, negative_ttl_s=0.2, max_stale_s=30, retry_s=0.3, last_used_interval_s=0),
        )
        try:
            key, other = await source.create(Tier.PAID), await source.create(Tier.FREE)
            await authenticate(store, f"Bearer {key}")
            await authenticate(store, f"Bearer {other}")
            # last_used is written in the background, by the gateway, never creating a record.
            for _ in range(50):
                if await client.hget(REDIS_KEY.format(digest=hash_key(key)), "last_used"):
                    break
                await asyncio.sleep(0.05)
            last_used = await client.hget(REDIS_KEY.format(digest=hash_key(key)), "last_used")
            assert last_used is not None and abs(int(last_used) - time.time()) < 5
            await source.touch(hash_key("lm-deleted"), int(time.time()))
            assert not await client.exists(REDIS_KEY.format(digest=hash_key("lm-deleted")))

            # Revoked: refused within the TTL (plus this loop's step), while the other key keeps working.
            _, changed = await revoke(client, hash_key(key)[:16], time.time())
            assert changed
            revoked_at = time.monotonic()
            while True:
                try:
                    await authenticate(store, f"Bearer {key}")
                except Unauthenticated as exc:
                    assert str(exc) == "API key revoked"
                    break
                assert time.monotonic() - revoked_at < ttl_s + 1.0, "revoked key still works after the TTL"
                await asyncio.sleep(0.02)
            await authenticate(store, f"Bearer {other}")

            # Redis stopped: the known key keeps working past its TTL, without a timeout per request; a key the
            # gateway never saw is 503 (cannot tell), not 401.
            private_redis.stop()
            await asyncio.sleep(ttl_s + 0.1)
            started = time.monotonic()
            for _ in range(20):
                assert (await authenticate(store, f"Bearer {other}")).tier is Tier.FREE
            assert time.monotonic() - started < 1.5
            assert store.stale_answers >= 1 and not store.store_ok
            with pytest.raises(Unauthenticated, match="revoked"):
                await authenticate(store, f"Bearer {key}")
            with pytest.raises(Unavailable, match=r"^key store unavailable$"):
                await authenticate(store, "Bearer lm-never-seen")

            # Redis back (empty: the private server keeps no data): the cache reads it again.
            private_redis.start()
            deadline = time.monotonic() + 5
            while True:
                try:
                    await authenticate(store, f"Bearer {other}")
                except Unauthenticated as exc:
                    assert str(exc) == "invalid API key"
                    break
                assert time.monotonic() < deadline, "the cache never read Redis again"
                await asyncio.sleep(0.1)
            assert store.store_ok
        finally:
            await store.aclose()
            await client.aclose()

    asyncio.run(scenario())


def list_models(target: str, key: str) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        try:
            chat_pb2_grpc.ChatServiceStub(channel).ListModels(
                chat_pb2.ListModelsRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=5
            )
        except grpc.RpcError as err:
            # Server-side failures (5xx) may end with the request id, for support.
            return err.code(), re.sub(r" \(request id [^)]*\)$", "", err.details() or "")
    return grpc.StatusCode.OK, ""


def passes_auth(target: str, key: str) -> bool:
    """With no router behind the gateway, an authenticated request fails later, at the router."""
    code, details = list_models(target, key)
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), (code, details)
    return code is grpc.StatusCode.UNAVAILABLE and details != "key store unavailable"


def test_gateway_process_caches_keys_through_a_redis_outage(private_redis: RedisProcess, tmp_path: Path) -> None:
    """A real gateway with a real Redis and no router: a request that passes authentication fails at the router,
    one that does not is UNAUTHENTICATED, or UNAVAILABLE "key store unavailable"."""
    sync = redis.Redis.from_url(private_redis.url)

    async def create(tier: Tier) -> str:
        client = aioredis.from_url(private_redis.url)
        try:
            return await RedisApiKeyStore(client).create(tier)
        finally:
            await client.aclose()

    key, doomed = asyncio.run(create(Tier.PAID)), asyncio.run(create(Tier.PAID))
    port = free_port()
    target = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "gateway", "--port", str(port), "--redis-url", private_redis.url]
    argv += ["--router-url", f"127.0.0.1:{free_port()}", "--key-cache-ttl-s", "1", "--key-store-retry-s", "0.3"]
    gateway = ManagedProcess("gateway", argv, tmp_path / "gateway.log")
    try:
        gateway.start().wait_ready(grpc_health_probe(target, "llmesh.v1.ChatService"), timeout=60)
        assert passes_auth(target, key) and passes_auth(target, doomed)
        assert list_models(target, "lm-made-up") == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")

        sync.hset(REDIS_KEY.format(digest=hash_key(doomed)), "revoked", str(int(time.time())))
        deadline = time.monotonic() + 1 + 1.0
        while list_models(target, doomed)[0] is not grpc.StatusCode.UNAUTHENTICATED:
            assert time.monotonic() < deadline, "revoked key still accepted after the key cache TTL"
            time.sleep(0.05)
        assert list_models(target, doomed) == (grpc.StatusCode.UNAUTHENTICATED, "API key revoked")

        private_redis.stop()
        time.sleep(1.2)  # past the TTL: the key is only in the cache now
        for _ in range(5):
            assert passes_auth(target, key)
        assert list_models(target, "lm-other") == (grpc.StatusCode.UNAVAILABLE, "key store unavailable")
    except BaseException:
        print(tail(tmp_path / "gateway.log"))
        raise
    finally:
        gateway.stop(grace=5)
