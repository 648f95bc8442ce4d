"""llmesh bench: reading SSE / JSON answers (timings, tokens, cache marks, errors) and the HTTP client's outcomes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from control.bench.client import ChatClient, Target
from control.bench.stream import (
    BAD_RESPONSE,
    CONNECTION,
    OK,
    STREAM_ERROR,
    TIMEOUT,
    RequestResult,
    StreamReader,
    error_from_body,
    result_from_json,
)
from control.bench.workload import BenchRequest


def data(chunk: object) -> str:
    return "data: " + json.dumps(chunk)


def chunk(content: str | None = None, **extra: object) -> str:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return data({"id": "r", "object": "chat.completion.chunk", "model": "smollm2-135m", "choices": choices, **extra})


MESH_STREAM = [
    chunk("", llmesh_route={"variant": "smollm2-135m", "reason": "tier default"}),
    "",
    chunk("Paris"),
    "",
    chunk(" is"),
    chunk(" lovely"),
    chunk(None, usage={"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}),
    "data: [DONE]",
]
TIMES = [1.00, 1.00, 1.20, 1.20, 1.25, 1.33, 1.34, 1.35]


def read(lines: list[str], times: list[float] | None = None, start: float = 1.0) -> StreamReader:
    reader = StreamReader(3, "short", "paid", start)
    for line, now in zip(lines, times or [start] * len(lines), strict=True):
        reader.line(line, now)
    return reader


def test_mesh_stream_timings_tokens_variant_and_a_known_miss() -> None:
    r = read(MESH_STREAM, TIMES).result(end=1.4)
    assert r.status == OK and r.ok
    assert r.ttft == pytest.approx(0.2)  # the empty role chunk is not a token
    assert r.itl == pytest.approx((0.05, 0.08))
    assert (r.prompt_tokens, r.completion_tokens, r.usage_reported) == (20, 3, True)
    assert r.variant == "smollm2-135m"
    assert r.cache == "" and not r.cache_hit  # the mesh said: generated
    assert r.e2e == pytest.approx(0.4)
    assert (r.index, r.kind, r.tier) == (3, "short", "paid")


def test_cache_hit_from_the_llmesh_cache_field_or_the_route_reason() -> None:
    exact = [chunk("", llmesh_route={"variant": "v", "reason": "x; exact cache hit"}, llmesh_cache="exact")]
    exact += [chunk("hi", llmesh_cache="exact"), "data: [DONE]"]
    assert read(exact).result(2.0).cache == "exact"
    by_reason = [chunk("", llmesh_route={"variant": "v", "reason": "tier default; semantic cache hit"})]
    by_reason += [chunk("hi"), "data: [DONE]"]
    assert read(by_reason).result(2.0).cache == "hit"


def test_a_server_that_does_not_mark_the_cache_leaves_it_unknown() -> None:
    plain = [chunk("a"), chunk("b"), "data: [DONE]"]
    r = read(plain).result(2.0)
    assert r.cache is None
    # No usage reported: content chunks are counted instead.
    assert (r.completion_tokens, r.usage_reported) == (2, False)


def test_error_event_after_the_stream_started() -> None:
    lines = [chunk("a"), data({"error": {"message": "router went away", "type": "Unavailable"}}), "data: [DONE]"]
    r = read(lines).result(2.0)
    assert r.status == STREAM_ERROR and "router went away" in r.error


def test_truncated_and_garbled_streams_are_bad_responses() -> None:
    truncated = read([chunk("a")]).result(2.0)
    assert truncated.status == BAD_RESPONSE and "[DONE]" in truncated.error
    garbled = read(["data: {not json", "data: [DONE]"]).result(2.0)
    assert garbled.status == BAD_RESPONSE
    comments_and_events = read([": keep-alive", "event: message", chunk("a"), "data: [DONE]"]).result(2.0)
    assert comments_and_events.ok and comments_and_events.completion_tokens == 1


def test_json_answer() -> None:
    body = {
        "model": "smollm2-135m-int8",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
        "llmesh_route": {"variant": "smollm2-135m-int8", "reason": "tier default"},
        "llmesh_cache": "",
    }
    r = result_from_json(1, "repeat", "free", 10.0, 10.5, json.dumps(body))
    assert r.ok and r.ttft == pytest.approx(0.5) and r.itl == ()
    assert (r.prompt_tokens, r.completion_tokens, r.variant, r.cache) == (9, 2, "smollm2-135m-int8", "")
    assert result_from_json(1, "repeat", "free", 10.0, 10.5, '{"error": "x"}').status == BAD_RESPONSE


def test_error_bodies() -> None:
    assert error_from_body('{"error": {"message": "slow down", "type": "rate"}}') == "slow down"
    assert error_from_body('{"code": 16, "message": "missing API key"}') == "missing API key"
    assert error_from_body("upstream connect error") == "upstream connect error"


# --- the HTTP client, against httpx's in-process transport ------------------------------------------------------

REQUEST = BenchRequest(0, "short", "free", (("user", "hi"),), 8, 0.0, 1, "auto")


def run_client(handler: httpx.MockTransport, target: Target, stream: bool = True) -> RequestResult:
    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=handler) as http:
            return await ChatClient(http, target, stream)(REQUEST)

    return asyncio.run(go())


def test_client_streams_and_sends_the_tier_key() -> None:
    seen: dict[str, object] = {}

    async def body() -> AsyncIterator[bytes]:
        for line in MESH_STREAM:
            yield (line + "\n").encode()

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    target = Target("mesh", "http://mesh/v1/", tier_keys={"free": "lm-free", "paid": "lm-paid"})
    r = run_client(httpx.MockTransport(handler), target)
    assert seen["url"] == "http://mesh/v1/chat/completions"
    assert seen["auth"] == "Bearer lm-free"
    assert seen["body"] == REQUEST.payload(stream=True)
    assert r.status == OK and r.completion_tokens == 3

    run_client(httpx.MockTransport(handler), Target("x", "http://x/v1", api_key="k", tier_keys={"free": "lm-free"}))
    assert seen["auth"] == "Bearer k"  # a target's own key wins over tier keys
    run_client(httpx.MockTransport(handler), Target("x", "http://x/v1"))
    assert seen["auth"] is None  # no key at all: no header (servers without auth)


@pytest.mark.parametrize("stream", [True, False])
def test_client_http_errors_keep_status_and_message(stream: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"code": 8, "message": "free tier: 10 requests per minute"})

    r = run_client(httpx.MockTransport(handler), Target("m", "http://m/v1"), stream)
    assert r.status == "429" and "10 requests per minute" in r.error


def test_client_transport_failures() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    assert run_client(httpx.MockTransport(refuse), Target("m", "http://m/v1")).status == CONNECTION
    assert run_client(httpx.MockTransport(stall), Target("m", "http://m/v1")).status == TIMEOUT


def test_client_accepts_a_json_answer_to_a_stream_request() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"model": "m", "choices": [], "usage": None})

    r = run_client(httpx.MockTransport(handler), Target("m", "http://m/v1"))
    assert r.status == OK and r.variant == "m"
