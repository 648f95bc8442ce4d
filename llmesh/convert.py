"""llmesh.types <-> llmesh.v1 protobufs, in one place so every service translates the same way.

Enums that arrive unset (TIER_UNSPECIFIED, ROUTE_KIND_UNSPECIFIED) or with a number this release does not know are
the sender's mistake: InvalidRequest (INVALID_ARGUMENT), never a default.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmesh.errors import InvalidRequest
from llmesh.types import (
    ChatMessage,
    OutputSpec,
    PreparedPrompt,
    ResponseFormat,
    RouteInfo,
    RouteKind,
    SamplingParams,
    Tier,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    ToolSpec,
    TopLogprob,
    Usage,
)
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


def tool_calls_to_pb(calls: Iterable[ToolCall]) -> list[common_pb2.ToolCall]:
    return [common_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def tool_calls_from_pb(calls: Iterable[common_pb2.ToolCall]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c.id, c.name, c.arguments) for c in calls)


def messages_to_pb(messages: Iterable[ChatMessage]) -> list[common_pb2.ChatMessage]:
    return [
        common_pb2.ChatMessage(
            role=m.role,
            content=m.content,
            tool_calls=tool_calls_to_pb(m.tool_calls),
            tool_call_id=m.tool_call_id,
            name=m.name,
        )
        for m in messages
    ]


def messages_from_pb(messages: Iterable[common_pb2.ChatMessage]) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content, tool_calls_from_pb(m.tool_calls), m.tool_call_id, m.name) for m in messages]


def sampling_to_pb(sampling: SamplingParams) -> common_pb2.SamplingParams:
    message = common_pb2.SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=sampling.stop,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logit_bias=dict(sampling.logit_bias),
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
        n=sampling.n,
        stop_token_ids=sampling.stop_token_ids,
    )
    if sampling.seed is not None:
        message.seed = sampling.seed
    if sampling.repetition_penalty != 1.0:
        message.repetition_penalty = sampling.repetition_penalty
    return message


def sampling_from_pb(message: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        repetition_penalty=message.repetition_penalty if message.HasField("repetition_penalty") else 1.0,
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in message.logit_bias.items())),
        logprobs=message.logprobs,
        top_logprobs=message.top_logprobs,
        n=max(1, message.n),
        stop_token_ids=tuple(message.stop_token_ids),
    )


def output_to_pb(output: OutputSpec) -> common_pb2.OutputSpec:
    return common_pb2.OutputSpec(
        tools=[
            common_pb2.Tool(name=t.name, description=t.description, parameters_json=t.parameters_json, strict=t.strict)
            for t in output.tools
        ],
        tool_choice=output.tool_choice.value,
        tool_choice_function=output.tool_choice_function,
        parallel_tool_calls=output.parallel_tool_calls,
        response_format=output.response_format.value,
        json_schema=output.json_schema,
        json_schema_name=output.json_schema_name,
        json_schema_strict=output.json_schema_strict,
    )


def output_from_pb(message: common_pb2.OutputSpec, field: str = "output") -> OutputSpec:
    try:
        tool_choice = ToolChoice(message.tool_choice or ToolChoice.AUTO.value)
    except ValueError:
        known = ", ".join(c.value for c in ToolChoice)
        raise InvalidRequest(f"{field}.tool_choice must be one of {known}; got {message.tool_choice[:40]!r}") from None
    try:
        response_format = ResponseFormat(message.response_format or ResponseFormat.TEXT.value)
    except ValueError:
        known = ", ".join(f.value for f in ResponseFormat)
        raise InvalidRequest(
            f"{field}.response_format must be one of {known}; got {message.response_format[:40]!r}"
        ) from None
    return OutputSpec(
        tools=tuple(ToolSpec(t.name, t.description, t.parameters_json, t.strict) for t in message.tools),
        tool_choice=tool_choice,
        tool_choice_function=message.tool_choice_function,
        parallel_tool_calls=message.parallel_tool_calls if message.HasField("parallel_tool_calls") else True,
        response_format=response_format,
        json_schema=message.json_schema,
        json_schema_name=message.json_schema_name,
        json_schema_strict=message.json_schema_strict,
    )


def logprobs_to_pb(logprobs: Iterable[TokenLogprob]) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token=lp.token,
            logprob=lp.logprob,
            bytes=lp.bytes,
            top_logprobs=[
                common_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in lp.top_logprobs
            ],
        )
        for lp in logprobs
    ]


def logprobs_from_pb(logprobs: Iterable[common_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            lp.token,
            lp.logprob,
            lp.bytes,
            tuple(TopLogprob(t.token, t.logprob, t.bytes) for t in lp.top_logprobs),
        )
        for lp in logprobs
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
