"""Embeddings: POST /v1/embeddings (OpenAI's JSON) and the typed CreateEmbeddings, metered like chat.

Request fields of POST /v1/embeddings (docs/openapi.yaml says the same to clients):
- input: a string or an array of 1..MAX_INPUTS strings, none empty; token arrays (arrays of integers) are refused:
  the ids would be in the embedding model's vocabulary, which no OpenAI client knows;
- model: the embedding model's id (llmesh.minilm.EMBEDDING_MODEL); absent means that model, any other id is a 404;
- encoding_format: "float" (default) or "base64" (each vector as the base64 of its little-endian float32 bytes);
- dimensions: only the model's own, DIM (the vectors are not shortened);
- user: logged, not interpreted. Any other field is refused, as OpenAI does.
A text longer than the model's window (MAX_TOKENS tokens) is embedded from its first MAX_TOKENS tokens, as the
response cache's embedder does; usage counts the tokens the model read ([CLS] and [SEP] included).

Quotas: one Reserve per call (one request against the request-rate limits) holding an upper bound of the input
tokens (at most one token per character plus [CLS] and [SEP], at most MAX_TOKENS per text), settled with the exact
count the router returns, or with 0 when the router answers no vectors.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np

from gateway.openai_compat import decode_body, is_int, json_type
from gateway.pipeline import QuotaGate, Reservation
from gateway.validation import RequestLimits, check_field, check_text
from llmesh.budgets import CHANNEL_OPTIONS
from llmesh.errors import Internal, InvalidRequest, NotFound, quote
from llmesh.grpc_util import error_from_rpc
from llmesh.minilm import DIM, EMBEDDING_MODEL, MAX_TOKENS
from llmesh.tls import TlsFiles, aio_channel
from llmesh.types import Principal
from llmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

MAX_INPUTS = 256
ENCODING_FORMATS = ("float", "base64")
REQUEST_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})


@dataclass(frozen=True)
class EmbeddingsRequest:
    inputs: tuple[str, ...]
    model: str = EMBEDDING_MODEL
    encoding_format: str = "float"
    user: str = ""


@dataclass(frozen=True)
class EmbeddingsResult:
    model: str
    # [len(inputs), DIM] float32, unit rows, in input order.
    vectors: np.ndarray
    prompt_tokens: int


def check_request(
    inputs: Sequence[str], model: str, user: str, limits: RequestLimits, encoding_format: str = "float"
) -> EmbeddingsRequest:
    """The checks both entry points share: counts, sizes, Unicode, the model's id."""
    model = check_field(model, "model", limits.max_field_chars).strip()
    if model not in ("", EMBEDDING_MODEL):
        raise NotFound(
            f"the model {quote(model)} does not exist or does not embed; llmesh embeds with {EMBEDDING_MODEL!r}",
            param="model",
            code="model_not_found",
        )
    if not inputs:
        raise InvalidRequest("input must hold at least one string", param="input")
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(f"input holds {len(inputs)} strings; the limit is {MAX_INPUTS}", param="input")
    total = 0
    for index, text in enumerate(inputs):
        if not text:
            raise InvalidRequest(f"input[{index}] is empty: every input needs at least one character", param="input")
        check_text(text, f"input[{index}]")
        total += len(text)
    if total > limits.max_prompt_chars:
        raise InvalidRequest(f"input holds {total} characters; the limit is {limits.max_prompt_chars}", param="input")
    return EmbeddingsRequest(
        tuple(inputs), EMBEDDING_MODEL, encoding_format, check_field(user, "user", limits.max_field_chars)
    )


