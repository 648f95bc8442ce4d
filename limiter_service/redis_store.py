"""The quota store in Redis (one server or a Redis Cluster): every operation is one Lua script, one round trip.

Keys: `llmesh:quota:{<subject>}:log|tok|act|rel`. The braces are a hash tag, so all of one subject's state sits in one
Cluster slot and a script can touch it atomically.

The hot path sends a pre-encoded EVALSHA on a pooled redis-py connection and reads one reply: redis-py's generic
`execute_command` (argument encoding, retry wrapper, observability hooks) costs more CPU than the script itself.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from limiter_service.store import Check, StoreUnavailable, WindowState

# RedisClusterException (cluster not reachable or not initialized) is not a RedisError.
_ERRORS = (RedisError, RedisClusterException, OSError)
_LUA_DIR = Path(__file__).resolve().parent / "lua"
RESERVE_LUA = (_LUA_DIR / "reserve.lua").read_text()
SETTLE_LUA = (_LUA_DIR / "settle.lua").read_text()
RELEASE_LUA = (_LUA_DIR / "release.lua").read_text()
RESERVE_SHA = hashlib.sha1(RESERVE_LUA.encode()).hexdigest()
SETTLE_SHA = hashlib.sha1(SETTLE_LUA.encode()).hexdigest()
RELEASE_SHA = hashlib.sha1(RELEASE_LUA.encode()).hexdigest()
_CHECK = struct.Struct("<11d")
_STATE = struct.Struct("<9d")
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
T = TypeVar("T")


def _encode_check(now_ms: int, c: Check, dry_run: bool) -> bytes:
    return _CHECK.pack(now_ms, *c, 1 if dry_run else 0)


@functools.lru_cache(maxsize=65536)
def _keys(subject: str) -> tuple[str, str, str, str]:
    if "{" in subject or "}" in subject:
        raise ValueError(f"subject {subject!r} must not contain braces (they delimit the hash tag)")
    prefix = f"llmesh:quota:{{{subject}}}:"
    return prefix + "log", prefix + "tok", prefix + "act", prefix + "rel"


def redis_keys(subject: str) -> list[str]:
    return list(_keys(subject))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@functools.lru_cache(maxsize=65536)
def _evalsha_head(sha: str, subject: str, n_args: int) -> bytes:
    """RESP for `EVALSHA sha 4 key1 key2 key3 key4`, followed by n_args more arguments."""
    keys = b"".join(_bulk(k.encode()) for k in _keys(subject))
    return b"*%d\r\n$7\r\nEVALSHA\r\n%s$1\r\n4\r\n%s" % (7 + n_args, _bulk(sha.encode()), keys)


def pack_evalsha(sha: str, subject: str, *args: bytes) -> bytes:
    return b"".join((_evalsha_head(sha, subject, len(args)), *map(_bulk, args)))


class NodeClient:
    """One Redis server: a redis.asyncio client, and its connection pool used directly for pre-encoded commands."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def run_packed(self, packed: bytes, asking: bool = False) -> Any:
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(_ASKING + packed if asking else packed, check_health=False)
            if asking:
                await conn.read_response()
            return await conn.read_response()
        except ResponseError:
            raise  # an error reply was read in full: the connection is fine
        except BaseException:
            # Timed out, cancelled or broken mid-reply: the rest of the reply must never reach its next user.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def aclose(self) -> None:
        await self.client.aclose()


def _client_options(timeout_s: float, auth: Mapping[str, Any]) -> dict[str, Any]:
    return {
        # Credentials (llmesh.redis_auth.RedisAuth.client_options): password, TLS files.
        **auth,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        # No retries: the socket timeouts then bound every call (connect, write, read) without an outer timer.
        "retry": Retry(NoBackoff(), 0),
        # RESP2 and no maintenance-notification handshake: one less round trip per new connection, and servers
        # that do not know the handshake (Redis 7.0) were seen closing the connection on it.
        "protocol": 2,
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }


class SingleRedis:
    """A single Redis server."""

    def __init__(self, url: str, timeout_s: float, auth: Mapping[str, Any] | None = None) -> None:
        self.node = NodeClient(aioredis.from_url(url, **_client_options(timeout_s, auth or {})))

    async def on_key(self, key: str, call: Callable[[NodeClient, bool], Awaitable[T]]) -> T:
        return await call(self.node, False)

    async def masters(self) -> list[NodeClient]:
        return [self.node]

    async def aclose(self) -> None:
        await self.node.aclose()


