"""Clients of the mesh benchmark.

`ChatStreamClient` has the shape benchmarks.engine's closed-loop `load` drives (`stream(prompt, max_tokens)` yields
token counts as they arrive, `close()`), for any OpenAI-compatible /v1/chat/completions: Envoy's and
llama-server's. The other helpers time one call of one path (seconds to the first token, or to the whole answer).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import httpx
from google.protobuf.message import Message

from llmesh.types import SamplingParams, Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc
from router.triton_client import TritonReplica


def sse_event(line: str) -> dict[str, object] | None:
    """The JSON object of one `data:` line of an SSE stream; None for other lines and for [DONE]."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"not a JSON object: {data[:100]}")
    if "error" in event:
        raise RuntimeError(f"error in the stream: {data[:300]}")
    return event


def content_and_usage(event: Mapping[str, object]) -> tuple[str, int | None]:
    """The delta text of an OpenAI chat chunk and its usage's completion_tokens (None when it carries none)."""
    text = ""
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            text = delta["content"]
    usage = event.get("usage")
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return text, completion if isinstance(completion, int) else None


class ChatStreamClient:
    """Streaming POST <base>/v1/chat/completions; each prompt is one user turn.

    Yields 1 per chunk with content as it arrives; when the server's final usage counts more tokens than chunks
    (text held back, e.g. for stop strings or a split UTF-8 character), the difference comes with the last chunk.
    """

    def __init__(
        self, base_url: str, api_key: str, model: str, concurrency: int, extra: Mapping[str, object] | None = None
    ) -> None:
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=600,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.model = model
        self.extra = dict(extra or {})

    def body(self, prompt: str, max_tokens: int) -> dict[str, object]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra,
        }

    async def stream(self, prompt: str, max_tokens: int) -> AsyncIterator[int]:
        chunks, usage = 0, None
        # A pooled keep-alive connection the server has closed meanwhile (llama-server's HTTP library closes one after
        # a few requests) fails before anything comes back; that request is sent once more on a new connection, as
        # the openai SDK would. A failure after the first chunk is the server's and is raised.
        body = self.body(prompt, max_tokens)
        for attempt in (1, 2):
            try:
                async with self.http.stream("POST", "/v1/chat/completions", json=body) as reply:
                    if reply.status_code != 200:
                        raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
                    async for line in reply.aiter_lines():
                        event = sse_event(line)
                        if event is None:
                            continue
                        text, completion = content_and_usage(event)
                        usage = completion if completion is not None else usage
                        if text:
                            chunks += 1
                            yield 1
                break
            except httpx.RemoteProtocolError:
                if attempt == 2 or chunks or usage is not None:
                    raise
        if usage is not None and usage > chunks:
            yield usage - chunks

    async def close(self) -> None:
        await self.http.aclose()


# ---- one timed call per path (the TTFT breakdown) --------------------------------------------------------------


async def ttft_http(http: httpx.AsyncClient, body: Mapping[str, object]) -> float:
    """Seconds from sending a streaming chat request to its first content chunk; reads the rest."""
    start = time.perf_counter()
    first = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            event = sse_event(line)
            if first is None and event is not None and content_and_usage(event)[0]:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("no content in the stream")
    return first - start


async def ttft_chat_grpc(
    stub: chat_pb2_grpc.ChatServiceStub, request: chat_pb2.ChatCompletionRequest, metadata: list[tuple[str, str]]
) -> float:
    start = time.perf_counter()
    first = None
    async for chunk in stub.StreamChatCompletion(request, metadata=metadata, timeout=120):
        if first is None and chunk.delta:
            first = time.perf_counter()
    if first is None:
        raise RuntimeError("no content in the stream")
    return first - start


async def ttft_router(stub: router_pb2_grpc.RouterServiceStub, request: router_pb2.GenerateRequest) -> float:
    start = time.perf_counter()
    first = None
    async for chunk in stub.Generate(request, timeout=120):
        if first is None and chunk.delta:
            first = time.perf_counter()
    if first is None:
        raise RuntimeError("no content in the stream")
    return first - start


async def ttft_triton(replica: TritonReplica, variant: str, request_id: str, prompt: list[int], tokens: int) -> float:
    start = time.perf_counter()
    first = None
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    async for chunk in replica.stream(variant, request_id, prompt, params, Tier.ENTERPRISE):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
    if first is None:
        raise RuntimeError("no tokens from Triton")
    return first - start


def tier_field(message: type[Message], tier: Tier, field: str = "tier") -> Any:
    """The value of a message's tier field: the contracts carry the tier as text ("paid") in older stubs and as
    the enum common_pb2.Tier (TIER_PAID) in newer ones; the field's name is the same in both."""
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    if descriptor.enum_type is None:
        return tier.value
    return descriptor.enum_type.values_by_name[f"TIER_{tier.value.upper()}"].number


def user_turn(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role="user", content=text)]


async def close_channels(*channels: grpc.aio.Channel) -> None:
    for channel in channels:
        await channel.close()
