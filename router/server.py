"""gRPC wiring of the router: builds its dependencies, serves RouterService with health and reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from llmesh import grpc_util
from llmesh.convert import messages_from_pb, route_from_pb, route_to_pb, sampling_from_pb, usage_to_pb
from llmesh.errors import InvalidRequest
from llmesh.metrics import serve_metrics
from llmesh.types import Tier
from llmesh.v1 import router_pb2, router_pb2_grpc
from router.config import RouterSettings
from router.load import LoadTracker
from router.metrics import PrometheusObserver
from router.policy import load_policy
from router.replicas import ReplicaPool, ReplicaState
from router.service import Router, Variant
from router.triton_client import TritonReplica

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def load_variants(repository: Path) -> dict[str, Variant]:
    """Every model in the Triton repository that the builder wrote llmesh metadata for."""
    from llmesh.model_artifact import ChatTokenizer

    variants: dict[str, Variant] = {}
    for meta in sorted(repository.glob("*/1/llmesh_model.json")):
        version_dir = meta.parent
        name = version_dir.parent.name
        tokenizer = ChatTokenizer.from_model_dir(version_dir)
        variants[name] = Variant(name=name, description=f"{name} on Triton", tokenizer=tokenizer)
    if not variants:
        raise SystemExit(f"no llmesh model variants under {repository}; build them with `llmesh build`")
    return variants


def _tier(name: str) -> Tier:
    try:
        return Tier(name)
    except ValueError as exc:
        raise InvalidRequest(f"unknown tier {name!r}") from exc


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    @grpc_util.unary_errors
    async def Prepare(
        self, request: router_pb2.PrepareRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PrepareResponse:
        prepared = self._router.prepare(
            _tier(request.tier), request.model, messages_from_pb(request.messages), sampling_from_pb(request.sampling)
        )
        return router_pb2.PrepareResponse(
            route=route_to_pb(prepared.route),
            prompt_tokens=len(prepared.input_ids),
            context_length=prepared.context_length,
        )

    @grpc_util.stream_errors
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateChunk]:
        events = self._router.generate(
            request_id=request.request_id,
            tier=_tier(request.tier),
            model=request.model,
            messages=messages_from_pb(request.messages),
            sampling=sampling_from_pb(request.sampling),
            route=route_from_pb(request.route) if request.HasField("route") else None,
        )
        async for event in events:
            chunk = router_pb2.GenerateChunk(delta=event.delta, finish_reason=event.finish_reason)
            if event.usage is not None:
                chunk.usage.CopyFrom(usage_to_pb(event.usage))
            if event.route is not None:
                chunk.route.CopyFrom(route_to_pb(event.route))
            yield chunk

    @grpc_util.unary_errors
    async def ListVariants(
        self, request: router_pb2.ListVariantsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListVariantsResponse:
        return router_pb2.ListVariantsResponse(
            variants=[
                router_pb2.Variant(
                    name=v.name, description=v.description, context_length=v.context_length, tiers=list(v.tiers)
                )
                for v in self._router.list_variants()
            ]
        )


async def serve(settings: RouterSettings) -> None:
    if settings.model_repository is None:
        raise SystemExit("--model-repository is required")
    variants = load_variants(settings.model_repository)
    policy = load_policy(settings.policy_file, list(variants), settings.default_variant)
    shared_urls, dedicated_urls = settings.replica_urls()
    replicas = [TritonReplica(url, settings.generate_timeout_s) for url in shared_urls + dedicated_urls]
    pool = ReplicaPool(ReplicaState(replica, dedicated=replica.name in dedicated_urls) for replica in replicas)
    load = LoadTracker()
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry, pool, load, list(policy.variants))
    router = Router(variants, policy, pool, load=load, observer=observer)
    serve_metrics(registry, settings.host, settings.metrics_port)

    server = grpc.aio.server(options=grpc_util.server_options())
    router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(router), server)
    health_servicer = grpc_util.add_health_and_reflection(server, [SERVICE_NAME])
    address = f"{settings.host}:{settings.port}"
    server.add_insecure_port(address)
    await pool.probe(list(variants))
    await server.start()
    health_task = asyncio.create_task(
        _check_replicas(pool, list(variants), health_servicer, settings.health_interval_s)
    )
    log.info(
        "router listening on %s, variants %s (smallest first), replicas %s, dedicated %s",
        address, list(policy.variants), shared_urls, dedicated_urls,
    )  # fmt: skip
    await grpc_util.wait_for_shutdown_signal()
    health_task.cancel()
    grpc_util.set_serving(health_servicer, [SERVICE_NAME], False)
    await server.stop(grace=10)
    for replica in replicas:
        await replica.close()


async def _check_replicas(
    pool: ReplicaPool, variants: list[str], health: health.HealthServicer, interval_s: float
) -> None:
    """Active health checks; the router is SERVING while at least one replica serves every variant."""
    while True:
        grpc_util.set_serving(health, [SERVICE_NAME], pool.healthy_count() > 0)
        await asyncio.sleep(interval_s)
        await pool.probe(variants)
