"""OpenAI chat-completions JSON <-> llmesh types, for POST /v1/chat/completions (plain JSON or SSE), and errors in
OpenAI's shape.

Which request fields are served, accepted and ignored, or refused (docs/openapi.yaml says the same to clients):
- served: model, messages, max_tokens / max_completion_tokens, temperature, top_p, seed, stop, stream,
  stream_options.include_usage, n (1 .. max_n), user, tools (type "function"), tool_choice, parallel_tool_calls,
  response_format (text, json_object, json_schema), logprobs, top_logprobs, presence_penalty, frequency_penalty,
  logit_bias, and vLLM's repetition_penalty and stop_token_ids; in a message role (also "tool"), content, name,
  tool_calls (assistant) and tool_call_id (tool);
- accepted and ignored, after a type check, because they do not change the answer: metadata, store, service_tier,
  prompt_cache_key, safety_identifier, response_format.json_schema.description, and in a message refusal,
  annotations (and `name` on roles other than tool);
- refused unless neutral (null, or the value that means "off") because llmesh cannot honour them: functions and
  function_call (OpenAI's legacy form of tools: null only, the error points to tools), modalities (only
  ["text"]), audio, prediction, web_search_options, reasoning_effort, verbosity; in a message function_call, audio;
- any other field is refused, as OpenAI itself does. `null` always means "the default".
The body is bounded before it is read: size, nesting depth, number of values, integer literals of at most
MAX_INT_DIGITS digits, no NaN/Infinity (not JSON), no duplicate keys, valid Unicode in every string and key. Values
are checked here for their JSON types and in gateway/validation.py for their ranges (the gRPC API's checks).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.pipeline import ChoiceOutput
from gateway.validation import MAX_LOGIT_BIAS, MAX_TOOLS, ChatRequestFields, RequestLimits, check_field, check_text
from llmesh import errors
from llmesh.errors import InvalidRequest, MeshError, quote
from llmesh.types import (
    ChatMessage,
    GenerateEvent,
    OutputSpec,
    ResponseFormat,
    RouteInfo,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)

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


def json_type(value: Any) -> str:
    """How an error message names a decoded JSON value's type."""
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


