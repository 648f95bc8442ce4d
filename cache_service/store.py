"""Where cache entries live: the `CacheBackend` protocol and its Redis implementation. No gRPC here.

Redis layout (see keys.py for names; <tag> is a hash of the scope):
- llmesh:cache:<tag>:e:<digest>   an entry (JSON), with a Redis TTL as a backstop to the entry's own expiry
- llmesh:cache:<tag>:f:<digest>   single-flight lock: the token of the request generating that entry
- llmesh:cache:<tag>:s:<bucket>   semantic index of one bucket: a list of (digest, embedding); `...:g` its generation
- llmesh:cache:lru / sizes / bytes  last access per entry (sorted set), size per entry (hash), total size
- channel llmesh:cache:done       an entry name, published when its single-flight lock is released

Every multi-step change is one Lua script, so concurrent gateways and cache replicas never see half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from cache_service.keys import BYTES_KEY, DONE_CHANNEL, LRU_KEY, PREFIX, SIZES_KEY

log = logging.getLogger(__name__)

# Per entry, on top of key and value bytes: Redis' own overhead plus the LRU and size records.
ENTRY_OVERHEAD_BYTES = 160


class BackendError(Exception):
    """The backend did not answer (down, timed out, refused). The cache treats it as a bypass, never as an error."""


@dataclass(frozen=True)
class IndexRead:
    generation: str
    length: int
    # True: `items` is the whole index (the generation changed or it shrank); False: items after `since`.
    full: bool
    items: list[bytes]


class CacheBackend(Protocol):
    async def ping(self) -> None:
        """Return if the backend answers; raise BackendError otherwise (the probe while the cache is bypassed)."""
        ...

    async def get(self, entry: str, now_ms: int) -> bytes | None:
        """The entry's value, marking it recently used."""
        ...

    async def get_or_lock(self, entry: str, lock: str, token: str, lease_ms: int) -> tuple[bytes | None, bool]:
        """Atomically: the entry if present, else take the lock if free. Returns (value, lock_taken)."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def put(self, entry: str, value: bytes, ttl_ms: int, now_ms: int, max_bytes: int) -> int:
        """Store, then evict least recently used entries until the total is under max_bytes; returns evictions."""
        ...

    async def delete(self, entry: str) -> None: ...

    async def release(self, lock: str, token: str, entry: str) -> None:
        """Drop the lock if `token` holds it, and tell every waiter that `entry` is settled (stored or not)."""
        ...

    async def listen(self, on_done: Callable[[str], None]) -> None:
        """Call on_done(entry) for each release, from any replica, until cancelled."""
        ...

    async def flush(self, prefix: str | None) -> int:
        """Delete every cache key under `prefix` (one scope), or all of the cache's keys; returns keys deleted."""
        ...

    async def index_read(self, bucket: str, since: int, generation: str) -> IndexRead: ...

    async def index_add(self, bucket: str, item: bytes, max_entries: int, ttl_ms: int) -> None: ...


_GET = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('ZADD', KEYS[2], 'XX', ARGV[1], KEYS[1]) end
return v
"""

_GET_OR_LOCK = """
local v = redis.call('GET', KEYS[1])
if v then return {v, 0} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 1} end
return {false, 0}
"""

# KEYS: entry, lru, sizes, bytes. ARGV: value, ttl_ms, now_ms, max_bytes, overhead.
# Entries whose last access is older than the TTL are certainly expired: those go first, a few per store.
_PUT = """
local size = string.len(ARGV[1]) + string.len(KEYS[1]) + tonumber(ARGV[5])
local old = redis.call('HGET', KEYS[3], KEYS[1])
if old then redis.call('DECRBY', KEYS[4], old) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
local total = redis.call('INCRBY', KEYS[4], size)
local evicted = 0
local function drop(k)
  local s = redis.call('HGET', KEYS[3], k)
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[2], k)
  redis.call('DEL', k)
  if s then total = redis.call('DECRBY', KEYS[4], s) end
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[2]), 'LIMIT', 0, 8)
for _, k in ipairs(stale) do drop(k) end
while total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  drop(oldest[1])
  evicted = evicted + 1
end
return evicted
"""

# KEYS: entry, lru, sizes, bytes
_DELETE = """
local s = redis.call('HGET', KEYS[3], KEYS[1])
redis.call('HDEL', KEYS[3], KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
if s then redis.call('DECRBY', KEYS[4], s) end
return redis.call('DEL', KEYS[1])
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS: list, generation. ARGV: since, known generation.
_INDEX_READ = """
local gen = redis.call('GET', KEYS[2]) or ''
local n = redis.call('LLEN', KEYS[1])
local start = tonumber(ARGV[1])
local full = 0
if gen ~= ARGV[2] or n < start then start = 0; full = 1 end
if start >= n then return {gen, n, full, {}} end
return {gen, n, full, redis.call('LRANGE', KEYS[1], start, -1)}
"""

# KEYS: list, generation. ARGV: item, max entries, ttl_ms, a fresh generation id.
# A new generation (first add, or a trim that shifts positions) makes readers reload the whole list.
_INDEX_ADD = """
if not redis.call('GET', KEYS[2]) then redis.call('SET', KEYS[2], ARGV[4]) end
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
local max = tonumber(ARGV[2])
if n > 2 * max then
  redis.call('LTRIM', KEYS[1], -max, -1)
  redis.call('SET', KEYS[2], ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return n
"""

# KEYS: lru, sizes, bytes. ARGV: entry names of one scope, being flushed.
_FORGET = """
for _, k in ipairs(ARGV) do
  local s = redis.call('HGET', KEYS[2], k)
  if s then redis.call('DECRBY', KEYS[3], s); redis.call('HDEL', KEYS[2], k) end
  redis.call('ZREM', KEYS[1], k)
end
return #ARGV
"""


def redis_client(url: str, timeout_s: float, **options: Any) -> aioredis.Redis:
    """`options`: more redis-py client arguments (credentials: llmesh.redis_auth.RedisAuth.client_options)."""
    # No retries: redis-py's default retries with backoff would turn one dead Redis into seconds per request.
    return aioredis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **options
    )


