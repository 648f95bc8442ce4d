"""Turns what a caller sent (gRPC or OpenAI JSON) into a validated ChatRequest, or says exactly what is wrong.

Every value a caller controls is bounded here before anything uses it: counts and lengths of every string and
list, numeric ranges (finite floats, int64 seeds), valid Unicode. Both entry points (the typed gRPC/JSON messages
and the OpenAI JSON body, see openai_compat) end in `validate`. Error messages repeat at most a short, escaped
prefix of the caller's value (llmesh.errors.quote) and name the field as `param`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmesh.errors import InvalidRequest, quote
from llmesh.types import ChatMessage, ChatRequest, SamplingParams

if TYPE_CHECKING:
    from gateway.config import GatewaySettings

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role.
ROLE_ALIASES = {"developer": "system"}
MAX_STOP_SEQUENCES = 4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
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
        )


@dataclass
class ChatRequestFields:
    """A chat request as received, before validation. None = the caller did not set the field (or sent null)."""

    model: str = ""
    messages: Sequence[tuple[str, str]] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    user: str = ""


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


def validate(fields: ChatRequestFields, limits: RequestLimits) -> ChatRequest:
    if not fields.messages:
        raise InvalidRequest("messages must hold at least one message", param="messages")
    if len(fields.messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages holds {len(fields.messages)} messages; the limit is {limits.max_messages}", param="messages"
        )
    messages: list[ChatMessage] = []
    total_chars = 0
    for index, (raw_role, content) in enumerate(fields.messages):
        role = ROLE_ALIASES.get(raw_role, raw_role)
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{index}].role is {quote(raw_role)}; expected one of {', '.join(ROLES)} (or developer)",
                param=f"messages[{index}].role",
            )
        total_chars += len(content)
        messages.append(ChatMessage(role=role, content=content))
    if total_chars > limits.max_prompt_chars:
        raise InvalidRequest(
            f"messages hold {total_chars} characters; the limit is {limits.max_prompt_chars}",
            param="messages",
            code="context_length_exceeded",
        )
    for index, message in enumerate(messages):
        check_text(message.content, f"messages[{index}].content")
    if messages[-1].role == "assistant":
        raise InvalidRequest(
            "the last message must come from the user or the system, not the assistant",
            param=f"messages[{len(messages) - 1}].role",
        )

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

    return ChatRequest(
        model=check_field(fields.model, "model", limits.max_field_chars).strip(),
        messages=tuple(messages),
        sampling=SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=fields.seed, stop=stop
        ),
        user=check_field(fields.user, "user", limits.max_field_chars),
    )