def is_int(value: Any) -> bool:
    """A JSON integer (Python's bool is an int; JSON's true is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


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
        raise InvalidRequest(f"{name} must be {want}, got {json_type(value)}", param=_param(name))
    return value


def _content_text(content: Any, name: str, limits: RequestLimits, optional: bool = False) -> str:
    """Content is a string, or a list of parts of which llmesh serves the text ones; `optional`: null is ""."""
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
        if optional:
            return ""
        raise InvalidRequest(f"{name} is missing", param=name)
    raise InvalidRequest(f"{name} must be a string or an array of text parts, got {json_type(content)}", param=name)


def _refuse_unknown(obj: dict[str, Any], known: set[str] | frozenset[str], where: str) -> None:
    for key in obj:
        if key not in known:
            param = f"{where}.{key}" if where else key
            raise InvalidRequest(
                f"unrecognized request argument {quote(key)}{' in ' + where if where else ''}",
                param=param[:80],
                code="unknown_parameter",
            )


def _unsupported(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def _never(value: Any) -> bool:
    return False


# OpenAI fields llmesh cannot honour: accepted only when null or neutral (described for the error), else refused.
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_never, ""),
    "function_call": (_never, ""),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "audio": (_never, ""),
    "prediction": (_never, ""),
    "web_search_options": (_never, ""),
    "reasoning_effort": (_never, ""),
    "verbosity": (_never, ""),
}
# OpenAI's legacy fields and what replaced them (named in the refusal).
_LEGACY = {"functions": "tools", "function_call": "tool_choice"}
# OpenAI fields that do not change the answer: type-checked, then ignored.
_IGNORED: dict[str, type] = {
    "store": bool,
    "service_tier": str,
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
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "stop_token_ids",
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
_MESSAGE_SERVED = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
_MESSAGE_IGNORED = frozenset({"refusal", "annotations"})
_MESSAGE_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "function_call": (_never, ""),
    "audio": (_never, ""),
}
_MESSAGE_KNOWN = _MESSAGE_SERVED | _MESSAGE_IGNORED | set(_MESSAGE_NEUTRAL)
MESSAGE_FIELDS = {
    "served": _MESSAGE_SERVED,
    "ignored": _MESSAGE_IGNORED,
    "refused_unless_neutral": frozenset(_MESSAGE_NEUTRAL),
}
# A token id as logit_bias names it: a decimal integer in a string (validate() bounds its value).
_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")


def _refuse_unless_neutral(
    obj: dict[str, Any], neutral: dict[str, tuple[Callable[[Any], bool], str]], where: str
) -> None:
    for key, (is_neutral, described) in neutral.items():
        value = obj.get(key)
        if value is not None and not is_neutral(value):
            param = f"{where}.{key}" if where else key
            accepted = f"null or {described}" if described else "null"
            replaced_by = _LEGACY.get(key) if not where else None
            hint = f" (OpenAI's legacy form: use {replaced_by})" if replaced_by else ""
            raise _unsupported(param, f"{param} is not supported by llmesh; it accepts only {accepted} here{hint}")


def _metadata(value: Any, limits: RequestLimits) -> None:
    if value is None:
        return
    meta = _expect(value, dict, "metadata")
    if len(meta) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"metadata holds {len(meta)} keys; the limit is {MAX_METADATA_KEYS}", param="metadata")
    for key, item in meta.items():
        check_field(key, "a metadata key", MAX_METADATA_KEY_CHARS)
        check_field(_expect(item, str, f"metadata[{quote(key, 20)}]"), "a metadata value", MAX_METADATA_VALUE_CHARS)


def _optional(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    value = obj.get(key)
    return None if value is None else _expect(value, kind, f"{where}.{key}" if where else key)


def _schema_text(schema: dict[str, Any], param: str) -> str:
    """Compact, in the caller's key order: the text the router compiles and the cache key hashes."""

    def refuse(value: Any) -> Any:
        digits = value.digits if isinstance(value, _HugeNumber) else 0
        raise InvalidRequest(f"{param} holds a {digits}-digit number; out of range", param=param)

    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), default=refuse)


def _function_type(obj: dict[str, Any], where: str, required: bool = True) -> None:
    kind = obj.get("type")
    if kind is None and not required:
        return
    if kind != "function":
        shown = quote(kind) if isinstance(kind, str) else json_type(kind)
        raise _unsupported(f"{where}.type", f"{where}.type is {shown}; llmesh serves only 'function' tools")


def _tools(value: Any) -> tuple[ToolSpec, ...]:
    tools = _expect(value, list, "tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools holds {len(tools)} tools; the limit is {MAX_TOOLS}", param="tools")
    specs = []
    for i, raw in enumerate(tools):
        where = f"tools[{i}]"
        tool = _expect(raw, dict, where)
        _function_type(tool, where)
        _refuse_unknown(tool, {"type", "function"}, where)
        function = _expect(tool.get("function"), dict, f"{where}.function")
        where = f"{where}.function"
        _refuse_unknown(function, {"name", "description", "parameters", "strict"}, where)
        name = function.get("name")
        if name is None:
            raise InvalidRequest(f"{where}.name is missing", param=f"{where}.name")
        parameters = _optional(function, "parameters", dict, where)
        specs.append(
            ToolSpec(
                name=_expect(name, str, f"{where}.name"),
                description=_optional(function, "description", str, where) or "",
                parameters_json="" if parameters is None else _schema_text(parameters, f"{where}.parameters"),
                strict=bool(_optional(function, "strict", bool, where)),
            )
        )
    return tuple(specs)


def _tool_choice(value: Any) -> tuple[ToolChoice, str]:
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise InvalidRequest(
                f"tool_choice is {quote(value)}; expected 'auto', 'none', 'required' or a function", param="tool_choice"
            )
        return ToolChoice(value), ""
    choice = _expect(value, dict, "tool_choice")
    _function_type(choice, "tool_choice")
    _refuse_unknown(choice, {"type", "function"}, "tool_choice")
    function = _expect(choice.get("function"), dict, "tool_choice.function")
    _refuse_unknown(function, {"name"}, "tool_choice.function")
    return ToolChoice.FUNCTION, _expect(function.get("name"), str, "tool_choice.function.name")


