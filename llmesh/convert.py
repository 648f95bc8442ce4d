"""llmesh.types <-> llmesh.v1 protobufs, in one place so every service translates the same way.

Enums that arrive unset (TIER_UNSPECIFIED, ROUTE_KIND_UNSPECIFIED) or with a number this release does not know are
the sender's mistake: InvalidRequest (INVALID_ARGUMENT), never a default.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmesh.errors import InvalidRequest
from llmesh.types import ChatMessage, PreparedPrompt, RouteInfo, RouteKind, SamplingParams, Tier, Usage
from llmesh.v1 import common_pb2, router_pb2

_TIER_TO_PB = {
    Tier.FREE: common_pb2.TIER_FREE,
    Tier.PAID: common_pb2.TIER_PAID,
    Tier.ENTERPRISE: common_pb2.TIER_ENTERPRISE,
}
_TIER_FROM_PB = {number: tier for tier, number in _TIER_TO_PB.items()}

_KIND_TO_PB = {
    RouteKind.TIER_DEFAULT: common_pb2.ROUTE_KIND_TIER_DEFAULT,
    RouteKind.PINNED: common_pb2.ROUTE_KIND_PINNED,
    RouteKind.COMPLEXITY_UP: common_pb2.ROUTE_KIND_COMPLEXITY_UP,
    RouteKind.COMPLEXITY_DOWN: common_pb2.ROUTE_KIND_COMPLEXITY_DOWN,
    RouteKind.LOAD_SHED: common_pb2.ROUTE_KIND_LOAD_SHED,
    RouteKind.FALLBACK: common_pb2.ROUTE_KIND_FALLBACK,
    RouteKind.CACHE_HIT: common_pb2.ROUTE_KIND_CACHE_HIT,
}
_KIND_FROM_PB = {number: kind for kind, number in _KIND_TO_PB.items()}


def tier_to_pb(tier: Tier) -> common_pb2.Tier:
    return _TIER_TO_PB[tier]


def tier_from_pb(value: int, field: str = "tier") -> Tier:
    tier = _TIER_FROM_PB.get(value)  # type: ignore[call-overload]
    if tier is None:
        known = ", ".join(common_pb2.Tier.Name(n) for n in _TIER_FROM_PB)
        raise InvalidRequest(f"{field} must be one of {known}; got {_enum_name(common_pb2.Tier, value)}")
    return tier


def tiers_to_pb(tiers: Iterable[Tier]) -> list[common_pb2.Tier]:
    return [tier_to_pb(t) for t in tiers]


def tiers_from_pb(values: Iterable[int], field: str = "tiers") -> tuple[Tier, ...]:
    return tuple(tier_from_pb(v, field) for v in values)


def _enum_name(enum: object, value: int) -> str:
    try:
        return str(enum.Name(value))  # type: ignore[attr-defined]
    except ValueError:
        return f"unknown value {value}"


def messages_to_pb(messages: Iterable[ChatMessage]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m.role, content=m.content) for m in messages]


def messages_from_pb(messages: Iterable[common_pb2.ChatMessage]) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content) for m in messages]


def sampling_to_pb(sampling: SamplingParams) -> common_pb2.SamplingParams:
    message = common_pb2.SamplingParams(
        max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, stop=sampling.stop
    )
    if sampling.seed is not None:
        message.seed = sampling.seed
    return message


def sampling_from_pb(message: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
    )


def usage_to_pb(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
    )


def usage_from_pb(message: common_pb2.Usage) -> Usage:
    return Usage(message.prompt_tokens, message.completion_tokens)


def route_to_pb(route: RouteInfo) -> common_pb2.RouteInfo:
    return common_pb2.RouteInfo(variant=route.variant, reason=route.reason, kind=_KIND_TO_PB[route.kind])


def route_from_pb(message: common_pb2.RouteInfo, field: str = "route") -> RouteInfo:
    kind = _KIND_FROM_PB.get(message.kind)
    if kind is None:
        raise InvalidRequest(
            f"{field}.kind must be set to a known route kind; got {_enum_name(common_pb2.RouteKind, message.kind)}"
        )
    return RouteInfo(message.variant, message.reason, kind)


def prepared_to_pb(prepared: PreparedPrompt) -> router_pb2.PreparedPrompt:
    return router_pb2.PreparedPrompt(route=route_to_pb(prepared.route), input_ids=prepared.input_ids)


def prepared_from_pb(message: router_pb2.PreparedPrompt, field: str = "prepared") -> PreparedPrompt:
    if not message.HasField("route"):
        raise InvalidRequest(f"{field}.route is required")
    if not message.input_ids:
        raise InvalidRequest(f"{field}.input_ids is empty: a prepared prompt holds at least one token")
    return PreparedPrompt(route_from_pb(message.route, f"{field}.route"), tuple(message.input_ids))
