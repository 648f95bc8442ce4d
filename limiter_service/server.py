"""gRPC wiring of the limiter: builds its parts, serves llmesh.v1.LimiterService and Envoy's RateLimitService
(envoy.service.ratelimit.v3) with health, reflection and Prometheus metrics.

Health: "" and both services are SERVING while the limiter answers, also while Redis is down (each tier then does
what its on_store_failure says); the health entry "redis" is SERVING only while Redis answers (circuit closed). It
is set when the circuit opens or closes, not polled. SIGTERM turns every entry NOT_SERVING before draining.
"""

from __future__ import annotations

import asyncio
import logging
import os

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from limiter_service.config import LimiterSettings
from limiter_service.core import Decision, Limiter, QuotaStatus, QuotaView
from limiter_service.loop_lag import LoopLagMonitor
from limiter_service.metrics import LimiterMetrics
from limiter_service.policy import DEFAULT_POLICY_FILE, PolicySource
from limiter_service.redis_store import RedisQuotaStore, connect
from llmesh import grpc_util
from llmesh.convert import tier_from_pb, tier_to_pb
from llmesh.errors import DeadlineExceeded
from llmesh.logs import REQUEST_ID
from llmesh.metrics import serve_metrics
from llmesh.redis_auth import redis_auth
from llmesh.tls import TlsFiles, add_port
from llmesh.v1 import limiter_pb2, limiter_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = limiter_pb2.DESCRIPTOR.services_by_name["LimiterService"].full_name
RLS_SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
REDIS_HEALTH = "redis"


def _quotas_pb(views: tuple[QuotaView, ...]) -> list[limiter_pb2.QuotaState]:
    return [
        limiter_pb2.QuotaState(name=v.name, limit=v.limit, remaining=v.remaining, reset_unix_ms=v.reset_unix_ms)
        for v in views
    ]


def _status_pb(s: QuotaStatus) -> limiter_pb2.QuotaStatus:
    return limiter_pb2.QuotaStatus(
        key_id=s.key_id,
        tier=tier_to_pb(s.tier),
        subject=s.subject,
        quotas=_quotas_pb(s.quotas),
        active_reservations=s.active,
        degraded=s.degraded,
        on_store_failure=s.on_store_failure.value,
    )


def _decision_pb(d: Decision) -> limiter_pb2.ReserveResponse:
    return limiter_pb2.ReserveResponse(
        allowed=d.allowed,
        reservation_id=d.reservation_id,
        refused_by=d.refused_by,
        retry_after_ms=d.retry_after_ms,
        quotas=_quotas_pb(d.quotas),
        message=d.message,
        degraded=d.degraded,
    )