def _response_format(value: Any, limits: RequestLimits) -> dict[str, Any]:
    """The OutputSpec fields of a response_format."""
    form = _expect(value, dict, "response_format")
    kind = _expect(form.get("type"), str, "response_format.type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _unsupported(
            "response_format.type",
            f"response_format.type is {quote(kind)}; llmesh serves 'text', 'json_object' and 'json_schema'",
        )
    if kind != "json_schema":
        _refuse_unknown(form, {"type"}, "response_format")
        return {"response_format": ResponseFormat(kind)}
    _refuse_unknown(form, {"type", "json_schema"}, "response_format")
    where = "response_format.json_schema"
    spec = _expect(form.get("json_schema"), dict, where)
    _refuse_unknown(spec, {"name", "schema", "strict", "description"}, where)
    # A hint for the model that OutputSpec does not carry: checked, then ignored (the schema itself is enforced).
    description = _optional(spec, "description", str, where)
    if description is not None:
        check_field(description, f"{where}.description", limits.max_schema_chars)
    name = spec.get("name")
    if name is None:
        raise InvalidRequest(f"{where}.name is missing", param=f"{where}.name")
    schema = _optional(spec, "schema", dict, where)
    return {
        "response_format": ResponseFormat.JSON_SCHEMA,
        "json_schema": "" if schema is None else _schema_text(schema, f"{where}.schema"),
        "json_schema_name": _expect(name, str, f"{where}.name"),
        "json_schema_strict": bool(_optional(spec, "strict", bool, where)),
    }


def _output(payload: dict[str, Any], limits: RequestLimits) -> OutputSpec:
    fields: dict[str, Any] = {}
    if payload.get("tools") is not None:
        fields["tools"] = _tools(payload["tools"])
    if payload.get("tool_choice") is not None:
        fields["tool_choice"], fields["tool_choice_function"] = _tool_choice(payload["tool_choice"])
    parallel = _optional(payload, "parallel_tool_calls", bool)
    if parallel is not None:
        fields["parallel_tool_calls"] = parallel
    if payload.get("response_format") is not None:
        fields.update(_response_format(payload["response_format"], limits))
    return OutputSpec(**fields)


def _logit_bias(value: Any) -> dict[int, float]:
    biases = _expect(value, dict, "logit_bias")
    if len(biases) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"logit_bias holds {len(biases)} entries; the limit is {MAX_LOGIT_BIAS}", param="logit_bias"
        )
    parsed: dict[int, float] = {}
    for key, bias in biases.items():
        if not _TOKEN_ID.fullmatch(key):
            raise InvalidRequest(
                f"logit_bias key {quote(key)} is not a token id (an integer, written as a string)", param="logit_bias"
            )
        parsed[int(key)] = _expect(bias, (int, float), f"logit_bias[{quote(key, 12)}]")
    return parsed


def _tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    calls = _expect(value, list, where)
    if len(calls) > MAX_TOOLS:
        raise InvalidRequest(f"{where} holds {len(calls)} calls; the limit is {MAX_TOOLS}", param=where)
    parsed = []
    for i, raw in enumerate(calls):
        at = f"{where}[{i}]"
        call = _expect(raw, dict, at)
        _function_type(call, at, required=False)
        _refuse_unknown(call, {"id", "type", "function"}, at)
        function = _expect(call.get("function"), dict, f"{at}.function")
        _refuse_unknown(function, {"name", "arguments"}, f"{at}.function")
        parsed.append(
            ToolCall(
                id=_expect(call.get("id"), str, f"{at}.id"),
                name=_expect(function.get("name"), str, f"{at}.function.name"),
                # OpenAI sends the arguments as JSON text, exactly as the model wrote them.
                arguments=_expect(function.get("arguments"), str, f"{at}.function.arguments"),
            )
        )
    return tuple(parsed)


