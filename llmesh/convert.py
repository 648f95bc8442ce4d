"""llmesh.types <-> llmesh.v1 protobufs, in one place so every service translates the same way."""

from __future__ import annotations

from collections.abc import Iterable

from llmesh.types import ChatMessage, RouteInfo, SamplingParams, Usage
from llmesh.v1 import common_pb2


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
    return common_pb2.RouteInfo(variant=route.variant, reason=route.reason)


def route_from_pb(message: common_pb2.RouteInfo) -> RouteInfo:
    return RouteInfo(message.variant, message.reason)
