"""Plain types that cross service boundaries, free of protobuf and gRPC so core logic can be tested alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Tier(StrEnum):
    FREE = "free"
    PAID = "paid"
    ENTERPRISE = "enterprise"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made; `arguments` is JSON object text as generated."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns that called tools
    tool_call_id: str = ""  # tool turns: the call answered
    name: str = ""  # tool turns: the function's name, when given


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; `parameters_json` is its arguments' JSON Schema ("" = any object)."""

    name: str
    description: str = ""
    parameters_json: str = ""
    strict: bool = False


class ToolChoice(StrEnum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    FUNCTION = "function"  # OutputSpec.tool_choice_function names it


class ResponseFormat(StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """What the answer must look like beyond free text (common.proto's OutputSpec)."""

    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = ToolChoice.AUTO
    tool_choice_function: str = ""
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = ResponseFormat.TEXT
    json_schema: str = ""  # JSON text, for JSON_SCHEMA
    json_schema_name: str = ""
    json_schema_strict: bool = False

    @property
    def is_plain(self) -> bool:
        """Free text: no tools offered and no JSON format."""
        return not self.tools and self.response_format is ResponseFormat.TEXT


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, bias) pairs sorted by id: hashable and order-independent.
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: bytes


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log probability and the most likely alternatives at its position."""

    token: str
    logprob: float
    bytes: bytes
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class RouteKind(StrEnum):
    """The factor that last decided a route's variant (common.proto's RouteKind), for metrics and decisions."""

    TIER_DEFAULT = "tier_default"
    PINNED = "pinned"
    COMPLEXITY_UP = "complexity_up"
    COMPLEXITY_DOWN = "complexity_down"
    LOAD_SHED = "load_shed"
    FALLBACK = "fallback"
    CACHE_HIT = "cache_hit"


@dataclass(frozen=True, slots=True)
class RouteInfo:
    variant: str
    # For people: every step that led here, with its numbers. Programs read `kind`, never this text.
    reason: str
    kind: RouteKind


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A routed, chat-templated and tokenized prompt: what the router's Prepare returns and Generate takes."""

    route: RouteInfo
    # In the tokenizer of route.variant.
    input_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat request after the gateway validated it and applied defaults."""

    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    user: str = ""
    output: OutputSpec = OutputSpec()
    # /v1/completions: a raw prompt continued as it is (no chat template); `messages` is then empty.
    prompt: str = ""


@dataclass(frozen=True, slots=True)
class GenerateEvent:
    """One step of a streamed answer: `route` on the first event, `finish_reason` and `usage` on the last."""

    delta: str = ""
    finish_reason: str = ""
    usage: Usage | None = None
    route: RouteInfo | None = None
    # "exact" or "semantic" on every event of an answer replayed from the response cache.
    cache: str = ""
    # The choice (sampling.n > 1) this event belongs to; each choice ends with its own finish_reason, and `usage`
    # (all choices together) comes on the stream's last event.
    index: int = 0
    # Log probabilities of the tokens behind `delta`, when asked for.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Tool calls completed in this event (finish_reason is then "tool_calls" on the choice's last event).
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the hashed key's short id (safe to log) and its tier."""

    key_id: str
    tier: Tier


@dataclass(frozen=True, slots=True)
class VariantInfo:
    name: str
    description: str
    context_length: int
    tiers: tuple[Tier, ...] = field(default_factory=tuple)
