"""TLS at the edge, and the edge timeouts that need a real gateway behind it: a whole mesh started with
`--tls-cert/--tls-key` (a certificate made here, by a CA made here) and short edge timeouts.

The official openai SDK and a gRPC client trusting that CA work over the one TLS port; plaintext and clients that do
not trust the CA fail at once. A non-streaming answer that takes longer than the stream idle timeout still arrives;
a request whose body stalls is refused when the body timeout runs out."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from llmesh.types import Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.fixtures.edge import read_until_closed, write_server_certificate
from tests.fixtures.mesh import RunningMesh, run_mesh

QUESTION = "What is the capital of France? Answer in one sentence."
STREAM_IDLE_S = 1.0
BODY_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class TlsMesh:
    mesh: RunningMesh
    ca_file: Path
    key: str

    @property
    def port(self) -> int:
        return self.mesh.settings.http_port

    @property
    def https_base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def openai(self) -> openai.OpenAI:
        # The SDK's own httpx client class, trusting the test's CA.
        http_client = openai.DefaultHttpxClient(verify=self.ssl_context(), timeout=120)
        return openai.OpenAI(base_url=f"{self.https_base}/v1", api_key=self.key, http_client=http_client, max_retries=0)

    def channel(self) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())
        return grpc.secure_channel(f"localhost:{self.port}", credentials)

    @property
    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.key}")]


@pytest.fixture(scope="module")
def tls_mesh(triton_server, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMesh]:  # type: ignore[no-untyped-def]
    cert, key, ca = write_server_certificate(tmp_path_factory.mktemp("edge-certs"))
    for running in run_mesh(
        triton_server,
        redis_url,
        tmp_path_factory,
        "tls-mesh",
        max_tokens_limit=1024,
        # No response cache: a long generation must really run (a similar prompt would be a semantic cache hit).
        cache_enabled=False,
        tls_cert=cert,
        tls_key=key,
        edge_stream_idle_timeout_s=STREAM_IDLE_S,
        edge_request_body_timeout_s=BODY_TIMEOUT_S,
    ):
        yield TlsMesh(running, ca, running.create_key(Tier.ENTERPRISE))


def test_openai_sdk_over_tls(tls_mesh: TlsMesh) -> None:
    client = tls_mesh.openai()
    reply = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40
    )
    assert "Paris" in (reply.choices[0].message.content or "")

    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        deltas += [c.delta.content for c in chunk.choices if c.delta.content]
    assert len(deltas) > 3 and "Paris" in "".join(deltas)
    assert usage is not None and usage.completion_tokens >= len(deltas)
    assert next(m.id for m in client.models.list()) == "auto"


def test_grpc_over_tls(tls_mesh: TlsMesh) -> None:
    request = chat_pb2.ChatCompletionRequest(
        messages=[common_pb2.ChatMessage(role="user", content=QUESTION)], temperature=0, max_tokens=40
    )
    with tls_mesh.channel() as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        chunks = list(stub.StreamChatCompletion(request, metadata=tls_mesh.auth, timeout=120))
        assert "Paris" in "".join(c.delta for c in chunks)
        assert chunks[-1].finish_reason in ("stop", "length")
        unary = stub.CreateChatCompletion(request, metadata=tls_mesh.auth, timeout=120)
        assert unary.text == "".join(c.delta for c in chunks)


def test_http2_is_negotiated_by_alpn(tls_mesh: TlsMesh) -> None:
    with socket.create_connection(("127.0.0.1", tls_mesh.port), timeout=10) as raw:
        context = tls_mesh.ssl_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
    with socket.create_connection(("127.0.0.1", tls_mesh.port), timeout=10) as raw:
        context = tls_mesh.ssl_context()
        context.set_alpn_protocols(["http/1.1"])
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"


def test_plaintext_and_untrusted_clients_fail_cleanly(tls_mesh: TlsMesh) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_mesh.port}/v1/models", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_mesh.https_base}/v1/models", timeout=10)  # the system's CAs do not know this one
    with grpc.insecure_channel(f"127.0.0.1:{tls_mesh.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.RpcError) as plaintext:
            stub.ListModels(chat_pb2.ListModelsRequest(), metadata=tls_mesh.auth, timeout=10)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10, "refused at once, not after a timeout"
    # The edge still serves after them.
    assert tls_mesh.openai().models.list().data


def test_non_streaming_answer_longer_than_the_stream_idle_timeout(tls_mesh: TlsMesh) -> None:
    """A non-streaming answer is silent until the generation is done; it still arrives when that takes several times
    the stream idle timeout (1 s here), over HTTP/JSON and over gRPC."""
    # SmolLM2 fp32 goes on to max_tokens with this prompt (measured: 1024 tokens of 1024); pinned, since `auto`
    # may land on the int8 twin, which can end the story sooner.
    prompt, model = "Write a long story about a lighthouse keeper.", "smollm2-135m"
    started = time.monotonic()
    reply = tls_mesh.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=256
    )
    elapsed = time.monotonic() - started
    assert reply.usage is not None and reply.choices[0].finish_reason == "length"
    assert elapsed > 2 * STREAM_IDLE_S, f"the answer took {elapsed:.1f}s: not long enough to test anything"

    request = chat_pb2.ChatCompletionRequest(
        model=model, messages=[common_pb2.ChatMessage(role="user", content=prompt)], temperature=0, max_tokens=192
    )
    with tls_mesh.channel() as channel:
        started = time.monotonic()
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        unary = stub.CreateChatCompletion(request, metadata=tls_mesh.auth, timeout=300)
        elapsed = time.monotonic() - started
    assert unary.finish_reason == "length"
    assert elapsed > 2 * STREAM_IDLE_S, f"the gRPC answer took {elapsed:.1f}s: not long enough to test anything"


def test_stalled_body_is_refused_at_the_body_timeout(tls_mesh: TlsMesh) -> None:
    """Headers promise 1000 bytes, 10 arrive, then nothing: 408 in OpenAI's shape once the whole request is
    BODY_TIMEOUT_S late (the gateway waited for the rest meanwhile), and the connection is closed."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {tls_mesh.key}\r\ncontent-length: 1000\r\n\r\n"
    )
    context = tls_mesh.ssl_context()
    with (
        socket.create_connection(("127.0.0.1", tls_mesh.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        started = time.monotonic()
        tls.sendall(head.encode() + b'{"model": ')
        received, _ = read_until_closed(tls, 15)
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b'"code":"request_timeout"' in received
    assert BODY_TIMEOUT_S - 0.1 <= elapsed < BODY_TIMEOUT_S + 4, f"cut after {elapsed:.2f}s"