def parse_request(body: bytes, limits: RequestLimits | None = None) -> EmbeddingsRequest:
    """POST /v1/embeddings' JSON body, checked (see the module docstring)."""
    limits = limits or RequestLimits()
    payload = decode_body(body, limits)
    if not isinstance(payload, dict):
        raise InvalidRequest(f"request body must be an object, got {json_type(payload)}")
    for key in payload:
        if key not in REQUEST_FIELDS:
            raise InvalidRequest(
                f"unrecognized request argument {quote(key)}", param=key[:80], code="unknown_parameter"
            )
    raw = payload.get("input")
    if raw is None:
        raise InvalidRequest("input is missing: a string or an array of strings to embed", param="input")
    if isinstance(raw, str):
        inputs: list[str] = [raw]
    elif isinstance(raw, list):
        inputs = []
        for index, item in enumerate(raw):
            if is_int(item) or (isinstance(item, list) and all(is_int(t) for t in item)):
                raise InvalidRequest(
                    "input as token ids is not supported by llmesh: send the text as a string or an array of strings",
                    param="input",
                    code="unsupported_parameter",
                )
            if not isinstance(item, str):
                raise InvalidRequest(f"input[{index}] must be a string, got {json_type(item)}", param="input")
            inputs.append(item)
    else:
        raise InvalidRequest(f"input must be a string or an array of strings, got {json_type(raw)}", param="input")

    def optional_str(name: str) -> str:
        value = payload.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string, got {json_type(value)}", param=name)
        return value

    encoding_format = optional_str("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise InvalidRequest(
            f"encoding_format must be 'float' or 'base64', got {quote(encoding_format)}", param="encoding_format"
        )
    dimensions = payload.get("dimensions")
    if dimensions is not None and (not is_int(dimensions) or dimensions != DIM):
        raise InvalidRequest(
            f"dimensions must be {DIM}, the embedding model's own, got {quote(dimensions, 24)}: llmesh does not "
            "shorten vectors",
            param="dimensions",
            code="unsupported_parameter",
        )
    return check_request(inputs, optional_str("model"), optional_str("user"), limits, encoding_format)


def reserved_tokens(inputs: Sequence[str]) -> int:
    """An upper bound of the tokens the model reads: WordPiece gives at most one token per character, plus [CLS]
    and [SEP], and the model reads at most MAX_TOKENS of each text."""
    return sum(min(MAX_TOKENS, len(text) + 2) for text in inputs)


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(v) for v in vector]


def embeddings_json(result: EmbeddingsResult, encoding_format: str = "float") -> dict[str, Any]:
    """OpenAI's CreateEmbeddingResponse."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _encode(vector, encoding_format)}
            for index, vector in enumerate(result.vectors)
        ],
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


class EmbedClient(Protocol):
    async def embed(self, inputs: Sequence[str], model: str) -> EmbeddingsResult: ...


class GrpcEmbedClient:
    """RouterService.Embed over gRPC (its own channel to the router)."""

    def __init__(self, target: str, timeout_s: float = 30.0, tls: TlsFiles | None = None) -> None:
        self._channel = aio_channel(target, tls, CHANNEL_OPTIONS)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def embed(self, inputs: Sequence[str], model: str) -> EmbeddingsResult:
        try:
            reply = await self._stub.Embed(
                router_pb2.EmbedRequest(inputs=list(inputs), model=model), timeout=self._timeout_s
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise NotFound(err.details() or "not found", param="model", code="model_not_found") from err  # type: ignore[attr-defined]
            raise error_from_rpc(err, "router") from err
        indexes = sorted(e.index for e in reply.embeddings)
        if indexes != list(range(len(inputs))) or any(len(e.values) != DIM for e in reply.embeddings):
            raise Internal(f"router answered Embed with {len(reply.embeddings)} malformed embeddings")
        vectors = np.zeros((len(inputs), DIM), dtype=np.float32)
        for embedding in reply.embeddings:
            vectors[embedding.index] = embedding.values
        return EmbeddingsResult(reply.model, vectors, reply.prompt_tokens)


class Embeddings:
    """Reserve, embed, settle: the metering chat has (gateway/pipeline.py), for one Embed call."""

    def __init__(self, client: EmbedClient, quotas: QuotaGate | None = None) -> None:
        self._client = client
        self._quotas = quotas

    async def create(
        self,
        principal: Principal,
        request: EmbeddingsRequest,
        request_id: str,
        response_headers: list[tuple[str, str]] | None = None,
    ) -> EmbeddingsResult:
        reservation: Reservation | None = None
        if self._quotas is not None:
            reservation = await self._quotas.reserve(principal, request_id, reserved_tokens(request.inputs), 0)
            if response_headers is not None:
                response_headers.extend(reservation.headers)
        used = 0
        try:
            result = await self._client.embed(request.inputs, request.model)
            used = result.prompt_tokens
            return result
        finally:
            if reservation is not None and self._quotas is not None:
                # In a task of its own, so that a caller gone away (cancellation) does not skip the settlement.
                await asyncio.shield(asyncio.ensure_future(self._quotas.settle(reservation, used)))
