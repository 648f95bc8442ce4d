"""Embeddings without servers: POST /v1/embeddings parsing and shaping (gateway/embeddings.py), metering, the
router's EmbeddingService (router/embeddings.py) on fake backends, the Triton model's batching (embedding_model.py
on a fake triton_python_backend_utils) and its config (repository.write_embedding_model)."""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from openai.types import CreateEmbeddingResponse

from gateway.embeddings import (
    MAX_INPUTS,
    REQUEST_FIELDS,
    Embeddings,
    EmbeddingsRequest,
    EmbeddingsResult,
    embeddings_json,
    parse_request,
    reserved_tokens,
)
from gateway.pipeline import Reservation
from llmesh import grpc_util
from llmesh.errors import InvalidRequest, NotFound, Unavailable
from llmesh.minilm import DIM, EMBEDDING_MODEL, MAX_TOKENS, MiniLMEncoder, load_tokenizer, model_dir, pad_batch
from llmesh.types import Principal, Tier
from router.embeddings import EmbeddingService
from triton_models.config import BuildSettings
from triton_models.repository import EMBEDDING_MAX_BATCH, write_embedding_model


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# ---- parsing -----------------------------------------------------------------------------------------------------


def test_a_string_and_a_list_of_strings_are_inputs() -> None:
    assert parse_request(body(input="hello", model=EMBEDDING_MODEL)).inputs == ("hello",)
    parsed = parse_request(body(input=["a", "b c"], encoding_format="base64", user="u1", dimensions=DIM))
    assert parsed == EmbeddingsRequest(("a", "b c"), EMBEDDING_MODEL, "base64", "u1")


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"input": [1, 2, 3]}, "input", "token ids"),
        ({"input": [[1, 2], [3]]}, "input", "token ids"),
        ({"input": ""}, "input", "empty"),
        ({"input": ["ok", ""]}, "input", "input[1] is empty"),
        ({"input": []}, "input", "at least one"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, "input", f"limit is {MAX_INPUTS}"),
        ({"input": {"text": "x"}}, "input", "string or an array"),
        ({"input": ["x", 3.5]}, "input", "input[1] must be a string"),
        ({}, "input", "missing"),
        ({"input": "x", "dimensions": 128}, "dimensions", "must be 384"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": "x", "temperature": 1}, "temperature", "unrecognized"),
        ({"input": "\ud800"}, "input", "surrogate"),
    ],
)
def test_bad_requests_are_400_naming_the_field(fields: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body(**fields))
    assert caught.value.param == param
    assert fragment in str(caught.value)
    assert not isinstance(caught.value, NotFound)


def test_another_model_is_not_found_404() -> None:
    with pytest.raises(NotFound) as caught:
        parse_request(body(input="x", model="text-embedding-3-small"))
    assert caught.value.code == "model_not_found"
    assert grpc_util.status_for(caught.value) is grpc.StatusCode.NOT_FOUND
    # A downstream NOT_FOUND (Triton missing a model) is not passed on as the caller's 404.
    assert grpc_util._FROM_STATUS.get(grpc.StatusCode.NOT_FOUND) is None


# ---- shaping -----------------------------------------------------------------------------------------------------


def result(count: int = 2, tokens: int = 9) -> EmbeddingsResult:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    return EmbeddingsResult(EMBEDDING_MODEL, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), tokens)


def test_float_response_is_openais_shape() -> None:
    res = result()
    payload = embeddings_json(res)
    parsed = CreateEmbeddingResponse.model_validate(json.loads(json.dumps(payload)))
    assert parsed.object == "list" and parsed.model == EMBEDDING_MODEL
    assert [d.index for d in parsed.data] == [0, 1] and all(d.object == "embedding" for d in parsed.data)
    assert np.allclose(np.array(parsed.data[1].embedding), res.vectors[1], atol=1e-7)
    assert parsed.usage.prompt_tokens == parsed.usage.total_tokens == 9