class SlotRouter:
    """A Redis Cluster as one ordinary client per master plus the slot map (CLUSTER SLOTS), following MOVED/ASK.

    redis-py's asyncio RedisCluster (8.1) was seen handing one connection to two concurrent commands under load
    (interleaved writes; the server then closes the connection); ordinary per-node clients do not do that. Every
    key this store sends in one command shares a hash tag, so routing by the first key is enough.
    """

    def __init__(self, url: str, timeout_s: float, auth: Mapping[str, Any] | None = None) -> None:
        parsed = urlparse(url)
        self._seed = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        # Every node gets the same credentials, and TLS when the seed's URL is rediss://.
        self._options = _client_options(timeout_s, auth or {})
        if parsed.scheme == "rediss":
            self._options["ssl"] = True
        self._nodes: dict[tuple[str, int], NodeClient] = {}
        self._starts: list[int] = []  # slot ranges, sorted by first slot
        self._ends: list[int] = []
        self._owners: list[tuple[str, int]] = []

    def _node(self, address: tuple[str, int]) -> NodeClient:
        node = self._nodes.get(address)
        if node is None:
            client = aioredis.Redis(host=address[0], port=address[1], **self._options)
            node = self._nodes[address] = NodeClient(client)
        return node

    async def _refresh(self) -> None:
        last: BaseException | None = None
        for address in dict.fromkeys([*self._owners, self._seed]):
            try:
                reply = await self._node(address).client.execute_command("CLUSTER", "SLOTS")
            except _ERRORS as exc:
                last = exc
                continue
            # Each entry: first slot, last slot, [host, port, ...] of its master (an empty host: the one asked).
            ranges = sorted((int(r[0]), int(r[1]), (_text(r[2][0]) or address[0], int(r[2][1]))) for r in reply)
            self._starts = [r[0] for r in ranges]
            self._ends = [r[1] for r in ranges]
            self._owners = [r[2] for r in ranges]
            return
        raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS: {last}")

    async def _node_for(self, key: str) -> NodeClient:
        if not self._starts:
            await self._refresh()
        slot = key_slot(key.encode())
        i = bisect.bisect_right(self._starts, slot) - 1
        if i < 0 or slot > self._ends[i]:
            self._starts = []
            raise RedisConnectionError(f"slot {slot} is not served by any node")
        return self._node(self._owners[i])

    async def on_key(self, key: str, call: Callable[[NodeClient, bool], Awaitable[T]]) -> T:
        node = await self._node_for(key)
        for _ in range(3):
            try:
                return await call(node, False)
            except MovedError:  # before AskError: MOVED is its subclass
                await self._refresh()
                node = await self._node_for(key)
            except AskError as exc:  # a slot in migration: ask its new owner once, ASKING first
                return await call(self._node((exc.host, int(exc.port))), True)
            except (ClusterDownError, TryAgainError) as exc:
                raise RedisConnectionError(str(exc)) from exc
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._starts = []  # a failover may have moved the slot: ask again next time
                raise
        raise RedisConnectionError(f"too many redirections for {key}")

    async def masters(self) -> list[NodeClient]:
        if not self._starts:
            await self._refresh()
        return [self._node(address) for address in dict.fromkeys(self._owners)]

    async def aclose(self) -> None:
        for node in self._nodes.values():
            await node.aclose()


def connect(
    url: str, cluster: bool, timeout_s: float, auth: Mapping[str, Any] | None = None
) -> SingleRedis | SlotRouter:
    """A client with short socket timeouts; it connects lazily, so building it never waits on Redis. `auth`: more
    redis-py client arguments, the credentials (llmesh.redis_auth.RedisAuth.client_options)."""
    return SlotRouter(url, timeout_s, auth) if cluster else SingleRedis(url, timeout_s, auth)


class RedisQuotaStore:
    def __init__(self, client: SingleRedis | SlotRouter) -> None:
        self._client = client
        self._single = client.node if isinstance(client, SingleRedis) else None

    async def close(self) -> None:
        await self._client.aclose()

    async def _script(self, script: str, subject: str, packed: bytes) -> Any:
        try:
            if self._single is not None:  # the hot path, without the routing layers a Cluster needs
                try:
                    return await self._single.run_packed(packed)
                except NoScriptError:  # a restarted Redis has no scripts
                    await self._single.client.script_load(script)
                    return await self._single.run_packed(packed)

            async def call(node: NodeClient, asking: bool) -> Any:
                try:
                    return await node.run_packed(packed, asking)
                except NoScriptError:  # a Cluster node that never saw the script
                    await node.client.script_load(script)
                    return await node.run_packed(packed, asking)

            return await self._client.on_key(_keys(subject)[0], call)
        except _ERRORS as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def check(self, subject: str, member: str, now_ms: int, check: Check, dry_run: bool = False) -> WindowState:
        packed = pack_evalsha(RESERVE_SHA, subject, member.encode(), _encode_check(now_ms, check, dry_run))
        reply = await self._script(RESERVE_LUA, subject, packed)
        v = _STATE.unpack(reply)
        return WindowState(v[0] == 1, *map(int, v[1:]))

    async def settle(self, subject: str, member: str, used_tokens: int, now_ms: int) -> bool:
        packed = pack_evalsha(SETTLE_SHA, subject, member.encode(), b"%d" % used_tokens, b"%d" % now_ms)
        reply = await self._script(SETTLE_LUA, subject, packed)
        return bool(int(reply))

    async def release(self, subject: str, member: str, now_ms: int, keep_ms: int) -> bool:
        packed = pack_evalsha(RELEASE_SHA, subject, member.encode(), b"%d" % now_ms, b"%d" % keep_ms)
        reply = await self._script(RELEASE_LUA, subject, packed)
        return bool(int(reply))

    async def reset(self, subject: str) -> None:
        keys = _keys(subject)

        async def delete(node: NodeClient, asking: bool) -> Any:
            return await node.client.delete(*keys)  # one slot, so one DEL works on a Cluster too

        try:
            await self._client.on_key(keys[0], delete)
        except _ERRORS as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        """Every master must answer: any one of them holds some subjects."""
        try:
            await asyncio.gather(*(node.client.ping() for node in await self._client.masters()))
        except _ERRORS as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