class LimiterServicer(limiter_pb2_grpc.LimiterServiceServicer):
    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    @grpc_util.unary_errors
    async def Reserve(
        self, request: limiter_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> limiter_pb2.ReserveResponse:
        REQUEST_ID.set(request.request_id)  # so a refusal's log line carries the gateway's request id
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # The caller has given up (this process was stalled or stopped meanwhile): admitting now would only
            # leave a reservation for its release to undo.
            raise DeadlineExceeded("the caller's deadline passed before the limiter got to this request")
        decision = await self._limiter.reserve(
            request.key_id, tier_from_pb(request.tier).value, request.prompt_tokens, request.max_tokens, request.nonce
        )
        return _decision_pb(decision)

    @grpc_util.unary_errors
    async def Settle(
        self, request: limiter_pb2.SettleRequest, context: grpc.aio.ServicerContext
    ) -> limiter_pb2.SettleResponse:
        settled = await self._limiter.settle(request.reservation_id, request.used_tokens)
        return limiter_pb2.SettleResponse(settled=settled)

    @grpc_util.unary_errors
    async def Release(
        self, request: limiter_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> limiter_pb2.ReleaseResponse:
        REQUEST_ID.set(request.request_id)
        released = await self._limiter.release(request.key_id, tier_from_pb(request.tier).value, request.nonce)
        return limiter_pb2.ReleaseResponse(released=released)

    @grpc_util.unary_errors
    async def GetQuota(
        self, request: limiter_pb2.GetQuotaRequest, context: grpc.aio.ServicerContext
    ) -> limiter_pb2.QuotaStatus:
        return _status_pb(await self._limiter.status(request.key_id, tier_from_pb(request.tier).value))

    @grpc_util.unary_errors
    async def ResetQuota(
        self, request: limiter_pb2.GetQuotaRequest, context: grpc.aio.ServicerContext
    ) -> limiter_pb2.QuotaStatus:
        status = await self._limiter.reset(request.key_id, tier_from_pb(request.tier).value)
        log.info("quota reset for %s (%s)", status.subject, status.tier.value)
        return _status_pb(status)


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Envoy's rate limit protocol: per-IP and per-key request limits at the edge."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    @grpc_util.unary_errors
    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        descriptors = [[(e.key, e.value) for e in d.entries] for d in request.descriptors]
        decision = await self._limiter.edge_check(descriptors, request.hits_addend or 1)
        code = rls_pb2.RateLimitResponse.Code
        reply = rls_pb2.RateLimitResponse(overall_code=code.OVER_LIMIT if decision.over else code.OK)
        for status in decision.statuses:
            item = reply.statuses.add(code=code.OVER_LIMIT if status.over else code.OK)
            if status.limit >= 0:
                item.current_limit.requests_per_unit = status.limit
                item.current_limit.unit = rls_pb2.RateLimitResponse.RateLimit.Unit.MINUTE
                item.limit_remaining = status.remaining
                item.duration_until_reset.FromMilliseconds(status.reset_ms)
        reply.response_headers_to_add.extend(base_pb2.HeaderValue(key=k, value=v) for k, v in decision.headers)
        return reply


async def _reload_policy(policy: PolicySource, metrics: LimiterMetrics, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        result = policy.reload_if_changed()
        if result is not None:
            metrics.policy_reloads.labels("applied" if result else "refused").inc()


async def serve(settings: LimiterSettings) -> None:
    policy = PolicySource(settings.policy_file or DEFAULT_POLICY_FILE)
    registry = CollectorRegistry()
    metrics = LimiterMetrics(registry)
    tls = TlsFiles.of(settings)
    redis_options = redis_auth(settings, os.environ).client_options(settings.redis_url)
    store = RedisQuotaStore(
        connect(settings.redis_url, settings.redis_cluster, settings.redis_timeout_s, redis_options)
    )
    server = grpc.aio.server(options=grpc_util.server_options())
    health_servicer = grpc_util.add_health_and_reflection(server, [SERVICE_NAME, RLS_SERVICE_NAME])

    def report_redis(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        health_servicer.set(REDIS_HEALTH, status)

    loop_monitor = LoopLagMonitor()
    limiter = Limiter(
        policy,
        store,
        metrics=metrics,
        breaker_failures=settings.breaker_failures,
        # Open until the first probe answers: a limiter started while Redis is down serves at once, per policy.
        open_at_start=True,
        on_store_change=report_redis,
        # A single Redis client bounds each call by its socket timeouts (no retries); a Cluster client may walk
        # several nodes, so the limiter bounds the whole call.
        store_timeout_s=settings.redis_timeout_s if settings.redis_cluster else None,
        lease_s=settings.lease_s,
        loop_monitor=loop_monitor,
    )
    if not await limiter.probe_store():
        log.error("Redis at %s does not answer; serving in degraded mode until it does", settings.redis_url)

    limiter_pb2_grpc.add_LimiterServiceServicer_to_server(LimiterServicer(limiter), server)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(limiter), server)
    address = f"{settings.host}:{settings.port}"
    add_port(server, address, tls)
    serve_metrics(registry, settings.host, settings.metrics_port)
    await server.start()
    # The background work, cancelled and awaited on shutdown. watch_store is the one place Redis is probed (and
    # pinged while up, so an outage shows without traffic); health follows the circuit through report_redis.
    tasks = [
        asyncio.create_task(loop_monitor.run()),
        asyncio.create_task(limiter.watch_store(settings.breaker_probe_s)),
        asyncio.create_task(_reload_policy(policy, metrics, settings.policy_reload_s)),
    ]
    grpc_util.set_serving(health_servicer, [SERVICE_NAME, RLS_SERVICE_NAME], True)
    log.info(
        "limiter listening on %s, redis %s%s, policy %s, metrics port %s",
        address,
        settings.redis_url,
        " (cluster)" if settings.redis_cluster else "",
        policy.path,
        settings.metrics_port or "off",
    )
    await grpc_util.wait_for_shutdown_signal()
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING from now on, whatever the circuit does while draining
    await server.stop(grace=settings.shutdown_grace_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if limiter.pending_settlements or limiter.pending_releases:
        await limiter.probe_store()  # one last try: replays what is pending if Redis answers now
    if limiter.pending_settlements or limiter.pending_releases:
        log.warning(
            "%d settlements and %d releases never reached Redis; those reservations stay charged in full until "
            "their leases end",
            limiter.pending_settlements,
            limiter.pending_releases,
        )
    await store.close()