def test_base64_is_little_endian_float32_bytes() -> None:
    res = result(1)
    payload = embeddings_json(res, "base64")
    encoded = payload["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert np.array_equal(decoded, res.vectors[0])


# ---- metering ------------------------------------------------------------------------------------------------------


class FakeQuotas:
    def __init__(self) -> None:
        self.reserved: list[tuple[int, int]] = []
        self.settled: list[int] = []

    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        self.reserved.append((prompt_tokens, max_tokens))
        return Reservation("r1", prompt_tokens + max_tokens, (("x-ratelimit-remaining", "7"),))

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        self.settled.append(used_tokens)


class FakeEmbedClient:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def embed(self, inputs: Sequence[str], model: str) -> EmbeddingsResult:
        if self.error is not None:
            raise self.error
        return result(len(inputs), tokens=5 * len(inputs))


PRINCIPAL = Principal("k1", Tier.FREE)


def test_one_reservation_per_call_settled_with_the_exact_count() -> None:
    quotas = FakeQuotas()
    headers: list[tuple[str, str]] = []
    request = EmbeddingsRequest(("hello there", "x"))
    out = asyncio.run(Embeddings(FakeEmbedClient(), quotas).create(PRINCIPAL, request, "req-1", headers))
    assert quotas.reserved == [(reserved_tokens(request.inputs), 0)]
    assert quotas.settled == [out.prompt_tokens] == [10]
    assert headers == [("x-ratelimit-remaining", "7")]


def test_a_failed_embed_settles_nothing_used() -> None:
    quotas = FakeQuotas()
    with pytest.raises(Unavailable):
        asyncio.run(
            Embeddings(FakeEmbedClient(Unavailable("down")), quotas).create(PRINCIPAL, EmbeddingsRequest(("a",)), "r")
        )
    assert quotas.settled == [0]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(model_dir())


def test_the_reservation_bounds_the_real_token_count(tokenizer: Any) -> None:
    texts = ["hello", "Ünïcödé naïve café", "東京は日本の首都です", "a" * 5000, "x y z " * 300, "emoji 🙂🙃 mix"]
    for text in texts:
        assert len(tokenizer.encode(text).ids) <= reserved_tokens([text]) <= MAX_TOKENS


# ---- the router's service ------------------------------------------------------------------------------------------


class FakeBackend:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.calls: list[list[int]] = []

    async def embed(self, model: str, token_ids: Sequence[int]) -> np.ndarray:
        self.calls.append(list(token_ids))
        if self.fail:
            raise Unavailable(f"{self.name} down")
        vector = np.zeros(DIM, dtype=np.float32)
        vector[len(token_ids) % DIM] = 1.0
        return vector


def test_router_tokenizes_truncates_and_counts(tokenizer: Any) -> None:
    backend = FakeBackend("t1")
    service = EmbeddingService(tokenizer, [backend])
    out = asyncio.run(service.embed(["hello world", "word " * 1000]))
    assert backend.calls[0] == tokenizer.encode("hello world").ids
    assert len(backend.calls[1]) == MAX_TOKENS  # cut to the window, as the cache's embedder does
    assert out.prompt_tokens == len(backend.calls[0]) + MAX_TOKENS
    assert out.vectors.shape == (2, DIM) and out.model == EMBEDDING_MODEL
    assert out.vectors[1][MAX_TOKENS % DIM] == 1.0  # in input order


def test_router_fails_over_to_another_replica(tokenizer: Any) -> None:
    down, up = FakeBackend("t1", fail=True), FakeBackend("t2")
    out = asyncio.run(EmbeddingService(tokenizer, [down, up]).embed(["a", "b", "c"]))
    assert out.vectors.shape == (3, DIM) and len(up.calls) == 3
    with pytest.raises(Unavailable, match="no replica"):
        asyncio.run(EmbeddingService(tokenizer, [FakeBackend("t3", fail=True)]).embed(["a"]))


def test_router_uses_fallback_backends_only_when_local_ones_fail(tokenizer: Any) -> None:
    local, remote = FakeBackend("local"), FakeBackend("remote")
    service = EmbeddingService(tokenizer)
    with pytest.raises(Unavailable, match="no Triton replica is known"):
        asyncio.run(service.embed(["a"]))
    service.add_backend(remote, fallback=True)
    service.add_backend(local)
    asyncio.run(service.embed(["a", "b"]))
    assert len(local.calls) == 2 and not remote.calls, "the other region's replica took local work"
    local.fail = True
    asyncio.run(service.embed(["a"]))
    assert len(remote.calls) == 1
    assert service.remove_backend("remote") is remote and service.remove_backend("remote") is None
    with pytest.raises(Unavailable, match="no replica could embed"):
        asyncio.run(service.embed(["a"]))


def test_router_refuses_what_it_cannot_embed(tokenizer: Any) -> None:
    service = EmbeddingService(tokenizer, [FakeBackend("t1")])
    with pytest.raises(NotFound):
        asyncio.run(service.embed(["a"], "smollm2-135m"))
    with pytest.raises(InvalidRequest, match="empty"):
        asyncio.run(service.embed(["a", ""]))
    with pytest.raises(InvalidRequest, match="at least one"):
        asyncio.run(service.embed([]))


# ---- the Triton model ----------------------------------------------------------------------------------------------


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeError:
    INVALID_ARG = 3

    def __init__(self, message: str, code: int = 0) -> None:
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor], error: FakeError | None = None) -> None:
        self.output_tensors, self.error = output_tensors, error


