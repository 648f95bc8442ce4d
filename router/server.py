"""gRPC wiring of the router: builds its dependencies, serves RouterService with health and reflection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from llmesh import grpc_util
from llmesh.convert import (
    logprobs_to_pb,
    messages_from_pb,
    output_from_pb,
    prepared_from_pb,
    prepared_to_pb,
    route_to_pb,
    sampling_from_pb,
    tier_from_pb,
    tiers_to_pb,
    tool_calls_to_pb,
    usage_to_pb,
)
from llmesh.errors import Unavailable
from llmesh.metrics import serve_metrics
from llmesh.tls import TlsFiles, add_port
from llmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.config import RouterSettings
from router.discovery import MembershipListener, PoolMembership, ReplicaDiscovery, SystemResolver
from router.embeddings import EmbeddingService
from router.embeddings import from_repository as embeddings_from_repository
from router.load import LoadTracker
from router.metrics import PrometheusObserver
from router.policy import load_policy
from router.replicas import ReplicaPool
from router.service import Router, Variant
from router.triton_client import TritonReplica

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def load_variants(repository: Path) -> dict[str, Variant]:
    """Every model in the Triton repository that the builder wrote llmesh metadata for."""
    from llmesh.model_artifact import TOKENIZER_FILE, ChatTokenizer

    variants: dict[str, Variant] = {}
    for meta in sorted(repository.glob("*/1/llmesh_model.json")):
        version_dir = meta.parent
        name = version_dir.parent.name
        tokenizer = ChatTokenizer.from_model_dir(version_dir)
        # The token -> bytes table of logprobs, built now: built on the first logprobs request it held the event loop
        # for ~2 s (152k tokens on a loaded machine), past the gateway's budget for the router.
        tokenizer.token_bytes(0)
        # What decides a chat's ids: the tokenizer file, the chat template and the special tokens it renders.
        rendering = (tokenizer.metadata.chat_template, tokenizer.metadata.bos_token, tokenizer.metadata.eos_token)
        digest = hashlib.sha256((version_dir / TOKENIZER_FILE).read_bytes())
        digest.update(json.dumps(rendering).encode())
        variants[name] = Variant(
            name=name, description=f"{name} on Triton", tokenizer=tokenizer, tokenizer_id=digest.hexdigest()
        )
    if not variants:
        raise SystemExit(f"no llmesh model variants under {repository}; build them with `llmesh build`")
    return variants


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router, embeddings: EmbeddingService | None = None) -> None:
        self._router = router
        self._embeddings = embeddings

    @grpc_util.unary_errors
    async def Prepare(
        self, request: router_pb2.PrepareRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PrepareResponse:
        prepared = self._router.prepare(
            tier_from_pb(request.tier), request.model, messages_from_pb(request.messages),
            sampling_from_pb(request.sampling), output_from_pb(request.output), request.prompt,
        )  # fmt: skip
        return router_pb2.PrepareResponse(
            prepared=prepared_to_pb(prepared), context_length=self._router.context_length(prepared.route.variant)
        )

    @grpc_util.stream_errors
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateChunk]:
        events = self._router.generate(
            request_id=request.request_id,
            tier=tier_from_pb(request.tier),
            model=request.model,
            messages=messages_from_pb(request.messages),
            sampling=sampling_from_pb(request.sampling),
            prepared=prepared_from_pb(request.prepared) if request.HasField("prepared") else None,
            output=output_from_pb(request.output),
            prompt=request.prompt,
        )
        async for event in events:
            chunk = router_pb2.GenerateChunk(
                delta=event.delta,
                finish_reason=event.finish_reason,
                index=event.index,
                logprobs=logprobs_to_pb(event.logprobs),
                tool_calls=tool_calls_to_pb(event.tool_calls),
            )
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
                    name=v.name, description=v.description, context_length=v.context_length, tiers=tiers_to_pb(v.tiers)
                )
                for v in self._router.list_variants()
            ]
        )

    @grpc_util.unary_errors
    async def Embed(
        self, request: router_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.EmbedResponse:
        if self._embeddings is None:
            raise Unavailable("this deployment serves no embedding model (its Triton model repository has none)")
        result = await self._embeddings.embed(list(request.inputs), request.model)
        return router_pb2.EmbedResponse(
            model=result.model,
            embeddings=[common_pb2.Embedding(index=i, values=row.tolist()) for i, row in enumerate(result.vectors)],
            prompt_tokens=result.prompt_tokens,
        )


async def serve(settings: RouterSettings) -> None:
    if settings.model_repository is None:
        raise SystemExit("--model-repository is required")
    variants = load_variants(settings.model_repository)
    policy = load_policy(settings.policy_file, list(variants), settings.default_variant)
    try:
        groups = settings.replica_groups()
    except ValueError as exc:
        raise SystemExit(f"router: {exc}") from None
    server = grpc.aio.server(options=grpc_util.server_options())
    health_servicer = grpc_util.add_health_and_reflection(server, [SERVICE_NAME])

    def report_replicas(healthy: int) -> None:
        """SERVING while at least one replica has no variant ejected."""
        grpc_util.set_serving(health_servicer, [SERVICE_NAME], healthy > 0)

    tls = TlsFiles.of(settings)
    triton_tls = tls if settings.triton_tls else None
    pool = ReplicaPool((), on_healthy_change=report_replicas)
    membership = PoolMembership(
        pool,
        lambda url: TritonReplica(
            url, settings.generate_timeout_s, triton_tls, settings.triton_hang_budget_s, settings.triton_tls_name
        ),
        list(variants),
        retire_after_s=settings.generate_timeout_s,
    )
    embeddings, embedding_membership = embeddings_from_repository(
        settings.model_repository, settings.embedding_model, settings.embed_timeout_s, triton_tls,
        settings.triton_tls_name,
    )  # fmt: skip
    listeners: list[MembershipListener] = [membership]
    if embedding_membership is not None:
        listeners.append(embedding_membership)
    load = LoadTracker()
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry, pool, load, list(policy.variants))
    discovery = ReplicaDiscovery(groups, SystemResolver(), [*listeners, observer])
    router = Router(variants, policy, pool, load=load, observer=observer)
    serve_metrics(registry, settings.host, settings.metrics_port)

    router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(router, embeddings), server)
    address = f"{settings.host}:{settings.port}"
    add_port(server, address, tls)
    # The first membership: fixed URLs and what DNS answers now, each probed before it takes work.
    await discovery.refresh()
    await server.start()
    report_replicas(pool.healthy_count())
    background = [asyncio.create_task(_probe_replicas(pool, list(variants), settings.health_interval_s))]
    if discovery.uses_dns:
        background.append(asyncio.create_task(discovery.run(settings.dns_interval_s)))
    log.info(
        "router listening on %s, variants %s (smallest first), replicas %s",
        address, list(policy.variants), sorted(discovery.members),
    )  # fmt: skip
    await grpc_util.wait_for_shutdown_signal()
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING from now on, whatever the pool reports while draining
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await server.stop(grace=settings.shutdown_grace_s)
    await membership.close()
    if embedding_membership is not None:
        await embedding_membership.close()


async def _probe_replicas(pool: ReplicaPool, variants: list[str], interval_s: float) -> None:
    """Active probes on a timer, the one place Triton is probed: eject what stopped answering, re-admit what
    recovered. Requests eject too; health follows the pool's healthy count (on_healthy_change), not this loop."""
    while True:
        await asyncio.sleep(interval_s)
        await pool.probe(variants)
