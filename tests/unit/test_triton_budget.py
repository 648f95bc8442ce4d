"""The router's Triton client under its time budget, against an in-process gRPC Triton stand-in that answers
slowly (live: waited for) or not at all (hung: UNAVAILABLE within the budget, so the router fails over)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmesh.budgets import DependencyHung
from llmesh.types import SamplingParams, Tier
from router.triton_client import TritonReplica


def final_response(token_ids: list[int], finish_reason: str) -> service_pb2.ModelStreamInferResponse:
    reply = service_pb2.ModelStreamInferResponse()
    response = reply.infer_response
    response.outputs.add(name="token_ids", datatype="INT64", shape=[len(token_ids)])
    response.outputs.add(name="finish_reason", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(np.asarray(token_ids, dtype="<i8").tobytes())
    response.raw_output_contents.append(struct.pack("<I", len(finish_reason)) + finish_reason.encode())
    response.parameters["triton_final_response"].bool_param = True
    return reply


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.first_response_after_s = 0.0
        self.hung = False
        self.live_checks = 0

    async def _hang_if_hung(self) -> None:
        if self.hung:
            await asyncio.Event().wait()

    async def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        self.live_checks += 1
        await self._hang_if_hung()
        return service_pb2.ServerLiveResponse(live=True)

    async def ModelConfig(self, request, context):  # type: ignore[no-untyped-def]
        await self._hang_if_hung()
        return service_pb2.ModelConfigResponse()

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:  # type: ignore[no-untyped-def, override]
        async for _ in request_iterator:
            break
        await asyncio.sleep(self.first_response_after_s)
        await self._hang_if_hung()
        yield final_response([7, 8], "length")


async def serving(fake: FakeTriton) -> AsyncIterator[str]:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def generate(replica: TritonReplica) -> list[tuple[int, ...]]:
    stream = replica.stream("m", "r-1", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0), Tier.PAID)
    return [chunk.token_ids async for chunk in stream]


def test_a_slow_live_triton_is_waited_for_and_a_hung_one_fails_within_the_budget() -> None:
    fake = FakeTriton()

    async def main() -> None:
        async for target in serving(fake):
            replica = TritonReplica(target, timeout_s=30, hang_budget_s=0.2)
            assert await generate(replica) == [(7, 8)]

            fake.first_response_after_s = 0.6  # queued behind others: ServerLive answers meanwhile
            started = time.monotonic()
            assert await generate(replica) == [(7, 8)]
            assert time.monotonic() - started >= 0.6 and fake.live_checks >= 2

            fake.first_response_after_s, fake.hung = 0.0, True
            started = time.monotonic()
            with pytest.raises(DependencyHung, match="triton did not answer within 200 ms"):
                await generate(replica)
            assert time.monotonic() - started < 0.2 + 0.4, "a hung Triton costs the budget, not timeout_s"
            fake.hung = False
            await replica.close()

    asyncio.run(main())
