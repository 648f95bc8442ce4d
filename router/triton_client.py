"""Token streams from Triton over gRPC (ModelStreamInfer), one bidirectional stream per request.

The I/O contract is the one in triton_models/python_model.py: inputs input_ids [1, L] INT64, max_tokens [1, 1]
INT32, temperature / top_p [1, 1] FP32, and, each sent only when it differs from the default: seed [1, 1] INT64,
presence_penalty / frequency_penalty / repetition_penalty [1, 1] FP32, logit_bias_ids [1, K] INT64 with
logit_bias_values [1, K] FP32, top_logprobs [1, 1] INT32 (absent: no logprobs), stop_token_ids [1, K] INT64,
n [1, 1] INT32 and grammar [1, 1] BYTES (router.constraints). Every response has token_ids [-1] INT64,
finish_reason [1] BYTES, index [1, 1] INT32 (the choice), logprob [1, T] FP32 ([1, 0] when not asked) and
top_token_ids [1, K] INT64 / top_logprobs [1, K] FP32. With n > 1 each choice ends with a response that has no
tokens, its finish_reason and index; the last of them is final. Cancelling the call (closing the iterator) makes
Triton cancel the request.
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


def channel_options(tls_name: str = "") -> list[tuple[str, object]]:
    """Options of a channel to Triton; `tls_name`: the name its certificate is checked against instead of the
    address dialled (replicas found by DNS are reached by pod address, which no certificate made in advance names)."""
    options: list[tuple[str, object]] = list(CHANNEL_OPTIONS)
    if tls_name:
        options.append(("grpc.ssl_target_name_override", tls_name))
    return options


def build_request(
    variant: str,
    request_id: str,
    input_ids: Sequence[int],
    sampling: SamplingParams,
    priority: int = 0,
    grammar: str = "",
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
    # The engine's defaults are "off": sent only when they change something, so plain requests look as before.
    for name, value, default in (
        ("presence_penalty", sampling.presence_penalty, 0.0),
        ("frequency_penalty", sampling.frequency_penalty, 0.0),
        ("repetition_penalty", sampling.repetition_penalty, 1.0),
    ):
        if value != default:
            add(name, "FP32", [value], [1, 1])
    if sampling.logit_bias:
        add("logit_bias_ids", "INT64", [i for i, _ in sampling.logit_bias], [1, len(sampling.logit_bias)])
        add("logit_bias_values", "FP32", [b for _, b in sampling.logit_bias], [1, len(sampling.logit_bias)])
    if sampling.logprobs:
        add("top_logprobs", "INT32", [sampling.top_logprobs], [1, 1])
    if sampling.stop_token_ids:
        add("stop_token_ids", "INT64", list(sampling.stop_token_ids), [1, len(sampling.stop_token_ids)])
    if sampling.n > 1:
        add("n", "INT32", [sampling.n], [1, 1])
    if grammar:
        tensor = request.inputs.add(name="grammar", datatype="BYTES", shape=[1, 1])
        tensor.contents.bytes_contents.append(grammar.encode())
    for output in ("token_ids", "finish_reason", "index"):
        request.outputs.add(name=output)
    if sampling.logprobs:
        for output in ("logprob", "top_token_ids", "top_logprobs"):
            request.outputs.add(name=output)
    return request


def parse_response(response: service_pb2.ModelInferResponse) -> tuple[TokenChunk, bool]:
    """The chunk a streamed response carries, and whether it is the request's last."""
    token_ids: tuple[int, ...] = ()
    finish_reason = ""
    choice = 0
    logprobs: tuple[float, ...] = ()
    top_ids: list[int] = []
    top_logprobs: list[float] = []
    for position, output in enumerate(response.outputs):
        raw = response.raw_output_contents[position] if position < len(response.raw_output_contents) else b""
        if output.name == "token_ids":
            token_ids = tuple(int(t) for t in np.frombuffer(raw, dtype="<i8"))
        elif output.name == "finish_reason":
            values = _decode_bytes_tensor(raw)
            finish_reason = values[0].decode() if values else ""
        elif output.name == "index":
            values_i32 = np.frombuffer(raw, dtype="<i4")
            choice = int(values_i32[0]) if values_i32.size else 0
        elif output.name == "logprob":
            logprobs = tuple(float(v) for v in np.frombuffer(raw, dtype="<f4"))
        elif output.name == "top_token_ids":
            top_ids = [int(v) for v in np.frombuffer(raw, dtype="<i8")]
        elif output.name == "top_logprobs":
            top_logprobs = [float(v) for v in np.frombuffer(raw, dtype="<f4")]
    final_param = response.parameters.get("triton_final_response")
    final = bool(final_param.bool_param) if final_param is not None else bool(finish_reason)
    # Logprobs come one row per token: [T] chosen, [T, K] alternatives (K may be 0).
    rows = len(logprobs) if token_ids and len(logprobs) == len(token_ids) else 0
    width = len(top_ids) // rows if rows and len(top_ids) == len(top_logprobs) else 0
    chunk = TokenChunk(
        token_ids=token_ids,
        finish_reason=finish_reason,
        index=choice,
        logprobs=logprobs if rows else (),
        top_ids=tuple(tuple(top_ids[r * width : (r + 1) * width]) for r in range(rows)),
        top_logprobs=tuple(tuple(top_logprobs[r * width : (r + 1) * width]) for r in range(rows)),
    )
    return chunk, final


class TritonReplica:
    """One tritonserver process, reached over gRPC."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        tls: TlsFiles | None = None,
        hang_budget_s: float = 10.0,
        tls_name: str = "",
    ) -> None:
        self._url = url
        self._channel = aio_channel(url, tls, channel_options(tls_name))
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
        self,
        variant: str,
        request_id: str,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        tier: Tier,
        grammar: str = "",
    ) -> AsyncIterator[TokenChunk]:
        """`grammar`: router.constraints' text for the engine's constrained decoding ("" = none)."""
        try:
            priority = await self._priority(variant, tier)
            request = build_request(variant, request_id, input_ids, sampling, priority, grammar)
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
