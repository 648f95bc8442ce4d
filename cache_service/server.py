"""gRPC wiring of the cache service: builds its dependencies, serves CacheService with health and reflection.

Health: "" is SERVING while the service answers (it answers misses while Redis is down, which is its contract);
"llmesh.v1.CacheService" follows Redis (NOT_SERVING while the cache is bypassed), for operators and probes: it is
set when the cache's circuit breaker opens or closes, not polled. SIGTERM turns both NOT_SERVING before draining.
"""

from __future__ import annotations

import logging
import os

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry
from threadpoolctl import threadpool_limits

from cache_service.config import CacheSettings
from cache_service.core import Answer, AnswerCache, CacheRequest, LookupResult
from cache_service.embedding import BatchingEmbedder
from cache_service.metrics import CacheMetrics
from cache_service.minilm_onnx import OnnxMiniLMEncoder
from cache_service.store import RedisBackend
from llmesh import grpc_util
from llmesh.convert import messages_from_pb, output_from_pb, sampling_from_pb, tier_from_pb, usage_from_pb, usage_to_pb
from llmesh.errors import InvalidRequest
from llmesh.metrics import serve_metrics
from llmesh.redis_auth import redis_auth
from llmesh.tls import TlsFiles, add_port
from llmesh.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


def request_from_pb(key: cache_pb2.CacheKey) -> CacheRequest:
    if not key.key_id:
        raise InvalidRequest("key.key_id is required: entries are scoped per API key")
    if not key.variant:
        raise InvalidRequest("key.variant is required")
    if not key.messages and not key.prompt:
        raise InvalidRequest("key.messages must hold at least one message (or key.prompt a raw prompt)")
    if not key.HasField("sampling"):
        raise InvalidRequest("key.sampling is required")
    return CacheRequest(
        key_id=key.key_id,
        tier=tier_from_pb(key.tier, "key.tier").value,
        variant=key.variant,
        messages=tuple(messages_from_pb(key.messages)),
        sampling=sampling_from_pb(key.sampling),
        output=output_from_pb(key.output, "key.output"),
        prompt=key.prompt,
    )


def lookup_to_pb(result: LookupResult) -> cache_pb2.CacheLookupResponse:
    reply = cache_pb2.CacheLookupResponse(
        store=result.store, flight_token=result.flight_token, in_flight=result.in_flight
    )
    if result.answer is not None:
        reply.hit = True
        reply.layer = result.layer
        reply.similarity = result.similarity
        reply.chunks.extend(result.answer.chunks)
        reply.finish_reason = result.answer.finish_reason
        reply.usage.CopyFrom(usage_to_pb(result.answer.usage))
    return reply


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: AnswerCache) -> None:
        self._cache = cache

    @grpc_util.unary_errors
    async def Lookup(
        self, request: cache_pb2.CacheLookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CacheLookupResponse:
        wait = request.max_wait_ms / 1000 if request.max_wait_ms else None
        result = await self._cache.lookup(request_from_pb(request.key), wait, wait_for_leader=not request.no_wait)
        return lookup_to_pb(result)

    @grpc_util.unary_errors
    async def Store(
        self, request: cache_pb2.CacheStoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CacheStoreResponse:
        answer = None
        if not request.failed:
            answer = Answer(tuple(request.chunks), request.finish_reason, usage_from_pb(request.usage))
        result = await self._cache.store(request_from_pb(request.key), answer, request.flight_token)
        return cache_pb2.CacheStoreResponse(result=result)

    @grpc_util.unary_errors
    async def Flush(
        self, request: cache_pb2.CacheFlushRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CacheFlushResponse:
        try:
            deleted = await self._cache.flush(request.key_id or None, public=request.public)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        return cache_pb2.CacheFlushResponse(deleted=deleted)


def build_embedder(settings: CacheSettings, metrics: CacheMetrics) -> BatchingEmbedder | None:
    if settings.semantic_threshold <= 0:
        return None
    try:
        encoder = OnnxMiniLMEncoder.from_wheel(settings.embed_threads)
    except FileNotFoundError as exc:
        raise SystemExit(f"semantic cache enabled (threshold {settings.semantic_threshold}) but {exc}") from exc

    def observe(size: int, seconds: float) -> None:
        metrics.embed_batch.observe(size)
        metrics.embed_seconds.observe(seconds)

    return BatchingEmbedder(encoder.encode, settings.embed_max_batch, settings.embed_max_delay_s, on_batch=observe)


async def serve(settings: CacheSettings) -> None:
    # One BLAS thread: whatever numpy multiplies here is small, and a second OpenBLAS thread spins after every
    # product. Measured with the numpy MiniLM: 24 ms of CPU per embedding with one thread, 88 ms with two (for 4 ms
    # less wall time), and that spinning took the cores from Triton's prefill.
    threadpool_limits(limits=1, user_api="blas")
    registry = CollectorRegistry()
    metrics = CacheMetrics(registry)
    tls = TlsFiles.of(settings)
    redis_options = redis_auth(settings, os.environ).client_options(settings.redis_url)
    backend = RedisBackend.from_url(settings.redis_url, settings.redis_timeout_s, **redis_options)
    embedder = build_embedder(settings, metrics)
    server = grpc.aio.server(options=grpc_util.server_options())
    health_servicer = grpc_util.add_health_and_reflection(server, [SERVICE_NAME])

    def report_backend(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        health_servicer.set(SERVICE_NAME, status)

    cache = AnswerCache(backend, settings, metrics, embedder, on_backend_change=report_backend)
    cache.start()
    await cache.probe()  # health starts from Redis' real state (the core logs an outage)
    cache_pb2_grpc.add_CacheServiceServicer_to_server(CacheServicer(cache), server)
    address = f"{settings.host}:{settings.port}"
    add_port(server, address, tls)
    await server.start()
    serve_metrics(registry, settings.host, settings.metrics_port)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    report_backend(cache.backend_up)
    log.info(
        "cache listening on %s, redis %s, ttl %.0fs, max %d bytes, semantic %s, metrics port %d",
        address,
        settings.redis_url,
        settings.ttl_s,
        settings.max_bytes,
        f"threshold {settings.semantic_threshold}" if embedder else "off",
        settings.metrics_port,
    )
    await grpc_util.wait_for_shutdown_signal()
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING from now on, whatever the breaker reports
    await server.stop(grace=settings.shutdown_grace_s)
    await cache.close()
    if embedder is not None:
        await embedder.close()
    await backend.close()
