"""The embedding model on a real tritonserver (triton_models/embedding_model.py), reached the way the router
reaches it (router/embeddings.py): vectors match the response cache's embedder, and concurrent texts are batched.

Its repository holds the embedding model only (repository.write_embedding_model), so no chat variant is built.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache_service.embedding import MiniLMEncoder
from cache_service.minilm_onnx import OnnxMiniLMEncoder
from control.process import ManagedProcess, free_ports, http_ok_probe, tail
from llmesh.errors import InvalidRequest, Unavailable
from llmesh.minilm import DIM, EMBEDDING_MODEL, MAX_TOKENS, load_tokenizer, model_dir
from llmesh.paths import cache_dir
from router.embeddings import EmbeddingService, TritonEmbeddingBackend
from triton_models.config import BuildSettings
from triton_models.repository import write_embedding_model
from triton_models.runtime import prepare_backend_dir, tritonserver_command

pytestmark = pytest.mark.slow

TEXTS = [
    "What is the capital of France?",
    "How do I reverse a list in Python?",
    "hi",
    "Ünïcödé, 東京, and emoji 🙂 in one sentence.",
    "a long text that the model cuts to its window " * 40,  # over MAX_TOKENS tokens
]


@dataclass(frozen=True)
class EmbeddingTriton:
    grpc_url: str
    http_url: str
    log_path: Path


@pytest.fixture(scope="module")
def embedding_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddingTriton]:
    repository = tmp_path_factory.mktemp("embedding-repository")
    write_embedding_model(BuildSettings(), repository / EMBEDDING_MODEL)
    grpc_port, http_port, metrics_port = free_ports(3)
    log_path = tmp_path_factory.mktemp("embedding-triton") / "tritonserver.log"
    argv, env = tritonserver_command(
        repository, grpc_port, http_port, metrics_port, backend_dir=prepare_backend_dir(cache_dir())
    )
    process = ManagedProcess("tritonserver-embedding", argv, log_path, env=env).start()
    server = EmbeddingTriton(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", log_path)
    try:
        process.wait_ready(http_ok_probe(f"{server.http_url}/v2/models/{EMBEDDING_MODEL}/ready"), timeout=120)
        yield server
    except Exception:
        print(tail(log_path, 60))
        raise
    finally:
        process.stop()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(model_dir())


async def embed(server: EmbeddingTriton, tokenizer: Any, texts: list[str]) -> Any:
    backend = TritonEmbeddingBackend(server.grpc_url)
    try:
        return await EmbeddingService(tokenizer, [backend]).embed(texts)
    finally:
        await backend.close()


def stats(server: EmbeddingTriton) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.http_url}/v2/models/{EMBEDDING_MODEL}/stats", timeout=5) as reply:
        (model_stats,) = json.loads(reply.read())["model_stats"]
    return dict(model_stats)


def test_vectors_match_the_cache_embedder(embedding_triton: EmbeddingTriton, tokenizer: Any) -> None:
    result = asyncio.run(embed(embedding_triton, tokenizer, TEXTS))
    numpy_encoder = MiniLMEncoder(model_dir())
    reference = numpy_encoder.encode(TEXTS)
    assert result.vectors.shape == (len(TEXTS), DIM) and result.model == EMBEDDING_MODEL
    assert np.abs(result.vectors - reference).max() < 1e-5
    # The cache serves with the onnxruntime twin; it agrees too.
    assert np.abs(result.vectors - OnnxMiniLMEncoder(numpy_encoder, threads=1).encode(TEXTS)).max() < 1e-5
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    counts = [len(tokenizer.encode(t).ids) for t in TEXTS]
    assert counts[-1] == MAX_TOKENS and result.prompt_tokens == sum(counts)


def test_concurrent_texts_are_batched(embedding_triton: EmbeddingTriton, tokenizer: Any) -> None:
    before = stats(embedding_triton)
    texts = [f"question number {i} about the weather in city {i % 7}" for i in range(96)]
    result = asyncio.run(embed(embedding_triton, tokenizer, texts))
    after = stats(embedding_triton)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == len(texts)
    # Dynamic batching: fewer model runs than texts, and some run held more than one text.
    assert executions < inferences
    assert any(entry["batch_size"] > 1 for entry in after["batch_stats"])
    # Batched or not, every text gets its own vector.
    assert np.abs(result.vectors - MiniLMEncoder(model_dir()).encode(texts)).max() < 1e-5


def test_token_ids_outside_the_vocabulary_are_the_callers_mistake(embedding_triton: EmbeddingTriton) -> None:
    async def run() -> None:
        backend = TritonEmbeddingBackend(embedding_triton.grpc_url)
        try:
            with pytest.raises(InvalidRequest, match="vocabulary"):
                await backend.embed(EMBEDDING_MODEL, [101, 10**7, 102])
            with pytest.raises(Unavailable):
                await backend.embed("no-such-model", [101, 102])
        finally:
            await backend.close()

    asyncio.run(run())
