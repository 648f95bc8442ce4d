"""RouterClient over gRPC: translates llmesh types <-> router protobufs and statuses <-> domain errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmesh.grpc_util import error_from_rpc
from llmesh.types import ChatRequest, GenerateEvent, RouteInfo, Tier, Usage, VariantInfo
from llmesh.v1 import common_pb2, router_pb2, router_pb2_grpc


class GrpcRouterClient:
    def __init__(self, target: str, timeout_s: float = 330.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, request_id: str, tier: Tier, request: ChatRequest) -> AsyncIterator[GenerateEvent]:
        sampling = common_pb2.SamplingParams(
            max_tokens=request.sampling.max_tokens,
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p,
            stop=list(request.sampling.stop),
        )
        if request.sampling.seed is not None:
            sampling.seed = request.sampling.seed
        message = router_pb2.GenerateRequest(
            request_id=request_id,
            tier=tier.value,
            model=request.model,
            messages=[common_pb2.ChatMessage(role=m.role, content=m.content) for m in request.messages],
            sampling=sampling,
        )
        call = self._stub.Generate(message, timeout=self._timeout_s)
        try:
            async for chunk in call:
                yield GenerateEvent(
                    delta=chunk.delta,
                    finish_reason=chunk.finish_reason,
                    usage=Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    if chunk.HasField("usage")
                    else None,
                    route=RouteInfo(chunk.route.variant, chunk.route.reason) if chunk.HasField("route") else None,
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