@pytest.fixture(scope="module")
def triton_model() -> Any:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = FakeTensor  # type: ignore[attr-defined]
    fake.TritonError = FakeError  # type: ignore[attr-defined]
    fake.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = lambda request, name: FakeTensor(name, request[name])  # type: ignore[attr-defined]
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = fake
    sys.modules.pop("triton_models.embedding_model", None)
    try:
        module = importlib.import_module("triton_models.embedding_model")
        model = module.TritonPythonModel()
        config = {"parameters": {"ort_threads": {"string_value": "1"}}}
        model.initialize({"model_config": json.dumps(config)})
        yield model
    finally:
        sys.modules.pop("triton_models.embedding_model", None)
        if saved is not None:
            sys.modules["triton_python_backend_utils"] = saved
        else:
            sys.modules.pop("triton_python_backend_utils", None)


def test_one_execute_embeds_a_batch_of_requests_like_the_numpy_encoder(triton_model: Any, tokenizer: Any) -> None:
    texts = ["What is the capital of France?", "hi", "A much longer sentence about embeddings and batching."]
    requests = [{"input_ids": np.array([tokenizer.encode(t).ids], dtype=np.int64)} for t in texts]
    # Two texts in one request, padded with 0 ([PAD]) as the contract allows.
    requests.append({"input_ids": pad_batch([tokenizer.encode(t).ids for t in texts[:2]])[0]})
    requests.append({"input_ids": np.array([[101, 999_999, 102]], dtype=np.int64)})  # outside the vocabulary
    responses = triton_model.execute(requests)
    reference = MiniLMEncoder(model_dir()).encode(texts)
    for index in range(3):
        (tensor,) = responses[index].output_tensors
        assert tensor.array.shape == (1, DIM)
        assert np.abs(tensor.array[0] - reference[index]).max() < 1e-5
    assert np.abs(responses[3].output_tensors[0].array - reference[:2]).max() < 1e-5
    assert responses[4].error is not None and responses[4].error.message.startswith("invalid request: ")


def test_config_asks_for_dynamic_batching(tmp_path: Path) -> None:
    write_embedding_model(BuildSettings(), tmp_path / EMBEDDING_MODEL)
    config = (tmp_path / EMBEDDING_MODEL / "config.pbtxt").read_text()
    assert f'name: "{EMBEDDING_MODEL}"' in config and "dynamic_batching {" in config
    assert f"max_batch_size: {EMBEDDING_MAX_BATCH}" in config and "allow_ragged_batch: true" in config
    assert f"dims: [ {DIM} ]" in config
    assert "triton_models.embedding_model" in (tmp_path / EMBEDDING_MODEL / "1" / "model.py").read_text()
    # No llmesh_model.json: the router must not take it for a chat variant.
    assert not (tmp_path / EMBEDDING_MODEL / "1" / "llmesh_model.json").exists()


def test_docs_list_the_parsed_fields() -> None:
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml").read_text())
    schema = doc["components"]["schemas"]["EmbeddingRequest"]
    assert set(schema["x-llmesh-fields"]["served"]) == set(REQUEST_FIELDS) == set(schema["properties"])
    assert schema["properties"]["input"]["oneOf"][1]["maxItems"] == MAX_INPUTS
    assert schema["properties"]["dimensions"]["enum"][0] == DIM
