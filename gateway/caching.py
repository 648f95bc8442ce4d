"""The gateway's `ResponseCache` over gRPC to the cache service (cache_service/, protos/llmesh/v1/cache.proto).

The cache is an optimization, never a dependency: if the service is down, slow or answers an error, lookups are
misses and stores are dropped, after a short deadline, and a circuit breaker keeps later requests from paying even
that until a cooldown has passed. Requests are always served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from gateway.pipeline import CachedAnswer
from llmesh.convert import messages_to_pb, sampling_to_pb, usage_from_pb, usage_to_pb
from llmesh.types import ChatRequest, Principal, RouteInfo
from llmesh.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)


class GrpcResponseCache:
    def __init__(
        self,
        target: str,
        timeout_s: float = 0.25,
        max_wait_s: float = 30.0,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)
        self._timeout_s = timeout_s
        # A lookup may wait for an identical in-flight request (single flight) up to this long.
        self._max_wait_s = max_wait_s
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._open_until = 0.0
        # Per in-flight miss: the single-flight token to hand back on store. Keyed by the request object, which
        # the pipeline passes to both lookup and store.
        self._pending: dict[int, str] = {}

    async def close(self) -> None:
        await self._channel.close()

    def _available(self) -> bool:
        return self._clock() >= self._open_until

    def _failed(self, op: str, err: grpc.RpcError) -> None:
        if self._available():
            code = err.code().name if hasattr(err, "code") else "?"
            log.warning("cache %s failed (%s); bypassing the cache for %.1fs", op, code, self._cooldown_s)
        self._open_until = self._clock() + self._cooldown_s

    @staticmethod
    def _key(principal: Principal, route: RouteInfo, request: ChatRequest) -> cache_pb2.CacheKey:
        return cache_pb2.CacheKey(
            key_id=principal.key_id,
            tier=principal.tier.value,
            variant=route.variant,
            messages=messages_to_pb(request.messages),
            sampling=sampling_to_pb(request.sampling),
        )

    async def lookup(self, principal: Principal, route: RouteInfo, request: ChatRequest) -> CachedAnswer | None:
        if not self._available():
            return None
        message = cache_pb2.CacheLookupRequest(
            key=self._key(principal, route, request), max_wait_ms=int(self._max_wait_s * 1000)
        )
        try:
            reply = await self._stub.Lookup(message, timeout=self._max_wait_s + self._timeout_s)
        except grpc.RpcError as err:
            self._failed("lookup", err)
            return None
        if reply.hit:
            return CachedAnswer(tuple(reply.chunks), reply.finish_reason, usage_from_pb(reply.usage), reply.layer)
        if reply.store:
            self._pending[id(request)] = reply.flight_token
        return None

    async def store(
        self, principal: Principal, route: RouteInfo, request: ChatRequest, answer: CachedAnswer | None
    ) -> None:
        token = self._pending.pop(id(request), None)
        if token is None or not self._available():
            return  # the lookup said not to store (not cacheable, bypassed) or the cache is unreachable
        message = cache_pb2.CacheStoreRequest(key=self._key(principal, route, request), flight_token=token)
        if answer is None:
            message.failed = True
        else:
            message.chunks.extend(answer.chunks)
            message.finish_reason = answer.finish_reason
            message.usage.CopyFrom(usage_to_pb(answer.usage))
        try:
            await self._stub.Store(message, timeout=self._timeout_s * 4)
        except grpc.RpcError as err:
            self._failed("store", err)
