"""The gateway's memory of quota refusals: what it covers, for how long, and that a covered request is refused
before the router tokenizes it."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import RefusalMemory
from gateway.metrics import NullGatewayObserver
from gateway.pipeline import ChatPipeline, Reservation
from gateway.validation import RequestLimits
from llmesh.errors import ResourceExhausted
from llmesh.types import ChatMessage, ChatRequest, Principal, SamplingParams, Tier
from tests.unit.test_pipeline import FakeRouter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refusal(limit: str, retry_after_s: int | None = 30) -> ResourceExhausted:
    return ResourceExhausted(f"{limit} reached", retry_after_s=retry_after_s, limit=limit)


@pytest.mark.parametrize("limit", ["requests_per_hour", "burst_per_minute"])
def test_rate_refusal_covers_every_request_of_the_key_for_the_memory_time(limit: str) -> None:
    clock = Clock()
    memory = RefusalMemory(memory_s=1.0, clock=clock)
    memory.remember("k1", refusal(limit), need=500)
    with pytest.raises(ResourceExhausted, match=limit):
        memory.check("k1", max_tokens=1)
    memory.check("k2", max_tokens=1)  # another key is not touched
    clock.now += 1.0
    memory.check("k1", max_tokens=1)  # forgotten: the limiter is asked again


def test_memory_never_outlasts_retry_after() -> None:
    clock = Clock()
    memory = RefusalMemory(memory_s=10.0, clock=clock)
    memory.remember("k1", refusal("requests_per_hour", retry_after_s=2), need=10)
    clock.now += 1.9
    with pytest.raises(ResourceExhausted):
        memory.check("k1", max_tokens=1)
    clock.now += 0.1
    memory.check("k1", max_tokens=1)


def test_token_refusal_covers_only_requests_that_certainly_need_as_much() -> None:
    memory = RefusalMemory(memory_s=1.0, clock=Clock())
    memory.remember("k1", refusal("tokens_per_hour"), need=300)
    # max_tokens 298 + at least one prompt token = 299 < 300: might fit, so the limiter decides.
    memory.check("k1", max_tokens=298)
    with pytest.raises(ResourceExhausted, match="tokens_per_hour"):
        memory.check("k1", max_tokens=299)


@pytest.mark.parametrize("limit", ["concurrent_streams", ""])
def test_concurrency_and_non_quota_refusals_are_not_remembered(limit: str) -> None:
    memory = RefusalMemory(memory_s=1.0, clock=Clock())
    memory.remember("k1", refusal(limit), need=10)
    memory.check("k1", max_tokens=1)


def test_zero_memory_turns_it_off_and_the_key_count_is_bounded() -> None:
    off = RefusalMemory(memory_s=0, clock=Clock())
    off.remember("k1", refusal("requests_per_hour"), need=1)
    off.check("k1", max_tokens=1)
    small = RefusalMemory(memory_s=1.0, max_keys=2, clock=Clock())
    for key in ("a", "b", "c"):
        small.remember(key, refusal("requests_per_hour"), need=1)
    small.check("a", max_tokens=1)  # the oldest was dropped
    for key in ("b", "c"):
        with pytest.raises(ResourceExhausted):
            small.check(key, max_tokens=1)


class RateLimitedQuotas:
    def __init__(self) -> None:
        self.reserves = 0

    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        self.reserves += 1
        raise refusal("requests_per_hour", retry_after_s=30)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        raise AssertionError("nothing was admitted")


def test_a_refused_key_is_refused_before_prepare_until_the_memory_ends() -> None:
    clock = Clock()
    calls: list[str] = []
    router, quotas = FakeRouter(["x"], calls=calls), RateLimitedQuotas()
    pipeline = ChatPipeline(
        keys=None,  # type: ignore[arg-type]
        router=router,
        limits=RequestLimits(),
        quotas=quotas,
        observer=NullGatewayObserver(),
        clock=clock,
        refusals=RefusalMemory(memory_s=1.0, clock=clock),
    )
    principal = Principal("k1", Tier.FREE)
    request = ChatRequest("auto", (ChatMessage("user", "hi"),), SamplingParams(max_tokens=10))

    async def one() -> None:
        async for _ in pipeline.stream(principal, request, "r1"):
            pass

    for _ in range(3):
        with pytest.raises(ResourceExhausted):
            asyncio.run(one())
    assert calls == ["router.Prepare"] and quotas.reserves == 1
    clock.now += 1.0
    with pytest.raises(ResourceExhausted):
        asyncio.run(one())
    assert calls == ["router.Prepare", "router.Prepare"] and quotas.reserves == 2