def _message(raw: Any, where: str, limits: RequestLimits) -> ChatMessage:
    message = _expect(raw, dict, where)
    _refuse_unknown(message, _MESSAGE_KNOWN, where)
    _refuse_unless_neutral(message, _MESSAGE_NEUTRAL, where)
    role = _expect(message.get("role"), str, f"{where}.role")
    name = _optional(message, "name", str, where) or ""
    check_field(name, f"{where}.name", limits.max_field_chars)
    raw_calls = message.get("tool_calls")
    tool_calls = () if raw_calls is None else _tool_calls(raw_calls, f"{where}.tool_calls")
    # An assistant turn that only called tools has no content (null), as OpenAI writes it.
    content = _content_text(message.get("content"), f"{where}.content", limits, optional=bool(tool_calls))
    tool_call_id = _optional(message, "tool_call_id", str, where) or ""
    return ChatMessage(role, content, tool_calls, tool_call_id, name)


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [_expect(s, str, f"stop[{i}]") for i, s in enumerate(_expect(value, list, "stop"))]


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
    messages = [_message(message, f"messages[{i}]", limits) for i, message in enumerate(raw_messages)]

    def optional(name: str, kind: type | tuple[type, ...]) -> Any:
        return _optional(payload, name, kind)

    # OpenAI's newer name wins; the other, when also set, is checked all the same (no value goes unbounded).
    max_completion_tokens, legacy_max_tokens = optional("max_completion_tokens", int), optional("max_tokens", int)
    max_tokens = legacy_max_tokens if max_completion_tokens is None else max_completion_tokens
    both = max_completion_tokens is not None and legacy_max_tokens is not None
    if both and not 1 <= legacy_max_tokens <= limits.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens must be in [1, {limits.max_tokens_limit}], got {quote(legacy_max_tokens, 24)}",
            param="max_tokens",
        )
    stop_token_ids = optional("stop_token_ids", list) or []
    stream = bool(optional("stream", bool))
    options = optional("stream_options", dict) or {}
    _refuse_unknown(options, {"include_usage", "include_obfuscation"}, "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None:
        _expect(include_usage, bool, "stream_options.include_usage")
    logit_bias = payload.get("logit_bias")
    return OpenAIRequest(
        fields=ChatRequestFields(
            model=optional("model", str) or "",
            messages=messages,
            max_tokens=max_tokens,
            temperature=optional("temperature", (int, float)),
            top_p=optional("top_p", (int, float)),
            seed=optional("seed", int),
            stop=_stops(payload.get("stop")),
            user=optional("user", str) or "",
            presence_penalty=optional("presence_penalty", (int, float)),
            frequency_penalty=optional("frequency_penalty", (int, float)),
            repetition_penalty=optional("repetition_penalty", (int, float)),
            logit_bias={} if logit_bias is None else _logit_bias(logit_bias),
            logprobs=optional("logprobs", bool),
            top_logprobs=optional("top_logprobs", int),
            n=optional("n", int),
            stop_token_ids=[_expect(t, int, f"stop_token_ids[{i}]") for i, t in enumerate(stop_token_ids)],
            output=_output(payload, limits),
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


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def route_json(route: RouteInfo) -> dict[str, str]:
    # `kind` names the deciding factor (tier_default, pinned, complexity_up, load_shed, fallback, cache_hit, ...);
    # `reason` tells the whole story for people.
    return {"variant": route.variant, "reason": route.reason, "kind": route.kind.value}


# OpenAI's stand-in for a log probability too small to write (JSON has no -Infinity).
MIN_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def _logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's choice logprobs: per token its text, log probability, UTF-8 bytes and top alternatives."""
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": _logprob(lp.logprob),
                "bytes": list(lp.bytes),
                "top_logprobs": [
                    {"token": t.token, "logprob": _logprob(t.logprob), "bytes": list(t.bytes)} for t in lp.top_logprobs
                ],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def _call_id(call: ToolCall, choice: int, position: int, request_id: str) -> str:
    # The router names every call; an unnamed one still gets an id unique in the answer (clients key results on it).
    return call.id or f"call_{request_id[-24:]}_{choice}_{position}"


def _tool_call(call: ToolCall, choice: int, position: int, request_id: str) -> dict[str, Any]:
    return {
        "id": _call_id(call, choice, position, request_id),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _choice(choice: ChoiceOutput, request_id: str, logprobs: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.tool_calls:
        # OpenAI writes null content for a turn that only called tools.
        message["content"] = choice.text or None
        message["tool_calls"] = [
            _tool_call(call, choice.index, k, request_id) for k, call in enumerate(choice.tool_calls)
        ]
    return {
        "index": choice.index,
        "message": message,
        "finish_reason": choice.finish_reason,
        "logprobs": _logprobs(choice.logprobs) if logprobs else None,
    }


def completion_json(
    request_id: str,
    created: int,
    route: RouteInfo,
    text: str,
    finish_reason: str,
    usage: Usage,
    cache: str = "",
    choices: Sequence[ChoiceOutput] = (),
    logprobs: bool = False,
) -> bytes:
    """chat.completion: `choices` in index order (n of them), or one choice of `text` and `finish_reason`;
    `logprobs`: the caller asked for them (each choice then has its logprobs object, else null)."""
    answered = choices or (ChoiceOutput(0, text, finish_reason),)
    return json.dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": route.variant,
            "choices": [_choice(choice, request_id, logprobs) for choice in answered],
            "usage": usage_json(usage),
            "llmesh_route": route_json(route),
            # "" when generated for this request, "exact" or "semantic" when served from the response cache.
            "llmesh_cache": cache,
        },
        ensure_ascii=False,
    ).encode()


def sse_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    route: RouteInfo | None = None,
    cache: str = "",
    index: int = 0,
    logprobs: Sequence[TokenLogprob] | None = None,
) -> bytes:
    """One chat.completion.chunk event: `delta` of choice `index` (None: no choice, e.g. the usage chunk)."""
    choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = _logprobs(logprobs)
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [choice],
    }
    if usage is not None:
        chunk["usage"] = usage_json(usage)
    if route is not None:
        chunk["llmesh_route"] = route_json(route)
    if cache:
        chunk["llmesh_cache"] = cache
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


class ChatChunks:
    """An answer's GenerateEvents as OpenAI's SSE chunks. Per choice: a first chunk with the role (choice 0's also
    names the route), its text deltas (with their logprobs when asked for), each tool call as one tool_call delta
    (index = the call's position in the choice), and a chunk with its finish_reason; with include_usage, a last
    chunk without choices carries the usage of all choices."""

    def __init__(self, request_id: str, created: int, n: int, include_usage: bool, logprobs: bool) -> None:
        self._request_id, self._created = request_id, created
        self._n, self._include_usage, self._logprobs = n, include_usage, logprobs
        self._started = False
        self._model = ""
        self._cache = ""
        # Tool calls sent so far, per choice.
        self._calls: dict[int, int] = {}

    def _chunk(self, delta: dict[str, Any] | None, **extra: Any) -> bytes:
        return sse_chunk(self._request_id, self._created, self._model, delta, cache=self._cache, **extra)

    def feed(self, event: GenerateEvent) -> list[bytes]:
        out: list[bytes] = []
        if not self._started:
            self._started = True
            self._model = event.route.variant if event.route else ""
            self._cache = event.cache
            out += [
                self._chunk({"role": "assistant", "content": ""}, index=i, route=event.route if i == 0 else None)
                for i in range(self._n)
            ]
        index = event.index
        if event.delta or event.logprobs:
            logprobs = event.logprobs if self._logprobs else None
            out.append(self._chunk({"content": event.delta}, index=index, logprobs=logprobs))
        if event.tool_calls:
            sent = self._calls.get(index, 0)
            calls = [
                {"index": sent + k, **_tool_call(call, index, sent + k, self._request_id)}
                for k, call in enumerate(event.tool_calls)
            ]
            self._calls[index] = sent + len(calls)
            out.append(self._chunk({"tool_calls": calls}, index=index))
        if event.finish_reason:
            out.append(self._chunk({}, index=index, finish_reason=event.finish_reason))
        if self._include_usage and event.usage is not None:
            out.append(self._chunk(None, usage=event.usage))
        return out


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(exc: MeshError, request_id: str) -> bytes:
    """An error after the stream started: HTTP status is already 200, so it goes in the stream (as OpenAI does)."""
    return b"data: " + json.dumps({"error": error_object(exc, request_id)}).encode() + b"\n\n"
