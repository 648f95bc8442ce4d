"""RouterClient over gRPC: translates llmesh types <-> router protobufs and statuses <-> domain errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmesh.convert import messages_to_pb, route_from_pb, route_to_pb, sampling_to_pb, usage_from_pb
from llmesh.grpc_util import error_from_rpc
from llmesh.types import ChatRequest, GenerateEvent, RouteInfo, Tier, VariantInfo
from llmesh.v1 import router_pb2, router_pb2_grpc


class GrpcRouterClient:
    def __init__(self, target: str, timeout_s: float = 330.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def prepare(self, tier: Tier, request: ChatRequest) -> tuple[RouteInfo, int]:
        message = router_pb2.PrepareRequest(
            tier=tier.value,
            model=request.model,
            messages=messages_to_pb(request.messages),
            sampling=sampling_to_pb(request.sampling),
        )
        try:
            reply = await self._stub.Prepare(message, timeout=10.0)
        except grpc.RpcError as err:
            raise error_from_rpc(err, "router") from err
        return route_from_pb(reply.route), reply.prompt_tokens

    async def generate(
        self, request_id: str, tier: Tier, request: ChatRequest, route: RouteInfo | None = None
    ) -> AsyncIterator[GenerateEvent]:
        message = router_pb2.GenerateRequest(
            request_id=request_id,
            tier=tier.value,
            model=request.model,
            messages=messages_to_pb(request.messages),
            sampling=sampling_to_pb(request.sampling),
        )
        if route is not None:
            message.route.CopyFrom(route_to_pb(route))
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
        return [VariantInfo(v.name, v.description, v.context_length, tuple(v.tiers)) for v in reply.variants]
