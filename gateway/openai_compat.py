"""OpenAI chat-completions JSON <-> llmesh types, for POST /v1/chat/completions (plain JSON or SSE), and errors in
OpenAI's shape.

Which request fields are served, accepted and ignored, or refused (docs/openapi.yaml says the same to clients):
- served: model, messages, max_tokens / max_completion_tokens, temperature, top_p, seed, stop, stream,
  stream_options.include_usage, n (1 only), user;
- accepted and ignored, after a type check, because they do not change the answer: metadata, store, service_tier,
  parallel_tool_calls, prompt_cache_key, safety_identifier, and in a message name, refusal, annotations;
- refused unless neutral (null, or the value that means "off") because llmesh cannot honour them: tools,
  tool_choice, functions, function_call, logit_bias, logprobs, top_logprobs, frequency_penalty, presence_penalty,
  response_format (only {"type": "text"}), modalities (only ["text"]), audio, prediction, web_search_options,
  reasoning_effort, verbosity; in a message tool_calls, tool_call_id, function_call, audio;
- any other field is refused, as OpenAI itself does. `null` always means "the default".
The body is bounded before it is read: size, nesting depth, number of values, integer literals of at most
MAX_INT_DIGITS digits, no NaN/Infinity (not JSON), no duplicate keys, valid Unicode in every string and key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.validation import ChatRequestFields, RequestLimits, check_field, check_text
from llmesh import errors
from llmesh.errors import InvalidRequest, MeshError, quote
from llmesh.types import RouteInfo, Usage

# Longer integer literals are refused (int64 needs 19 digits) before Python converts them (its own limit is 4300).
MAX_INT_DIGITS = 24
# OpenAI's own bounds of `metadata`.
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


@dataclass(frozen=True)
class OpenAIRequest:
    fields: ChatRequestFields
    stream: bool
    include_usage: bool


class _HugeNumber:
    """Stands in for a numeric literal too long to convert; any field that reads it refuses it by name."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> int | _HugeNumber:
    return _HugeNumber(len(text)) if len(text) > MAX_INT_DIGITS else int(text)


def _parse_constant(name: str) -> Any:
    raise InvalidRequest(f"request body holds {name}, which is not a JSON number", param=None)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidRequest(f"request body repeats the key {quote(key)} in one object")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_constant=_parse_constant, object_pairs_hook=_unique_keys, strict=True
)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | _HugeNumber):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_tree(payload: Any, limits: RequestLimits) -> None:
    """Depth, size and Unicode of the whole body, ignored fields included (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, str, int]] = [(payload, "request body", 1)]
    values = 1
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            values += len(value)  # children counted before they are stacked: a huge array never becomes a huge stack
        if values > limits.max_json_values:
            raise InvalidRequest(f"request body holds more than {limits.max_json_values} JSON values")
        if depth > limits.max_json_depth:
            shown = path if len(path) <= 60 else path[:60] + "..."
            raise InvalidRequest(f"request body nests deeper than {limits.max_json_depth} levels (at {shown})")
        if isinstance(value, str):
            check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                check_text(key, f"a key in {path}")
                name = key if len(key) <= 40 else key[:40] + "..."
                stack.append((item, f"{path}.{name}" if depth > 1 else name, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def decode_body(body: bytes, limits: RequestLimits) -> Any:
    if len(body) > limits.max_body_bytes:
        raise InvalidRequest(f"request body is {len(body)} bytes; the limit is {limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        payload = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise InvalidRequest(f"request body nests deeper than {limits.max_json_depth} levels") from None
    _check_tree(payload, limits)
    return payload


def _param(name: str) -> str | None:
    return None if name == "request body" else name


def _expect(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    number = kind in (int, float, (int, float))
    if number and isinstance(value, _HugeNumber):
        raise InvalidRequest(f"{name} is a {value.digits}-digit number; out of range", param=name)
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) and number:
        raise InvalidRequest(f"{name} must be a number, got a boolean", param=name)
    if not isinstance(value, kind):
        expected = {
            str: "a string",
            int: "an integer",
            float: "a number",
            bool: "a boolean",
            list: "an array",
            dict: "an object",
        }
        want = " or ".join(expected[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        if kind == (int, float):
            want = "a number"
        raise InvalidRequest(f"{name} must be {want}, got {_json_type(value)}", param=_param(name))
    return value


def _content_text(content: Any, name: str, limits: RequestLimits) -> str:
    """Content is a string, or a list of parts of which llmesh serves the text ones."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if len(content) > limits.max_content_parts:
            raise InvalidRequest(
                f"{name} holds {len(content)} parts; the limit is {limits.max_content_parts}", param=name
            )
        texts = []
        for i, part in enumerate(content):
            part = _expect(part, dict, f"{name}[{i}]")
            if part.get("type") != "text":
                raise InvalidRequest(
                    f"{name}[{i}].type {quote(part.get('type'))} is not supported; only 'text' is",
                    param=f"{name}[{i}].type",
                )
            _refuse_unknown(part, {"type", "text"}, f"{name}[{i}]")
            texts.append(_expect(part.get("text"), str, f"{name}[{i}].text"))
        return "".join(texts)
    if content is None:
        raise InvalidRequest(f"{name} is missing", param=name)
    raise InvalidRequest(f"{name} must be a string or an array of text parts, got {_json_type(content)}", param=name)


