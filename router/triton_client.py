"""Token streams from Triton over gRPC (ModelStreamInfer), one bidirectional stream per request.

The I/O contract is the one in triton_models/python_model.py: inputs input_ids [1, L] INT64, max_tokens [1, 1]
INT32, temperature / top_p [1, 1] FP32, seed [1, 1] INT64 (optional); every response has token_ids [-1] INT64 and
finish_reason [1] BYTES. Cancelling the call (closing the iterator) makes Triton cancel the request.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmesh.budgets import CHANNEL_OPTIONS, Watchdog
from llmesh.errors import Internal, InvalidRequest, Unavailable
from llmesh.grpc_util import error_from_rpc
from llmesh.tls import TlsFiles, aio_channel
from llmesh.types import SamplingParams, Tier
from router.tokens import TokenChunk

# python_model.py starts the message of an error caused by the request (not by the server) with this.
INVALID_REQUEST_PREFIX = "invalid request: "


def _decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: each element is a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        items.append(raw[offset : offset + length])
        offset += length
    return items


def build_request(
    variant: str, request_id: str, input_ids: Sequence[int], sampling: SamplingParams, priority: int = 0
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=variant, id=request_id)
    if priority:
        request.parameters["priority"].uint64_param = priority
        # Triton consumes "priority" for its queue; the model's own continuous-batching queue reads this one.
        request.parameters["llmesh_priority"].int64_param = priority
    # Without this Triton sends no response for a final flag that carries no tensors (e.g. after cancellation),
    # and the client could not tell that the request is over.
    request.parameters["triton_enable_empty_final_response"].bool_param = True

    def add(name: str, datatype: str, values: list[int] | list[float], shape: list[int]) -> None:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if datatype == "INT64":
            tensor.contents.int64_contents.extend(int(v) for v in values)
        elif datatype == "INT32":
            tensor.contents.int_contents.extend(int(v) for v in values)
        else:
            tensor.contents.fp32_contents.extend(float(v) for v in values)

    add("input_ids", "INT64", list(input_ids), [1, len(input_ids)])
    add("max_tokens", "INT32", [sampling.max_tokens], [1, 1])
    add("temperature", "FP32", [sampling.temperature], [1, 1])
    add("top_p", "FP32", [sampling.top_p], [1, 1])
    if sampling.seed is not None:
        add("seed", "INT64", [sampling.seed], [1, 1])
    request.outputs.add(name="token_ids")
    request.outputs.add(name="finish_reason")
    return request


def parse_response(response: service_pb2.ModelInferResponse) -> tuple[TokenChunk, bool]:
    """The chunk a streamed response carries, and whether it is the request's last."""
    token_ids: tuple[int, ...] = ()
    finish_reason = ""
    for index, output in enumerate(response.outputs):
        raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else b""
        if output.name == "token_ids":
            token_ids = tuple(int(t) for t in np.frombuffer(raw, dtype="<i8"))
        elif output.name == "finish_reason":
            values = _decode_bytes_tensor(raw)
            finish_reason = values[0].decode() if values else ""
    final_param = response.parameters.get("triton_final_response")
    final = bool(final_param.bool_param) if final_param is not None else bool(finish_reason)
    return TokenChunk(token_ids=token_ids, finish_reason=finish_reason), final


class TritonReplica:
    """One tritonserver process, reached over gRPC."""

    def __init__(self, url: str, timeout_s: float, tls: TlsFiles | None = None, hang_budget_s: float = 10.0) -> None:
        self._url = url
        self._channel = aio_channel(url, tls, CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._timeout_s = timeout_s
        # A stream silent for half the budget is followed by ServerLive; a Triton that leaves that unanswered too is
        # hung (stopped, wedged): the stream ends with UNAVAILABLE, and before the first token the router fails over.
        # A live Triton (a request queued behind others, a slow first token) is waited for up to timeout_s.
        self._watchdog = Watchdog.with_budget("triton", self._live, hang_budget_s)
        # variant -> the model's dynamic_batching.priority_levels (0 = priorities not configured).
        self._priority_levels: dict[str, int] = {}

    @property
    def name(self) -> str:
        return self._url

    async def close(self) -> None:
        await self._channel.close()

    async def _live(self, timeout_s: float) -> None:
        await self._stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout_s)

    async def ready(self, variant: str) -> bool:
        try:
            reply = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=variant), timeout=2.0)
        except grpc.RpcError:
            return False
        return bool(reply.ready)

    async def _priority(self, variant: str, tier: Tier) -> int:
        """Triton priority for the tier: 1 (highest) for paid and enterprise, the lowest level for free."""
        if variant not in self._priority_levels:
            config = self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=variant), timeout=5.0)
            reply = await self._watchdog.call(config)
            self._priority_levels[variant] = int(reply.config.dynamic_batching.priority_levels)
        levels = self._priority_levels[variant]
        if levels == 0:
            return 0
        return levels if tier is Tier.FREE else 1

    async def stream(
        self, variant: str, request_id: str, input_ids: Sequence[int], sampling: SamplingParams, tier: Tier
    ) -> AsyncIterator[TokenChunk]:
        try:
            request = build_request(variant, request_id, input_ids, sampling, await self._priority(variant, tier))
            call = self._stub.ModelStreamInfer(iter([request]), timeout=self._timeout_s)
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"triton {self._url} ({variant})") from err
        try:
            while (reply := await self._watchdog.call(call.read())) is not grpc.aio.EOF:
                assert isinstance(reply, service_pb2.ModelStreamInferResponse)
                if reply.error_message:
                    # Over streaming gRPC only the message arrives, not the code; the model marks bad input.
                    if INVALID_REQUEST_PREFIX in reply.error_message:
                        raise InvalidRequest(reply.error_message.split(INVALID_REQUEST_PREFIX, 1)[1])
                    raise Internal(f"model {variant} on {self._url} failed: {reply.error_message}")
                chunk, final = parse_response(reply.infer_response)
                yield chunk
                if final:
                    return
            raise Unavailable(f"{self._url} closed the stream of {variant} before the answer was complete")
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"triton {self._url} ({variant})") from err
        finally:
            call.cancel()
