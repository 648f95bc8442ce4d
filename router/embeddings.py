"""Embeddings (RouterService.Embed): tokenize with MiniLM's WordPiece tokenizer, embed on Triton, count tokens.

The embedding model is its own Triton model (triton_models/embedding_model.py, I/O contract there), served by the
same tritonservers as the chat variants. Each text goes to Triton as its own request, all at once, so that Triton's
dynamic batcher groups them, and texts of other callers, into shared runs. A text longer than the model's window is
cut to its first MAX_TOKENS tokens ([CLS] and [SEP] included), as the response cache's embedder does, so the two
give the same vector for the same text; `prompt_tokens` counts the tokens the model read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmesh.errors import Internal, InvalidRequest, MeshError, NotFound, Unavailable, quote
from llmesh.grpc_util import error_from_rpc
from llmesh.minilm import DIM, EMBEDDING_MODEL, load_tokenizer, model_dir
from llmesh.tls import TlsFiles, aio_channel
from router.discovery import Member
from router.triton_client import channel_options

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# Inputs of one Embed call at most; the gateway refuses more before they reach the router.
MAX_INPUTS = 256
# Characters of one input at most (the model reads at most MAX_TOKENS tokens of it; this bounds tokenizing).
MAX_INPUT_CHARS = 100_000
# python_model.py and embedding_model.py start the message of an error caused by the request with this.
INVALID_REQUEST_PREFIX = "invalid request: "


@dataclass(frozen=True)
class Embeddings:
    model: str
    # [len(inputs), DIM] float32, each row unit length, in input order.
    vectors: np.ndarray
    prompt_tokens: int


class EmbeddingBackend(Protocol):
    @property
    def name(self) -> str: ...

    async def embed(self, model: str, token_ids: Sequence[int]) -> np.ndarray:
        """The [DIM] float32 embedding of one text's token ids; Unavailable when the backend cannot answer."""
        ...


class TritonEmbeddingBackend:
    """One tritonserver, reached over gRPC (unary ModelInfer)."""

    def __init__(self, url: str, timeout_s: float = 30.0, tls: TlsFiles | None = None, tls_name: str = "") -> None:
        self._url = url
        self._channel = aio_channel(url, tls, channel_options(tls_name))
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._timeout_s = timeout_s

    @property
    def name(self) -> str:
        return self._url

    async def close(self) -> None:
        await self._channel.close()

    async def embed(self, model: str, token_ids: Sequence[int]) -> np.ndarray:
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(token_ids)])
        request.raw_input_contents.append(np.asarray(token_ids, dtype="<i8").tobytes())
        request.outputs.add(name="embedding")
        try:
            reply = await self._stub.ModelInfer(request, timeout=self._timeout_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = (err.details() if hasattr(err, "details") else None) or ""
            if code == grpc.StatusCode.INVALID_ARGUMENT and INVALID_REQUEST_PREFIX in details:
                raise InvalidRequest(details.split(INVALID_REQUEST_PREFIX, 1)[1]) from err
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE):
                # NOT_FOUND / INVALID_ARGUMENT without the model's prefix: Triton does not serve the model (yet).
                raise Unavailable(f"triton {self._url} cannot embed with {model}: {details}") from err
            raise error_from_rpc(err, f"triton {self._url} ({model})") from err
        if not reply.raw_output_contents:
            raise Internal(f"triton {self._url} answered {model} without an embedding")
        vector = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
        if vector.shape != (DIM,):
            raise Internal(f"triton {self._url} answered {model} with {vector.size} values, not {DIM}")
        return vector


