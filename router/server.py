"""gRPC wiring of the router: builds its dependencies, serves RouterService with health and reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from llmesh import grpc_util
from llmesh.types import ChatMessage, SamplingParams, Tier
from llmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.config import RouterSettings
from router.policy import RoutingPolicy
from router.service import Router, Variant
from router.triton_client import TritonTokenSource

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def load_variants(repository: Path) -> dict[str, Variant]:
    """Every model in the Triton repository that the builder wrote llmesh metadata for."""
    from triton_models.tokenizer import ChatTokenizer

    variants: dict[str, Variant] = {}
    for meta in sorted(repository.glob("*/1/llmesh_model.json")):
        version_dir = meta.parent
        name = version_dir.parent.name
        tokenizer = ChatTokenizer.from_model_dir(version_dir)
        variants[name] = Variant(name=name, description=f"{name} on Triton", tokenizer=tokenizer)
    if not variants:
        raise SystemExit(f"no llmesh model variants under {repository}; build them with `llmesh build`")
    return variants


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    @grpc_util.stream_errors
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateChunk]:
        sampling = request.sampling
        events = self._router.generate(
            request_id=request.request_id,
            tier=Tier(request.tier) if request.tier in Tier._value2member_map_ else Tier.FREE,
            model=request.model,
            messages=[ChatMessage(m.role, m.content) for m in request.messages],
            sampling=SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed if sampling.HasField("seed") else None,
                stop=tuple(sampling.stop),
            ),
        )
        async for event in events:
            chunk = router_pb2.GenerateChunk(delta=event.delta, finish_reason=event.finish_reason)
            if event.usage is not None:
                chunk.usage.CopyFrom(
                    common_pb2.Usage(
                        prompt_tokens=event.usage.prompt_tokens,
                        completion_tokens=event.usage.completion_tokens,
                        total_tokens=event.usage.total_tokens,
                    )
                )
            if event.route is not None:
                chunk.route.CopyFrom(common_pb2.RouteInfo(variant=event.route.variant, reason=event.route.reason))
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
    policy = RoutingPolicy.open_to_all(list(variants), settings.default_variant)
    tokens = TritonTokenSource(settings.triton_url, settings.generate_timeout_s)
    router = Router(variants, policy, tokens)

    server = grpc.aio.server(options=grpc_util.server_options())
    router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(router), server)
    health = grpc_util.add_health_and_reflection(server, [SERVICE_NAME])
    address = f"{settings.host}:{settings.port}"
    server.add_insecure_port(address)
    await server.start()
    # Serving only once Triton has every variant loaded: the launcher and Envoy read this.
    health_task = asyncio.create_task(_track_triton_health(tokens, list(variants), health))
    log.info("router listening on %s, variants %s, triton %s", address, list(variants), settings.triton_url)
    await grpc_util.wait_for_shutdown_signal()
    grpc_util.set_serving(health, [SERVICE_NAME], False)
    health_task.cancel()
    await server.stop(grace=10)
    await tokens.close()


async def _track_triton_health(tokens: TritonTokenSource, variants: list[str], health: object) -> None:
    while True:
        try:
            ready = all([await tokens.ready(v) for v in variants])
        except grpc.RpcError:
            ready = False
        grpc_util.set_serving(health, [SERVICE_NAME], ready)  # type: ignore[arg-type]
        await asyncio.sleep(2.0)
