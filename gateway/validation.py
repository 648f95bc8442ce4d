"""Turns what a caller sent (gRPC or OpenAI JSON) into a validated ChatRequest, or says exactly what is wrong.

Every value a caller controls is bounded here before anything uses it: counts and lengths of every string and
list, numeric ranges (finite floats, int64 seeds), valid Unicode. Both entry points (the typed gRPC/JSON messages
and the OpenAI JSON body, see openai_compat) end in `validate`. Error messages repeat at most a short, escaped
prefix of the caller's value (llmesh.errors.quote) and name the field as `param`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmesh.errors import InvalidRequest, quote
from llmesh.types import (
    ChatMessage,
    ChatRequest,
    OutputSpec,
    ResponseFormat,
    SamplingParams,
    ToolCall,
    ToolChoice,
    ToolSpec,
)

if TYPE_CHECKING:
    from gateway.config import GatewaySettings

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system role.
ROLE_ALIASES = {"developer": "system"}
MAX_STOP_SEQUENCES = 4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
# OpenAI's own bounds: tools per request, logit_bias entries and their range, top_logprobs, penalties.
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300
MAX_LOGIT_BIAS_VALUE = 100.0
MAX_TOP_LOGPROBS = 20
MAX_PENALTY = 2.0
# vLLM's multiplicative repetition penalty is in (0, MAX_REPETITION_PENALTY].
MAX_REPETITION_PENALTY = 2.0
# Token ids that end generation (vLLM's stop_token_ids); a handful is what any use needs.
MAX_STOP_TOKEN_IDS = 64
# Tool calls of one assistant turn in the conversation.
MAX_TOOL_CALLS = MAX_TOOLS
# Function and JSON schema names, as OpenAI allows them.
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# x-request-id: what Envoy makes (a UUID) and what tracing systems send; it becomes part of ids, logs and keys.
REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+/=")


@dataclass(frozen=True)
class RequestLimits:
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_messages: int = 256
    # All message contents together, in characters.
    max_prompt_chars: int = 200_000
    # Each short string: model, user, a message's name, a stop string, a metadata value.
    max_field_chars: int = 256
    # The OpenAI JSON body: its size, how deeply it nests, how many values (objects, arrays, scalars) it holds.
    max_body_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 32
    max_json_values: int = 20_000
    # Text parts of one message's content list.
    max_content_parts: int = 64
    max_request_id_chars: int = 128
    # Choices per request (n): each one is generated (and reserved against the token budget) in full.
    max_n: int = 4
    # A tool's parameters schema, a response_format JSON schema, a tool's description: each at most this many
    # characters of JSON text.
    max_schema_chars: int = 64 * 1024

    @classmethod
    def of(cls, settings: GatewaySettings) -> RequestLimits:
        return cls(
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
            max_messages=settings.max_messages,
            max_prompt_chars=settings.max_prompt_chars,
            max_field_chars=settings.max_field_chars,
            max_body_bytes=settings.max_body_bytes,
            max_json_depth=settings.max_json_depth,
            max_n=settings.max_n,
            max_schema_chars=settings.max_schema_chars,
        )


@dataclass
class ChatRequestFields:
    """A chat request as received, before validation. None = the caller did not set the field (or sent null).

    A message is (role, content), or a ChatMessage when it carries tool calls or answers one. `output` holds the
    tools, tool choice and response format as received (schemas as JSON text), checked by `validate` like the rest.
    """

    model: str = ""
    messages: Sequence[tuple[str, str] | ChatMessage] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    user: str = ""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    # Token id -> bias.
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    n: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    output: OutputSpec = field(default_factory=OutputSpec)
    # A raw prompt (no chat template) instead of messages.
    prompt: str = ""


def check_text(value: str, param: str) -> str:
    """Refuse strings that are not valid Unicode: lone UTF-16 surrogates (JSON's "\\ud800") cannot be encoded as
    UTF-8, so no later step (protobuf, the tokenizer, Redis) could carry them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise InvalidRequest(
            f"{param} is not valid Unicode: it holds a lone UTF-16 surrogate ({bad!a}) at character {exc.start}",
            param=param,
        ) from None
    return value


def check_field(value: str, param: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidRequest(f"{param} is {len(value)} characters long; the limit is {limit}", param=param)
    return check_text(value, param)


def check_request_id(value: str, limits: RequestLimits) -> str:
    if not 0 < len(value) <= limits.max_request_id_chars or not REQUEST_ID_CHARS.issuperset(value):
        raise InvalidRequest(
            f"x-request-id {quote(value)} is not 1 to {limits.max_request_id_chars} characters of letters, digits "
            "and - _ . : + / =",
            param="x-request-id",
        )
    return value


def _finite_in(value: float, param: str, low: float, high: float, low_open: bool = False) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    in_range = math.isfinite(number) and (low < number if low_open else low <= number) and number <= high
    if not in_range:
        bracket = "(" if low_open else "["
        raise InvalidRequest(
            f"{param} must be a finite number in {bracket}{low:g}, {high:g}], got {quote(value, 24)}", param=param
        )
    return number


def _int_in(value: int, param: str, low: int, high: int, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{param} must be {what} in [{low}, {high}], got {quote(value, 24)}", param=param)
    return value


def _name(value: str, param: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidRequest(
            f"{param} is {quote(value)}; a name is 1 to 64 letters, digits, underscores and dashes", param=param
        )
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_json_object_text(text: str, param: str, limits: RequestLimits) -> str:
    """A JSON schema as JSON text: bounded in size and depth, valid JSON, and an object (what OpenAI requires)."""
    if len(text) > limits.max_schema_chars:
        raise InvalidRequest(
            f"{param} is {len(text)} characters of JSON; the limit is {limits.max_schema_chars}", param=param
        )
    check_text(text, param)
    try:
        # Bounded by the size check above; NaN and Infinity are not JSON.
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidRequest(f"{param} nests deeper than {limits.max_json_depth} levels", param=param) from None
    except ValueError as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise InvalidRequest(f"{param} is not valid JSON: {message[:80]}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON object (a JSON schema)", param=param)
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limits.max_json_depth:
            raise InvalidRequest(f"{param} nests deeper than {limits.max_json_depth} levels", param=param)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return text


def _tool(tool: ToolSpec, index: int, limits: RequestLimits) -> ToolSpec:
    where = f"tools[{index}].function"
    _name(tool.name, f"{where}.name")
    check_field(tool.description, f"{where}.description", limits.max_schema_chars)
    if tool.parameters_json:
        check_json_object_text(tool.parameters_json, f"{where}.parameters", limits)
    return tool


def validate_output(output: OutputSpec, limits: RequestLimits) -> OutputSpec:
    """Tools, tool choice and response format. Params are named as in OpenAI's request (both entry points)."""
    if len(output.tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools holds {len(output.tools)} tools; the limit is {MAX_TOOLS}", param="tools")
    names: set[str] = set()
    for index, tool in enumerate(output.tools):
        _tool(tool, index, limits)
        if tool.name in names:
            raise InvalidRequest(
                f"tools[{index}].function.name {quote(tool.name)} names a tool offered before; names are unique",
                param=f"tools[{index}].function.name",
            )
        names.add(tool.name)
    choice = output.tool_choice
    if choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION) and not output.tools:
        raise InvalidRequest(f"tool_choice {choice.value!r} needs tools, and none are offered", param="tool_choice")
    if choice is ToolChoice.FUNCTION and output.tool_choice_function not in names:
        raise InvalidRequest(
            f"tool_choice names the function {quote(output.tool_choice_function)}, which is not among the tools",
            param="tool_choice",
        )
    if choice is not ToolChoice.FUNCTION and output.tool_choice_function:
        raise InvalidRequest(
            f"tool_choice is {choice.value!r}: a function name belongs only with tool_choice 'function'",
            param="tool_choice",
        )
    if output.response_format is ResponseFormat.JSON_SCHEMA:
        where = "response_format.json_schema"
        if not output.json_schema:
            raise InvalidRequest(f"{where}.schema is missing: a json_schema format needs one", param=f"{where}.schema")
        check_json_object_text(output.json_schema, f"{where}.schema", limits)
        _name(output.json_schema_name, f"{where}.name")
    elif output.json_schema or output.json_schema_name or output.json_schema_strict:
        raise InvalidRequest(
            f"response_format is {output.response_format.value!r}: a JSON schema belongs only with 'json_schema'",
            param="response_format",
        )
    return output


def _tool_calls(calls: Sequence[ToolCall], where: str, limits: RequestLimits) -> int:
    """Checks an assistant turn's tool calls; returns their arguments' characters (part of the prompt)."""
    if len(calls) > MAX_TOOL_CALLS:
        raise InvalidRequest(
            f"{where}.tool_calls holds {len(calls)} calls; the limit is {MAX_TOOL_CALLS}", param=f"{where}.tool_calls"
        )
    chars = 0
    for i, call in enumerate(calls):
        param = f"{where}.tool_calls[{i}]"
        if not call.id:
            raise InvalidRequest(f"{param}.id is missing", param=f"{param}.id")
        check_field(call.id, f"{param}.id", limits.max_field_chars)
        _name(call.name, f"{param}.function.name")
        check_text(call.arguments, f"{param}.function.arguments")
        chars += len(call.arguments)
    return chars


def _message(raw: tuple[str, str] | ChatMessage, index: int, limits: RequestLimits) -> ChatMessage:
    message = raw if isinstance(raw, ChatMessage) else ChatMessage(raw[0], raw[1])
    where = f"messages[{index}]"
    role = ROLE_ALIASES.get(message.role, message.role)
    if role not in ROLES:
        raise InvalidRequest(
            f"{where}.role is {quote(message.role)}; expected one of {', '.join(ROLES)} (or developer)",
            param=f"{where}.role",
        )
    if message.tool_calls and role != "assistant":
        raise InvalidRequest(f"{where}.tool_calls: only assistant messages call tools", param=f"{where}.tool_calls")
    if role == "tool":
        if not message.tool_call_id:
            raise InvalidRequest(
                f"{where}.tool_call_id is missing: a tool message answers one tool call", param=f"{where}.tool_call_id"
            )
        check_field(message.tool_call_id, f"{where}.tool_call_id", limits.max_field_chars)
        check_field(message.name, f"{where}.name", limits.max_field_chars)
        name = message.name
    else:
        if message.tool_call_id:
            raise InvalidRequest(f"{where}.tool_call_id belongs only to tool messages", param=f"{where}.tool_call_id")
        # A participant's name (OpenAI's `name` on other roles) does not reach the model.
        name = ""
    return ChatMessage(role, message.content, tuple(message.tool_calls), message.tool_call_id, name)


def _messages(fields: ChatRequestFields, limits: RequestLimits) -> tuple[ChatMessage, ...]:
    if fields.prompt:
        if fields.messages:
            raise InvalidRequest("a request holds messages or a prompt, not both", param="prompt")
        if fields.output.tools:
            raise InvalidRequest("tools need messages: a raw prompt has no chat template to offer them", param="tools")
        if len(fields.prompt) > limits.max_prompt_chars:
            raise InvalidRequest(
                f"prompt holds {len(fields.prompt)} characters; the limit is {limits.max_prompt_chars}",
                param="prompt",
                code="context_length_exceeded",
            )
        check_text(fields.prompt, "prompt")
        return ()
    if not fields.messages:
        raise InvalidRequest("messages must hold at least one message", param="messages")
    if len(fields.messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages holds {len(fields.messages)} messages; the limit is {limits.max_messages}", param="messages"
        )
    messages = [_message(raw, index, limits) for index, raw in enumerate(fields.messages)]
    total_chars = sum(len(m.content) for m in messages)
    if total_chars > limits.max_prompt_chars:
        raise InvalidRequest(
            f"messages hold {total_chars} characters; the limit is {limits.max_prompt_chars}",
            param="messages",
            code="context_length_exceeded",
        )
    for index, message in enumerate(messages):
        check_text(message.content, f"messages[{index}].content")
        total_chars += _tool_calls(message.tool_calls, f"messages[{index}]", limits)
    if total_chars > limits.max_prompt_chars:
        raise InvalidRequest(
            f"messages and their tool calls hold {total_chars} characters; the limit is {limits.max_prompt_chars}",
            param="messages",
            code="context_length_exceeded",
        )
    if messages[-1].role == "assistant":
        raise InvalidRequest(
            "the last message must come from the user, the system or a tool, not the assistant",
            param=f"messages[{len(messages) - 1}].role",
        )
    return tuple(messages)


def _sampling(fields: ChatRequestFields, limits: RequestLimits) -> SamplingParams:
    max_tokens = limits.default_max_tokens if fields.max_tokens is None else fields.max_tokens
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {quote(max_tokens, 24)}", param="max_tokens")
    if max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens is {quote(max_tokens, 24)}; this deployment allows at most {limits.max_tokens_limit}",
            param="max_tokens",
        )

    temperature = 1.0 if fields.temperature is None else _finite_in(fields.temperature, "temperature", 0.0, 2.0)
    top_p = 1.0 if fields.top_p is None else _finite_in(fields.top_p, "top_p", 0.0, 1.0, low_open=True)
    if fields.seed is not None and not INT64_MIN <= fields.seed <= INT64_MAX:
        raise InvalidRequest(f"seed must be a 64-bit signed integer, got {quote(fields.seed, 24)}", param="seed")

    stop = tuple(fields.stop)
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop holds {len(stop)} strings; at most {MAX_STOP_SEQUENCES} are allowed", param="stop")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequest("stop strings must not be empty", param=f"stop[{i}]")
        check_field(s, f"stop[{i}]", limits.max_field_chars)

    def penalty(value: float | None, param: str) -> float:
        return 0.0 if value is None else _finite_in(value, param, -MAX_PENALTY, MAX_PENALTY)

    repetition_penalty = (
        1.0
        if fields.repetition_penalty is None
        else _finite_in(fields.repetition_penalty, "repetition_penalty", 0.0, MAX_REPETITION_PENALTY, low_open=True)
    )
    if len(fields.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"logit_bias holds {len(fields.logit_bias)} entries; the limit is {MAX_LOGIT_BIAS}", param="logit_bias"
        )
    logit_bias = tuple(
        sorted(
            (
                _int_in(token, "logit_bias", 0, INT32_MAX, "a token id"),
                _finite_in(bias, "logit_bias", -MAX_LOGIT_BIAS_VALUE, MAX_LOGIT_BIAS_VALUE),
            )
            for token, bias in fields.logit_bias.items()
        )
    )
    logprobs = bool(fields.logprobs)
    top_logprobs = (
        0 if fields.top_logprobs is None else _int_in(fields.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    )
    if top_logprobs and not logprobs:
        raise InvalidRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
    n = 1 if fields.n is None else _int_in(fields.n, "n", 1, limits.max_n)
    stop_token_ids = tuple(fields.stop_token_ids)
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(
            f"stop_token_ids holds {len(stop_token_ids)} ids; the limit is {MAX_STOP_TOKEN_IDS}",
            param="stop_token_ids",
        )
    for i, token in enumerate(stop_token_ids):
        _int_in(token, f"stop_token_ids[{i}]", 0, INT32_MAX, "a token id")

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=fields.seed,
        stop=stop,
        presence_penalty=penalty(fields.presence_penalty, "presence_penalty"),
        frequency_penalty=penalty(fields.frequency_penalty, "frequency_penalty"),
        repetition_penalty=repetition_penalty,
        logit_bias=logit_bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=n,
        stop_token_ids=stop_token_ids,
    )


def validate(fields: ChatRequestFields, limits: RequestLimits) -> ChatRequest:
    """Both entry points' one check: a ChatRequest whose every value is bounded, or InvalidRequest naming the field."""
    messages = _messages(fields, limits)
    sampling = _sampling(fields, limits)
    output = validate_output(fields.output, limits)
    return ChatRequest(
        model=check_field(fields.model, "model", limits.max_field_chars).strip(),
        messages=messages,
        sampling=sampling,
        user=check_field(fields.user, "user", limits.max_field_chars),
        output=output,
        prompt=fields.prompt,
    )