def _refuse_unknown(obj: dict[str, Any], known: set[str] | frozenset[str], where: str) -> None:
    for key in obj:
        if key not in known:
            param = f"{where}.{key}" if where else key
            raise InvalidRequest(
                f"unrecognized request argument {quote(key)}{' in ' + where if where else ''}",
                param=param[:80],
                code="unknown_parameter",
            )


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _never(value: Any) -> bool:
    return False


# OpenAI fields llmesh cannot honour: accepted only when null or neutral (described for the error), else refused.
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: v == [], "[]"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none" or "auto"'),
    "functions": (lambda v: v == [], "[]"),
    "function_call": (lambda v: v in ("none", "auto"), '"none" or "auto"'),
    "logit_bias": (lambda v: v == {}, "{}"),
    "logprobs": (lambda v: v is False, "false"),
    "top_logprobs": (_is_zero, "0"),
    "frequency_penalty": (_is_zero, "0"),
    "presence_penalty": (_is_zero, "0"),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}'),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "audio": (_never, ""),
    "prediction": (_never, ""),
    "web_search_options": (_never, ""),
    "reasoning_effort": (_never, ""),
    "verbosity": (_never, ""),
}
# OpenAI fields that do not change the answer: type-checked, then ignored.
_IGNORED: dict[str, type] = {
    "store": bool,
    "service_tier": str,
    "parallel_tool_calls": bool,
    "prompt_cache_key": str,
    "safety_identifier": str,
}
_SERVED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "user",
    }
)
# Checked against OpenAI's own bounds (_metadata), then ignored.
_METADATA = "metadata"
_KNOWN = _SERVED | set(_NEUTRAL) | set(_IGNORED) | {_METADATA}
# What docs/openapi.yaml documents (tests/unit/test_openapi.py keeps the two in step).
REQUEST_FIELDS = {
    "served": _SERVED,
    "ignored": frozenset({*_IGNORED, _METADATA}),
    "refused_unless_neutral": frozenset(_NEUTRAL),
}
_MESSAGE_SERVED = frozenset({"role", "content", "name"})
_MESSAGE_IGNORED = frozenset({"refusal", "annotations"})
_MESSAGE_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tool_calls": (lambda v: v == [], "[]"),
    "tool_call_id": (_never, ""),
    "function_call": (_never, ""),
    "audio": (_never, ""),
}
_MESSAGE_KNOWN = _MESSAGE_SERVED | _MESSAGE_IGNORED | set(_MESSAGE_NEUTRAL)
MESSAGE_FIELDS = {
    "served": _MESSAGE_SERVED,
    "ignored": _MESSAGE_IGNORED,
    "refused_unless_neutral": frozenset(_MESSAGE_NEUTRAL),
}


def _refuse_unless_neutral(
    obj: dict[str, Any], neutral: dict[str, tuple[Callable[[Any], bool], str]], where: str
) -> None:
    for key, (is_neutral, described) in neutral.items():
        value = obj.get(key)
        if value is not None and not is_neutral(value):
            param = f"{where}.{key}" if where else key
            accepted = f"null or {described}" if described else "null"
            raise InvalidRequest(
                f"{param} is not supported by llmesh; it accepts only {accepted} here",
                param=param,
                code="unsupported_parameter",
            )


def _metadata(value: Any, limits: RequestLimits) -> None:
    if value is None:
        return
    meta = _expect(value, dict, "metadata")
    if len(meta) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"metadata holds {len(meta)} keys; the limit is {MAX_METADATA_KEYS}", param="metadata")
    for key, item in meta.items():
        check_field(key, "a metadata key", MAX_METADATA_KEY_CHARS)
        check_field(_expect(item, str, f"metadata[{quote(key, 20)}]"), "a metadata value", MAX_METADATA_VALUE_CHARS)


