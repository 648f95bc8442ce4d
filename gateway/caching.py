"""The gateway's `CacheClient` over gRPC to the cache service (cache_service/, protos/llmesh/v1/cache.proto).

The cache is an optimization, never a dependency: if the service is down, hung or answers an error, lookups are
misses and stores are dropped, and the mesh's circuit breaker (llmesh/breaker.py) keeps later requests from paying
even that until a cooldown has passed. Requests are always served.

A lookup may legitimately take long (it waits for an identical request in flight, single flight), so its deadline
is long; a hung cache is told apart from a waiting one by the watchdog (llmesh/budgets.py): a lookup or store
unanswered after `hang_budget_s / 2` is followed by a health check, and if that stays unanswered for the other half
too, the call is abandoned. A stopped cache thus costs a request at most `hang_budget_s`, once per cooldown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from gateway.pipeline import NO_STORE, CachedAnswer, CacheLookup
from llmesh.breaker import BreakerState, CircuitBreaker
from llmesh.budgets import CHANNEL_OPTIONS, DependencyHung, Watchdog, health_probe
from llmesh.convert import messages_to_pb, output_to_pb, sampling_to_pb, tier_to_pb, usage_from_pb, usage_to_pb
from llmesh.tls import TlsFiles, aio_channel
from llmesh.types import ChatRequest, Principal, RouteInfo
from llmesh.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)


class GrpcCacheClient:
    def __init__(
        self,
        target: str,
        timeout_s: float = 0.25,
        max_wait_s: float = 30.0,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        tls: TlsFiles | None = None,
        hang_budget_s: float = 0.2,
    ) -> None:
        self._channel = aio_channel(target, tls, CHANNEL_OPTIONS)
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._watchdog = Watchdog.with_budget("the cache", health_probe(self._channel), hang_budget_s)
        # A lookup may wait for an identical in-flight request (single flight) up to this long.
        self._max_wait_s = max_wait_s
        self._cooldown_s = cooldown_s
        # One failed call opens it: a cache that does not answer costs a request a deadline at most once per
        # cooldown (the half-open probe), never a failure.
        self.breaker = CircuitBreaker(cooldown_s, failure_threshold=1, clock=clock, on_change=self._changed)

    async def close(self) -> None:
        await self._channel.close()

    def _changed(self, state: BreakerState, reason: str) -> None:
        if state is BreakerState.OPEN:
            log.warning("cache call failed (%s); bypassing the cache for %.1fs", reason, self._cooldown_s)
        elif state is BreakerState.CLOSED:
            log.info("cache answers again; using it")

    def _failed(self, op: str, err: grpc.RpcError | DependencyHung) -> None:
        if isinstance(err, DependencyHung):
            self.breaker.record_failure(f"{op}: {err}")
            return
        code = err.code().name if hasattr(err, "code") else "?"
        self.breaker.record_failure(f"{op}: {code}")

    @staticmethod
    def _key(principal: Principal, route: RouteInfo, request: ChatRequest) -> cache_pb2.CacheKey:
        """Everything that changes the answer: the variant, the messages (or raw prompt), every sampling field
        (penalties, logit_bias, stop token ids included) and the output spec (tools, tool choice, response format)."""
        return cache_pb2.CacheKey(
            key_id=principal.key_id,
            tier=tier_to_pb(principal.tier),
            variant=route.variant,
            messages=messages_to_pb(request.messages),
            sampling=sampling_to_pb(request.sampling),
            output=output_to_pb(request.output),
            prompt=request.prompt,
        )

    async def lookup(
        self, principal: Principal, route: RouteInfo, request: ChatRequest, wait: bool = True
    ) -> CacheLookup:
        if not self.breaker.allow():
            return NO_STORE
        message = cache_pb2.CacheLookupRequest(
            key=self._key(principal, route, request), max_wait_ms=int(self._max_wait_s * 1000), no_wait=not wait
        )
        deadline_s = self._max_wait_s + self._timeout_s if wait else self._timeout_s * 4
        try:
            reply = await self._watchdog.call(self._stub.Lookup(message, timeout=deadline_s))
        except (grpc.RpcError, DependencyHung) as err:
            self._failed("lookup", err)
            return NO_STORE
        self.breaker.record_success()
        if reply.hit:
            answer = CachedAnswer(tuple(reply.chunks), reply.finish_reason, usage_from_pb(reply.usage), reply.layer)
            return CacheLookup(answer=answer)
        return CacheLookup(store=reply.store, flight_token=reply.flight_token, in_flight=reply.in_flight)

    async def store(
        self,
        principal: Principal,
        route: RouteInfo,
        request: ChatRequest,
        lookup: CacheLookup,
        answer: CachedAnswer | None,
    ) -> None:
        if not lookup.store or not self.breaker.allow():
            return  # the lookup said not to store (hit, not cacheable, bypassed) or the cache is unreachable
        key = self._key(principal, route, request)
        message = cache_pb2.CacheStoreRequest(key=key, flight_token=lookup.flight_token)
        if answer is None:
            message.failed = True
        else:
            message.chunks.extend(answer.chunks)
            message.finish_reason = answer.finish_reason
            message.usage.CopyFrom(usage_to_pb(answer.usage))
        try:
            await self._watchdog.call(self._stub.Store(message, timeout=self._timeout_s * 4))
        except (grpc.RpcError, DependencyHung) as err:
            self._failed("store", err)
            return
        self.breaker.record_success()
