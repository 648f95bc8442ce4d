"""Turns what a caller sent (gRPC or OpenAI JSON) into a validated ChatRequest, or says exactly what is wrong."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmesh.errors import InvalidRequest
from llmesh.types import ChatMessage, ChatRequest, SamplingParams

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role.
ROLE_ALIASES = {"developer": "system"}
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class RequestLimits:
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_messages: int = 256
    max_prompt_chars: int = 200_000


@dataclass
class ChatRequestFields:
    """A chat request as received, before validation. None = the caller did not set the field."""

    model: str = ""
    messages: Sequence[tuple[str, str]] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    user: str = ""


def validate(fields: ChatRequestFields, limits: RequestLimits) -> ChatRequest:
    if not fields.messages:
        raise InvalidRequest("messages must hold at least one message")
    if len(fields.messages) > limits.max_messages:
        raise InvalidRequest(f"messages holds {len(fields.messages)} messages; the limit is {limits.max_messages}")
    messages: list[ChatMessage] = []
    total_chars = 0
    for index, (role, content) in enumerate(fields.messages):
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise InvalidRequest(f"messages[{index}].role is {role!r}; expected one of {', '.join(ROLES)}")
        total_chars += len(content)
        messages.append(ChatMessage(role=role, content=content))
    if total_chars > limits.max_prompt_chars:
        raise InvalidRequest(f"messages hold {total_chars} characters; the limit is {limits.max_prompt_chars}")
    if messages[-1].role == "assistant":
        raise InvalidRequest("the last message must come from the user or the system, not the assistant")

    max_tokens = limits.default_max_tokens if fields.max_tokens is None else fields.max_tokens
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}")
    if max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(f"max_tokens is {max_tokens}; this deployment allows at most {limits.max_tokens_limit}")

    temperature = 1.0 if fields.temperature is None else fields.temperature
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
        raise InvalidRequest(f"temperature must be between 0 and 2, got {temperature}")
    top_p = 1.0 if fields.top_p is None else fields.top_p
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")

    stop = tuple(fields.stop)
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop holds {len(stop)} strings; at most {MAX_STOP_SEQUENCES} are allowed")
    if any(not s for s in stop):
        raise InvalidRequest("stop strings must not be empty")

    return ChatRequest(
        model=fields.model.strip(),
        messages=tuple(messages),
        sampling=SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=fields.seed, stop=stop
        ),
        user=fields.user,
    )