def parse_request(body: bytes, limits: RequestLimits | None = None) -> OpenAIRequest:
    limits = limits or RequestLimits()
    payload = _expect(decode_body(body, limits), dict, "request body")
    _refuse_unknown(payload, _KNOWN, "")
    _refuse_unless_neutral(payload, _NEUTRAL, "")
    for name, kind in _IGNORED.items():
        if payload.get(name) is not None:
            _expect(payload[name], kind, name)
    _metadata(payload.get(_METADATA), limits)

    raw_messages = payload.get("messages")
    if raw_messages is None:
        raise InvalidRequest("messages is missing: a request holds at least one message", param="messages")
    raw_messages = _expect(raw_messages, list, "messages")
    if len(raw_messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages holds {len(raw_messages)} messages; the limit is {limits.max_messages}", param="messages"
        )
    messages = []
    for i, message in enumerate(raw_messages):
        where = f"messages[{i}]"
        message = _expect(message, dict, where)
        _refuse_unknown(message, _MESSAGE_KNOWN, where)
        _refuse_unless_neutral(message, _MESSAGE_NEUTRAL, where)
        role = _expect(message.get("role"), str, f"{where}.role")
        name = message.get("name")
        if name is not None:
            check_field(_expect(name, str, f"{where}.name"), f"{where}.name", limits.max_field_chars)
        messages.append((role, _content_text(message.get("content"), f"{where}.content", limits)))

    def optional(name: str, kind: type | tuple[type, ...]) -> Any:
        value = payload.get(name)
        return None if value is None else _expect(value, kind, name)

    # OpenAI's newer name wins; the other, when also set, is checked all the same (no value goes unbounded).
    max_completion_tokens, legacy_max_tokens = optional("max_completion_tokens", int), optional("max_tokens", int)
    max_tokens = legacy_max_tokens if max_completion_tokens is None else max_completion_tokens
    both = max_completion_tokens is not None and legacy_max_tokens is not None
    if both and not 1 <= legacy_max_tokens <= limits.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens must be in [1, {limits.max_tokens_limit}], got {quote(legacy_max_tokens, 24)}",
            param="max_tokens",
        )
    n = optional("n", int)
    if n not in (None, 1):
        raise InvalidRequest(f"n must be 1, got {quote(n, 24)}: llmesh returns one choice per request", param="n")

    stop = payload.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    else:
        stops = [_expect(s, str, f"stop[{i}]") for i, s in enumerate(_expect(stop, list, "stop"))]

    stream = bool(optional("stream", bool))
    options = optional("stream_options", dict) or {}
    _refuse_unknown(options, {"include_usage", "include_obfuscation"}, "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None:
        _expect(include_usage, bool, "stream_options.include_usage")
    return OpenAIRequest(
        fields=ChatRequestFields(
            model=optional("model", str) or "",
            messages=messages,
            max_tokens=max_tokens,
            temperature=optional("temperature", (int, float)),
            top_p=optional("top_p", (int, float)),
            seed=optional("seed", int),
            stop=stops,
            user=optional("user", str) or "",
        ),
        stream=stream,
        include_usage=bool(include_usage),
    )


# OpenAI's error `type` per domain error; the HTTP status follows from the gRPC status (Envoy's transcoder).
_ERROR_TYPES: tuple[tuple[type[MeshError], str, str | None], ...] = (
    (errors.InvalidRequest, "invalid_request_error", None),
    (errors.Unauthenticated, "authentication_error", "invalid_api_key"),
    (errors.PermissionDenied, "permission_error", None),
    (errors.ResourceExhausted, "rate_limit_error", "rate_limit_exceeded"),
    (errors.Unavailable, "service_unavailable_error", None),
    (errors.DeadlineExceeded, "timeout_error", None),
    (errors.Internal, "server_error", None),
)
# A server-side error's text may name an internal address (a replica, Redis); callers get it without.
# Bounded repeats only, on a message of at most MAX_MESSAGE_CHARS: linear.
_ADDRESS = re.compile(r"(?:ipv[46]|unix|dns):\S{1,200}|\[?[0-9A-Fa-f:.]{2,45}\]?:\d{2,5}\b")


def caller_message(exc: MeshError, request_id: str) -> str:
    """What a caller is told: the message of a caller's mistake as it is (it quotes at most a short prefix of the
    caller's values), a server-side failure's without internal addresses and with the request id for the logs."""
    if isinstance(exc, errors.Internal):
        return f"internal error; the gateway log has the details under request id {request_id}"
    text = str(exc)
    if isinstance(exc, errors.Unavailable | errors.DeadlineExceeded):
        text = _ADDRESS.sub("(internal)", text) + f" (request id {request_id})"
    return text


def error_object(exc: MeshError, request_id: str) -> dict[str, Any]:
    kind, code = next(((t, c) for cls, t, c in _ERROR_TYPES if isinstance(exc, cls)), ("server_error", None))
    return {"message": caller_message(exc, request_id), "type": kind, "param": exc.param, "code": exc.code or code}


def error_json(exc: MeshError, request_id: str) -> str:
    """OpenAI's error body, {"error": {"message", "type", "param", "code"}}, as ASCII-only JSON (so it can travel
    as a gRPC metadata value to Envoy, which makes it the HTTP body)."""
    return json.dumps({"error": error_object(exc, request_id)}, ensure_ascii=True, separators=(",", ":"))


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


def sse_error(exc: MeshError, request_id: str) -> bytes:
    """An error after the stream started: HTTP status is already 200, so it goes in the stream (as OpenAI does)."""
    return b"data: " + json.dumps({"error": error_object(exc, request_id)}).encode() + b"\n\n"
