"""RouterClient over gRPC: translates llmesh types <-> router protobufs and statuses <-> domain errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmesh.convert import (
    messages_to_pb,
    prepared_from_pb,
    prepared_to_pb,
    route_from_pb,
    sampling_to_pb,
    tier_to_pb,
    tiers_from_pb,
    usage_from_pb,
)
from llmesh.errors import Internal, InvalidRequest
from llmesh.grpc_util import error_from_rpc
from llmesh.types import ChatRequest, GenerateEvent, PreparedPrompt, Tier, VariantInfo
from llmesh.v1 import router_pb2, router_pb2_grpc


class GrpcRouterClient:
    def __init__(self, target: str, timeout_s: float = 330.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def prepare(self, tier: Tier, request: ChatRequest) -> PreparedPrompt:
        message = router_pb2.PrepareRequest(
            tier=tier_to_pb(tier),
            model=request.model,
            messages=messages_to_pb(request.messages),
            sampling=sampling_to_pb(request.sampling),
        )
        try:
            reply = await self._stub.Prepare(message, timeout=10.0)
        except grpc.RpcError as err:
            raise error_from_rpc(err, "router") from err
        try:
            return prepared_from_pb(reply.prepared)
        except InvalidRequest as exc:
            # The router's answer, not the caller's request, is malformed.
            raise Internal(f"router answered Prepare with a malformed prompt: {exc}") from exc

    async def generate(
        self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
    ) -> AsyncIterator[GenerateEvent]:
        message = router_pb2.GenerateRequest(
            request_id=request_id,
            tier=tier_to_pb(tier),
            model=request.model,
            # Sent also with a prepared prompt: a fallback to a variant that tokenizes differently needs them.
            messages=messages_to_pb(request.messages),
            sampling=sampling_to_pb(request.sampling),
        )
        if prepared is not None:
            message.prepared.CopyFrom(prepared_to_pb(prepared))
        call = self._stub.Generate(message, timeout=self._timeout_s)
        try:
            async for chunk in call:
                yield GenerateEvent(
                    delta=chunk.delta,
                    finish_reason=chunk.finish_reason,
                    usage=usage_from_pb(chunk.usage) if chunk.HasField("usage") else None,
                    route=route_from_pb(chunk.route) if chunk.HasField("route") else None,
                )
        except grpc.RpcError as err:
            raise error_from_rpc(err, "router") from err
        finally:
            # Also runs when our caller goes away mid-stream: the router then cancels the generation.
            call.cancel()

    async def list_variants(self) -> list[VariantInfo]:
        try:
            reply = await self._stub.ListVariants(router_pb2.ListVariantsRequest(), timeout=5.0)
        except grpc.RpcError as err:
            raise error_from_rpc(err, "router") from err
        return [
            VariantInfo(v.name, v.description, v.context_length, tiers_from_pb(v.tiers, f"variant {v.name} tiers"))
            for v in reply.variants
        ]
