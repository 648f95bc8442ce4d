"""OpenAI chat-completions JSON <-> llmesh types, for POST /v1/chat/completions (plain JSON or SSE)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.validation import ChatRequestFields
from llmesh.errors import InvalidRequest
from llmesh.types import RouteInfo, Usage


@dataclass(frozen=True)
class OpenAIRequest:
    fields: ChatRequestFields
    stream: bool
    include_usage: bool


def _expect(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got a boolean")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidRequest(f"{name} must be of type {expected}, got {type(value).__name__}")
    return value


def _content_text(content: Any, name: str) -> str:
    """Content is a string, or a list of parts of which llmesh serves the text ones."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            part = _expect(part, dict, f"{name}[{i}]")
            if part.get("type") != "text":
                raise InvalidRequest(f"{name}[{i}].type {part.get('type')!r} is not supported; only 'text' is")
            texts.append(_expect(part.get("text"), str, f"{name}[{i}].text"))
        return "".join(texts)
    if content is None:
        raise InvalidRequest(f"{name} is missing")
    raise InvalidRequest(f"{name} must be a string or a list of text parts")


def parse_request(body: bytes) -> OpenAIRequest:
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    payload = _expect(payload, dict, "request body")

    raw_messages = _expect(payload.get("messages"), list, "messages") if "messages" in payload else []
    messages = []
    for i, message in enumerate(raw_messages):
        message = _expect(message, dict, f"messages[{i}]")
        role = _expect(message.get("role"), str, f"messages[{i}].role")
        messages.append((role, _content_text(message.get("content"), f"messages[{i}].content")))

    def optional_number(name: str, kind: type | tuple[type, ...]) -> Any:
        value = payload.get(name)
        return None if value is None else _expect(value, kind, name)

    max_tokens = optional_number("max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = optional_number("max_tokens", int)
    n = optional_number("n", int)
    if n not in (None, 1):
        raise InvalidRequest(f"n must be 1, got {n}: llmesh returns one choice per request")

    stop = payload.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    else:
        stops = [_expect(s, str, "stop[]") for s in _expect(stop, list, "stop")]

    stream = bool(_expect(payload.get("stream", False), bool, "stream"))
    options = payload.get("stream_options") or {}
    include_usage = bool(_expect(options, dict, "stream_options").get("include_usage", False))
    model = payload.get("model", "")
    return OpenAIRequest(
        fields=ChatRequestFields(
            model=_expect(model if model is not None else "", str, "model"),
            messages=messages,
            max_tokens=max_tokens,
            temperature=optional_number("temperature", (int, float)),
            top_p=optional_number("top_p", (int, float)),
            seed=optional_number("seed", int),
            stop=stops,
            user=_expect(payload.get("user") or "", str, "user"),
        ),
        stream=stream,
        include_usage=include_usage,
    )


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _route(route: RouteInfo) -> dict[str, str]:
    # `kind` names the deciding factor (tier_default, pinned, complexity_up, load_shed, fallback, cache_hit, ...);
    # `reason` tells the whole story for people.
    return {"variant": route.variant, "reason": route.reason, "kind": route.kind.value}


def completion_json(
    request_id: str, created: int, route: RouteInfo, text: str, finish_reason: str, usage: Usage, cache: str = ""
) -> bytes:
    return json.dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": route.variant,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(usage),
            "llmesh_route": _route(route),
            # "" when generated for this request, "exact" or "semantic" when served from the response cache.
            "llmesh_cache": cache,
        },
        ensure_ascii=False,
    ).encode()


def sse_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, str] | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    route: RouteInfo | None = None,
    cache: str = "",
) -> bytes:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        chunk["usage"] = _usage(usage)
    if route is not None:
        chunk["llmesh_route"] = _route(route)
    if cache:
        chunk["llmesh_cache"] = cache
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(message: str, kind: str) -> bytes:
    """An error after the stream started: HTTP status is already 200, so it goes in the stream (as OpenAI does)."""
    return b"data: " + json.dumps({"error": {"message": message, "type": kind}}).encode() + b"\n\n"