class RedisBackend:
    def __init__(self, client: aioredis.Redis, listen_client: aioredis.Redis | None = None) -> None:
        self._redis = client
        # Pub/sub holds its connection open and blocks on it: it needs a client without a read timeout.
        self._listen_redis = listen_client
        self._get = client.register_script(_GET)
        self._get_or_lock = client.register_script(_GET_OR_LOCK)
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._release = client.register_script(_RELEASE)
        self._index_read = client.register_script(_INDEX_READ)
        self._index_add = client.register_script(_INDEX_ADD)
        self._forget = client.register_script(_FORGET)

    @classmethod
    def from_url(cls, url: str, timeout_s: float, **options: Any) -> RedisBackend:
        listen = aioredis.from_url(url, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **options)
        return cls(redis_client(url, timeout_s, **options), listen)

    async def close(self) -> None:
        await self._redis.aclose()
        if self._listen_redis is not None:
            await self._listen_redis.aclose()

    async def _call(self, what: Any) -> Any:
        try:
            return await what
        except (TimeoutError, RedisError, OSError) as exc:
            raise BackendError(f"redis: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def get(self, entry: str, now_ms: int) -> bytes | None:
        value = await self._call(self._get(keys=[entry, LRU_KEY], args=[now_ms]))
        return bytes(value) if value is not None else None

    async def get_or_lock(self, entry: str, lock: str, token: str, lease_ms: int) -> tuple[bytes | None, bool]:
        value, taken = await self._call(self._get_or_lock(keys=[entry, lock], args=[token, lease_ms]))
        return (bytes(value) if value else None), bool(taken)

    async def exists(self, key: str) -> bool:
        return bool(await self._call(self._redis.exists(key)))

    async def put(self, entry: str, value: bytes, ttl_ms: int, now_ms: int, max_bytes: int) -> int:
        return int(
            await self._call(
                self._put(
                    keys=[entry, LRU_KEY, SIZES_KEY, BYTES_KEY],
                    args=[value, ttl_ms, now_ms, max_bytes, ENTRY_OVERHEAD_BYTES],
                )
            )
        )

    async def delete(self, entry: str) -> None:
        await self._call(self._delete(keys=[entry, LRU_KEY, SIZES_KEY, BYTES_KEY]))

    async def release(self, lock: str, token: str, entry: str) -> None:
        await self._call(self._release(keys=[lock], args=[token, DONE_CHANNEL, entry]))

    async def listen(self, on_done: Callable[[str], None]) -> None:
        """Reconnects after failures; waiters also poll, so a gap here delays them but never strands them."""
        client = self._listen_redis or self._redis
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(DONE_CHANNEL)
                async for message in pubsub.listen():
                    data = message.get("data")
                    if isinstance(data, bytes):
                        on_done(data.decode())
            except (RedisError, OSError) as exc:
                log.debug("cache release listener: %s; reconnecting", exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(1.0)

    async def flush(self, prefix: str | None) -> int:
        pattern = (prefix or PREFIX) + "*"
        deleted = 0
        cursor = 0
        while True:
            cursor, names = await self._call(self._redis.scan(cursor=cursor, match=pattern, count=500))
            names = [n.decode() if isinstance(n, bytes) else n for n in names]
            if names:
                entries = [n for n in names if ":e:" in n]
                if prefix is not None and entries:
                    await self._call(self._forget(keys=[LRU_KEY, SIZES_KEY, BYTES_KEY], args=entries))
                deleted += int(await self._call(self._redis.unlink(*names)))
            if cursor == 0:
                return deleted

    async def index_read(self, bucket: str, since: int, generation: str) -> IndexRead:
        gen, length, full, items = await self._call(
            self._index_read(keys=[bucket, bucket + ":g"], args=[since, generation])
        )
        return IndexRead(
            generation=gen.decode() if isinstance(gen, bytes) else str(gen),
            length=int(length),
            full=bool(full),
            items=[bytes(i) for i in items],
        )

    async def index_add(self, bucket: str, item: bytes, max_entries: int, ttl_ms: int) -> None:
        await self._call(
            self._index_add(keys=[bucket, bucket + ":g"], args=[item, max_entries, ttl_ms, uuid.uuid4().hex])
        )