class EmbeddingService:
    """Tokenizes, spreads the texts over the backends (each text tried on the others if one fails) and gathers.

    Backends come and go with the Triton replicas (router/discovery.py); fallback ones (another region's) are tried
    only after every local one failed."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        backends: Sequence[EmbeddingBackend] = (),
        model: str = EMBEDDING_MODEL,
        max_inputs: int = MAX_INPUTS,
    ) -> None:
        self._tokenizer = tokenizer
        self._backends = list(backends)
        self._fallbacks: list[EmbeddingBackend] = []
        self._turn = itertools.count()
        self.model = model
        self._max_inputs = max_inputs

    def add_backend(self, backend: EmbeddingBackend, fallback: bool = False) -> None:
        (self._fallbacks if fallback else self._backends).append(backend)

    def remove_backend(self, name: str) -> EmbeddingBackend | None:
        for backends in (self._backends, self._fallbacks):
            for backend in backends:
                if backend.name == name:
                    backends.remove(backend)
                    return backend
        return None

    def tokenize(self, inputs: Sequence[str]) -> list[list[int]]:
        if not inputs:
            raise InvalidRequest("inputs must hold at least one text", param="input")
        if len(inputs) > self._max_inputs:
            raise InvalidRequest(f"inputs hold {len(inputs)} texts; the limit is {self._max_inputs}", param="input")
        for index, text in enumerate(inputs):
            if not text:
                raise InvalidRequest(f"input[{index}] is empty: every text needs at least one character", param="input")
            if len(text) > MAX_INPUT_CHARS:
                raise InvalidRequest(
                    f"input[{index}] is {len(text)} characters long; the limit is {MAX_INPUT_CHARS}", param="input"
                )
        return [list(e.ids) for e in self._tokenizer.encode_batch(list(inputs))]

    async def embed(self, inputs: Sequence[str], model: str = "") -> Embeddings:
        if model not in ("", self.model):
            raise NotFound(
                f"the model {quote(model)} does not embed; the embedding model is {self.model!r}",
                param="model",
                code="model_not_found",
            )
        rows = self.tokenize(inputs)
        vectors = await asyncio.gather(*(self._embed_one(ids) for ids in rows))
        return Embeddings(self.model, np.stack(vectors).astype(np.float32), sum(len(ids) for ids in rows))

    async def _embed_one(self, token_ids: Sequence[int]) -> np.ndarray:
        start = next(self._turn)
        failures: list[str] = []
        local = list(self._backends)
        order = [local[(start + offset) % len(local)] for offset in range(len(local))] + list(self._fallbacks)
        for backend in order:
            try:
                return await backend.embed(self.model, token_ids)
            except (Unavailable, Internal) as exc:
                log.warning("embedding on %s failed: %s", backend.name, exc)
                failures.append(f"{backend.name}: {exc}")
            except MeshError:
                raise
        if not order:
            raise Unavailable(f"no Triton replica is known to embed with {self.model} yet")
        raise Unavailable(f"no replica could embed with {self.model}; {'; '.join(failures)}")


class EmbeddingMembership:
    """Keeps the service's backends equal to the Triton replicas (router/discovery.py's MembershipListener)."""

    def __init__(self, service: EmbeddingService, timeout_s: float, tls: TlsFiles | None, tls_name: str = "") -> None:
        self._service = service
        self._timeout_s = timeout_s
        self._tls = tls
        self._tls_name = tls_name
        self._backends: dict[str, TritonEmbeddingBackend] = {}

    async def added(self, member: Member) -> None:
        backend = TritonEmbeddingBackend(member.url, self._timeout_s, self._tls, self._tls_name)
        self._backends[member.url] = backend
        self._service.add_backend(backend, fallback=member.fallback)

    async def removed(self, member: Member) -> None:
        self._service.remove_backend(member.url)
        backend = self._backends.pop(member.url, None)
        if backend is not None:
            # An embedding call is one short unary RPC: a little grace, then the channel goes.
            asyncio.get_running_loop().call_later(self._timeout_s, lambda: asyncio.ensure_future(backend.close()))

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
        self._backends.clear()


def from_repository(
    repository: Path, model: str, timeout_s: float, tls: TlsFiles | None, tls_name: str = ""
) -> tuple[EmbeddingService | None, EmbeddingMembership | None]:
    """The service for `model` when the model repository holds it (repository.write_embedding_model), with the
    listener that gives it its backends; (None, None) when it does not or `model` is "" (Embed then answers
    UNAVAILABLE)."""
    if not model or not (repository / model / "config.pbtxt").is_file():
        return None, None
    service = EmbeddingService(load_tokenizer(model_dir()), (), model)
    return service, EmbeddingMembership(service, timeout_s, tls, tls_name)
