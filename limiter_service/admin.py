"""`llmesh quota show KEY` and `llmesh quota reset KEY`: ask the running limiter, print a key's quotas.

KEY is an API key (`lm-...`) or its key id (the 16 hex digits logs print). The tier comes from the key store in
Redis unless --tier names it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmesh.apikeys import KEY_PREFIX, REDIS_KEY, hash_key, key_id_for
from llmesh.convert import tier_from_pb, tier_to_pb
from llmesh.tls import TlsFiles, aio_channel
from llmesh.types import Tier
from llmesh.v1 import limiter_pb2, limiter_pb2_grpc


class QuotaAdminError(Exception):
    pass


async def resolve_key(
    key: str, tier: str | None, redis_url: str, redis_options: Mapping[str, Any] | None = None
) -> tuple[str, str]:
    """(key id, tier) for an API key or a key id."""
    digest = hash_key(key) if key.startswith(KEY_PREFIX) else None
    key_id = key_id_for(digest) if digest else key
    if tier:
        return key_id, tier
    client = aioredis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=2.0, **(redis_options or {}))
    try:
        names = [REDIS_KEY.format(digest=digest)] if digest else []
        if not names:
            # A key id is a prefix of the stored hash.
            names = [n async for n in client.scan_iter(match=REDIS_KEY.format(digest=key_id) + "*", count=1000)]
        found = await client.hget(names[0], "tier") if names else None
    except (RedisError, OSError) as exc:
        raise QuotaAdminError(f"cannot read the key store at {redis_url} ({exc}); pass --tier") from exc
    finally:
        await client.aclose()
    if not found:
        raise QuotaAdminError(f"no API key {key_id} in the key store at {redis_url}; pass --tier to look anyway")
    return key_id, found.decode() if isinstance(found, bytes) else str(found)


def format_status(status: limiter_pb2.QuotaStatus, now_s: float | None = None) -> str:
    now_ms = (now_s if now_s is not None else time.time()) * 1000
    store = "Redis DOWN: showing this limiter's local view" if status.degraded else "Redis ok"
    lines = [
        f"key {status.key_id} ({tier_from_pb(status.tier).value} tier), budget {status.subject}; {store}; "
        f"on store failure: {status.on_store_failure}",
        f"  {'limit':<20} {'max':>10} {'remaining':>10}  resets",
    ]
    for q in status.quotas:
        resets = f"in {math.ceil((q.reset_unix_ms - now_ms) / 1000)} s" if q.reset_unix_ms > 0 else "-"
        lines.append(f"  {q.name:<20} {q.limit:>10} {q.remaining:>10}  {resets}")
    lines.append(f"  active reservations: {status.active_reservations}")
    return "\n".join(lines)


async def quota_command(
    action: str,
    key: str,
    tier: str | None,
    limiter_url: str,
    redis_url: str,
    tls: TlsFiles | None = None,
    redis_options: Mapping[str, Any] | None = None,
) -> int:
    """`tls`: a client certificate of the mesh, for a limiter that serves mutual TLS; `redis_options`: the key
    store's credentials (llmesh.redis_auth.RedisAuth.client_options)."""
    try:
        key_id, tier_name = await resolve_key(key, tier, redis_url, redis_options)
    except QuotaAdminError as exc:
        print(f"llmesh: {exc}", file=sys.stderr)
        return 1
    try:
        tier_pb = tier_to_pb(Tier(tier_name))
    except ValueError:
        print(f"llmesh: key {key_id} has an unknown tier {tier_name!r}", file=sys.stderr)
        return 1
    request = limiter_pb2.GetQuotaRequest(key_id=key_id, tier=tier_pb)
    async with aio_channel(limiter_url, tls) as channel:
        stub = limiter_pb2_grpc.LimiterServiceStub(channel)
        try:
            if action == "reset":
                status = await stub.ResetQuota(request, timeout=5.0)
                print(f"reset {status.subject}")
            else:
                status = await stub.GetQuota(request, timeout=5.0)
        except grpc.RpcError as err:
            print(f"llmesh: limiter at {limiter_url}: {err.code().name}: {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    print(format_status(status))
    return 0
