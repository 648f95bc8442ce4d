"""The response cache in the whole mesh (Envoy -> gateway -> cache service + router -> Triton), with real Redis.

Each test makes its own API keys, so entries are scoped to it and other tests never hit them.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from control.launcher import redis_answers
from control.process import ManagedProcess, free_port
from llmesh.types import Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.fixtures.cache import CacheServer, start_cache_server
from tests.fixtures.mesh import RunningMesh


def question(topic: str) -> str:
    # A fresh question per test run: nothing cached from earlier runs on a reused Redis.
    return f"In one sentence, what is {topic}? (ref {uuid.uuid4().hex[:6]})"


def grpc_request(text: str, max_tokens: int = 16) -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(
        messages=[common_pb2.ChatMessage(role="user", content=text)], temperature=0, max_tokens=max_tokens
    )


def stream(target: str, key: str, text: str, mesh: RunningMesh | None = None) -> list[chat_pb2.ChatCompletionChunk]:
    """Through Envoy (plaintext at the edge), or to an internal gateway with `mesh`'s client certificate."""
    with mesh.channel(target) if mesh else grpc.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        return list(
            stub.StreamChatCompletion(grpc_request(text), metadata=[("authorization", f"Bearer {key}")], timeout=120)
        )


def sse_events(mesh: RunningMesh, key: str, payload: dict) -> list[dict]:  # type: ignore[type-arg]
    events = []
    with httpx.stream(
        "POST",
        f"{mesh.http_base}/v1/chat/completions",
        json=payload,
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def triton_requests(metrics_url: str) -> float:
    """Generations Triton ran, over all models (each request to the LLM is one)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(m) for m in re.findall(r"^nv_inference_request_success\{[^}]*\} (\S+)$", text, re.M))


def test_stream_replay_equals_the_original_chunks_on_every_api(mesh: RunningMesh) -> None:
    key = mesh.create_key(Tier.PAID)
    text = question("the Eiffel Tower")
    first = stream(mesh.grpc_target, key, text)
    deltas = [c.delta for c in first if c.delta]
    assert len(deltas) > 3 and all(c.cache == "" for c in first)

    again = stream(mesh.grpc_target, key, text)
    # Same chunk contract as a live answer: route first, the same deltas one by one, then finish_reason + usage.
    assert [c.delta for c in again if c.delta] == deltas
    assert all(c.cache == "exact" for c in again)
    assert again[0].route.variant == first[0].route.variant and "exact cache hit" in again[0].route.reason
    assert again[-1].finish_reason == first[-1].finish_reason
    assert again[-1].usage == first[-1].usage

    with grpc.insecure_channel(mesh.grpc_target) as channel:
        unary = chat_pb2_grpc.ChatServiceStub(channel).CreateChatCompletion(
            grpc_request(text), metadata=[("authorization", f"Bearer {key}")], timeout=120
        )
    assert unary.text == "".join(deltas) and unary.cache == "exact"

    # Typed HTTP/JSON through Envoy's transcoder.
    typed = httpx.post(
        f"{mesh.http_base}/v1/llmesh/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 16},
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
    ).json()
    assert typed["cache"] == "exact" and typed["text"] == "".join(deltas)

    # OpenAI JSON and SSE.
    payload = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 16}
    events = sse_events(mesh, key, {**payload, "stream": True})
    streamed = [
        e["choices"][0]["delta"]["content"] for e in events if e["choices"] and e["choices"][0]["delta"].get("content")
    ]
    assert streamed == deltas
    assert all(e.get("llmesh_cache") == "exact" for e in events)
    client = openai.OpenAI(base_url=f"{mesh.http_base}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="auto", **payload)  # type: ignore[call-overload]
    assert reply.choices[0].message.content == "".join(deltas)
    assert (reply.model_extra or {}).get("llmesh_cache") == "exact"


def test_tenants_never_share_entries(mesh: RunningMesh) -> None:
    owner, other = mesh.create_key(Tier.PAID), mesh.create_key(Tier.PAID)
    text = question("a lighthouse")
    stream(mesh.grpc_target, owner, text)
    assert all(c.cache == "exact" for c in stream(mesh.grpc_target, owner, text))
    assert all(c.cache == "" for c in stream(mesh.grpc_target, other, text))


def test_single_flight_identical_concurrent_requests_generate_once(mesh: RunningMesh, triton_server) -> None:  # type: ignore[no-untyped-def]
    key = mesh.create_key(Tier.PAID)
    text = question("a glacier")
    before = triton_requests(triton_server.metrics_url)
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: stream(mesh.grpc_target, key, text), range(6)))
    # Triton counts a decoupled request once its final response is out, a moment after the client has it.
    deadline = time.monotonic() + 10
    while triton_requests(triton_server.metrics_url) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # and any second generation would have finished by now too
    generations = triton_requests(triton_server.metrics_url) - before
    assert generations == 1, f"{generations} generations for 6 identical concurrent requests"
    texts = {"".join(c.delta for c in chunks) for chunks in answers}
    assert len(texts) == 1
    flags = sorted(chunks[0].cache for chunks in answers)
    assert flags == [""] + ["exact"] * 5


@dataclass
class SideGateway:
    target: str
    process: ManagedProcess


def start_gateway(mesh: RunningMesh, cache_url: str, log_dir: Path) -> SideGateway:
    port = free_port()
    argv = [
        sys.executable, "-m", "gateway", "--port", str(port),
        "--router-url", f"127.0.0.1:{mesh.settings.router.port}", "--redis-url", mesh.redis_url,
        "--cache-url", cache_url, "--metrics-port", "0", *mesh.tls_flags("gateway"),
    ]  # fmt: skip
    process = ManagedProcess("gateway", argv, log_dir / f"gateway-{port}.log").start()
    process.wait_ready(mesh.health_probe(f"127.0.0.1:{port}"), timeout=60)
    return SideGateway(f"127.0.0.1:{port}", process)


@pytest.fixture
def cache_redis(tmp_path: Path) -> Iterator[tuple[str, ManagedProcess]]:
    """A Redis for the cache alone, apart from the key store's, so the test can take it down."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = ManagedProcess("cache-redis", [*argv, "--dir", str(tmp_path)], tmp_path / "cache-redis.log").start()
    proc.wait_ready(lambda: redis_answers(url), timeout=20)
    yield url, proc
    proc.stop()


def cache_metric(server: CacheServer, name: str, **labels: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" + wanted + "}" if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_cache_redis_down_requests_still_served(
    mesh: RunningMesh, cache_redis: tuple[str, ManagedProcess], tmp_path: Path
) -> None:
    url, redis_proc = cache_redis
    cache = start_cache_server(url, tmp_path, "--semantic-threshold", "0", "--breaker-cooldown-s", "30", mesh=mesh)
    gateway = start_gateway(mesh, cache.target, tmp_path)
    try:
        key = mesh.create_key(Tier.PAID)
        text = question("a volcano")
        assert all(c.cache == "" for c in stream(gateway.target, key, text, mesh))
        assert all(c.cache == "exact" for c in stream(gateway.target, key, text, mesh))

        redis_proc.stop()
        started = time.monotonic()
        served = [stream(gateway.target, key, text, mesh) for _ in range(3)]
        elapsed = time.monotonic() - started
        for chunks in served:  # generated again, no error
            assert all(c.cache == "" for c in chunks)
            # Not compared with `generated` token for token: a repeat of the prompt reuses its KV blocks from the
            # engine's prefix cache, and a prefill computed in other chunk shapes sums in another order, which
            # can flip a near-tie in greedy decoding (seen once in CI).
            assert "".join(c.delta for c in chunks).strip()
            assert chunks[-1].finish_reason in ("stop", "length")
        assert cache_metric(cache, "llmesh_cache_backend_up") == 0
        assert cache_metric(cache, "llmesh_cache_bypassed_total", reason="backend_down") >= 3
        # Three generations of 16 tokens; the cache added at most one short Redis timeout, not one per call.
        assert elapsed < 60

        # The cache service itself gone: the gateway bypasses it too.
        cache.process.stop()
        chunks = stream(gateway.target, key, text, mesh)
        assert chunks[-1].finish_reason in ("stop", "length") and all(c.cache == "" for c in chunks)
    finally:
        gateway.process.stop()
        cache.process.stop()
