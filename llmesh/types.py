"""Plain types that cross service boundaries, free of protobuf and gRPC so core logic can be tested alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Tier(StrEnum):
    FREE = "free"
    PAID = "paid"
    ENTERPRISE = "enterprise"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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


@dataclass(frozen=True, slots=True)
class GenerateEvent:
    """One step of a streamed answer: `route` on the first event, `finish_reason` and `usage` on the last."""

    delta: str = ""
    finish_reason: str = ""
    usage: Usage | None = None
    route: RouteInfo | None = None
    # "exact" or "semantic" on every event of an answer replayed from the response cache.
    cache: str = ""


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
