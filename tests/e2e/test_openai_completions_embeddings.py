"""End to end through Envoy with the openai SDK: /v1/embeddings (the embedding model on Triton), /v1/completions
(a raw prompt, plain and streamed) and /v1/models/{id}."""

from __future__ import annotations

import base64

import grpc
import numpy as np
import openai
import pytest

from cache_service.embedding import MiniLMEncoder
from llmesh.minilm import DIM, EMBEDDING_MODEL, model_dir
from llmesh.v1 import chat_pb2, chat_pb2_grpc
from tests.fixtures.mesh import RunningMesh

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(mesh: RunningMesh, paid_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http_base}/v1", api_key=paid_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference() -> MiniLMEncoder:
    return MiniLMEncoder(model_dir())


def test_embeddings_of_one_text(client: openai.OpenAI, reference: MiniLMEncoder) -> None:
    reply = client.embeddings.create(model=EMBEDDING_MODEL, input="What is the capital of France?")
    assert reply.object == "list" and reply.model == EMBEDDING_MODEL and len(reply.data) == 1
    vector = np.array(reply.data[0].embedding, dtype=np.float32)
    assert vector.shape == (DIM,)
    assert np.abs(vector - reference.encode(["What is the capital of France?"])[0]).max() < 1e-5
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 2


def test_embeddings_of_a_list_in_order(client: openai.OpenAI, reference: MiniLMEncoder) -> None:
    texts = ["first text", "a second, longer text about something else", "third"]
    reply = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    assert [d.index for d in reply.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert np.abs(vectors - reference.encode(texts)).max() < 1e-5


def test_embeddings_as_base64(client: openai.OpenAI, reference: MiniLMEncoder, mesh: RunningMesh) -> None:
    # The SDK asks for base64 by default and decodes it itself; the raw answer is checked too.
    raw = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=["hello"], encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert np.abs(decoded - reference.encode(["hello"])[0]).max() < 1e-5
    assert raw.http_response.headers.get("x-ratelimit-remaining") is not None


def test_embeddings_refusals_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=EMBEDDING_MODEL, input="")
    assert "empty" in str(empty.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBEDDING_MODEL, input="x", dimensions=64)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_embeddings_need_a_key(mesh: RunningMesh) -> None:
    anonymous = openai.OpenAI(base_url=f"{mesh.http_base}/v1", api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.embeddings.create(model=EMBEDDING_MODEL, input="x")


def test_typed_embeddings_over_grpc(mesh: RunningMesh, paid_key: str, reference: MiniLMEncoder) -> None:
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        reply = chat_pb2_grpc.ChatServiceStub(channel).CreateEmbeddings(
            chat_pb2.EmbeddingsRequest(input=["alpha", "beta"]),
            metadata=(("authorization", f"Bearer {paid_key}"),),
            timeout=60,
        )
    vectors = np.array([list(e.values) for e in reply.data], dtype=np.float32)
    assert np.abs(vectors - reference.encode(["alpha", "beta"])).max() < 1e-5
    assert reply.model == EMBEDDING_MODEL and reply.usage.prompt_tokens == reply.usage.total_tokens > 0


def test_completion_continues_a_prompt(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="auto", prompt=PROMPT, max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    (choice,) = reply.choices
    assert choice.text and choice.finish_reason in ("stop", "length") and choice.index == 0
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    # A raw prompt is not wrapped in a chat template: it is a handful of tokens.
    assert reply.usage.prompt_tokens < 12


def test_completion_defaults_to_16_tokens_and_answers_several_prompts(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="auto", prompt=[PROMPT, "1, 2, 3, 4,"], temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage is not None and reply.usage.completion_tokens <= 2 * 16


def test_completion_streams(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="auto", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    texts, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "text_completion"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts.append(choice.text)
            finish = choice.finish_reason or finish
    plain = client.completions.create(model="auto", prompt=PROMPT, max_tokens=8, temperature=0)
    assert "".join(texts) == plain.choices[0].text
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0


def test_completion_refuses_echo(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="auto", prompt=PROMPT, echo=True)
    assert "echo" in str(caught.value)


def test_models_retrieve_and_404(client: openai.OpenAI) -> None:
    listed = {m.id for m in client.models.list()}
    assert {"auto", EMBEDDING_MODEL} <= listed
    for model_id in listed:
        model = client.models.retrieve(model_id)
        assert model.id == model_id and model.object == "model" and model.owned_by == "llmesh"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4-does-not-exist")
    assert caught.value.status_code == 404
    body = caught.value.body
    assert isinstance(body, dict) and body.get("code") == "model_not_found", body


def test_get_model_over_grpc_is_not_found(mesh: RunningMesh, paid_key: str) -> None:
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetModel(
                chat_pb2.GetModelRequest(id="nope"), metadata=(("authorization", f"Bearer {paid_key}"),), timeout=10
            )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
