"""The gateway's QuotaGate over gRPC, against an in-process fake LimiterService: answers become the right errors
and headers, an unreachable limiter is UNAVAILABLE, and a request abandoned while the limiter decides is released.
(The real limiter behind it: tests/integration/test_limiter_mesh.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from control.process import free_port
from gateway.pipeline import Reservation
from gateway.quotas import GrpcQuotaGate, quota_headers
from llmesh.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from llmesh.types import Principal, Tier
from llmesh.v1 import common_pb2, limiter_pb2, limiter_pb2_grpc

PRINCIPAL = Principal("0123456789abcdef", Tier.FREE)


def quotas(remaining: int, reset_in_s: float) -> list[limiter_pb2.QuotaState]:
    reset = int((time.time() + reset_in_s) * 1000)
    return [
        limiter_pb2.QuotaState(name="requests_per_hour", limit=20, remaining=remaining, reset_unix_ms=reset),
        limiter_pb2.QuotaState(name="tokens_per_hour", limit=1000, remaining=400, reset_unix_ms=reset),
        limiter_pb2.QuotaState(name="concurrent_streams", limit=2, remaining=0, reset_unix_ms=0),
    ]


class FakeLimiter(limiter_pb2_grpc.LimiterServiceServicer):
    def __init__(self) -> None:
        self.allow = True
        self.delay_s = 0.0
        self.reserves: list[limiter_pb2.ReserveRequest] = []
        self.settled: list[limiter_pb2.SettleRequest] = []
        self.released: list[limiter_pb2.ReleaseRequest] = []
        # The first this many calls of Reserve (Settle) fail with UNAVAILABLE (time out) before doing anything.
        self.unavailable = 0
        self.settle_delays: list[float] = []

    async def Reserve(
        self, request: limiter_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> limiter_pb2.ReserveResponse:
        self.reserves.append(request)
        if self.unavailable:
            self.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        await asyncio.sleep(self.delay_s)
        if self.allow:
            return limiter_pb2.ReserveResponse(allowed=True, reservation_id="r/free/x/1", quotas=quotas(7, 100))
        return limiter_pb2.ReserveResponse(
            allowed=False,
            refused_by="concurrent_streams",
            retry_after_ms=1500,
            message="concurrency limit: the free tier allows 2 requests at once; retry in 2 s",
            quotas=quotas(7, 100),
        )

    async def Settle(self, request: limiter_pb2.SettleRequest, context: object) -> limiter_pb2.SettleResponse:
        if self.settle_delays:
            await asyncio.sleep(self.settle_delays.pop(0))
        self.settled.append(request)
        return limiter_pb2.SettleResponse(settled=True)

    async def Release(self, request: limiter_pb2.ReleaseRequest, context: object) -> limiter_pb2.ReleaseResponse:
        self.released.append(request)
        return limiter_pb2.ReleaseResponse(released=True)


async def serving(fake: FakeLimiter) -> AsyncIterator[str]:
    server = grpc.aio.server()
    limiter_pb2_grpc.add_LimiterServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def test_headers_name_the_refusing_limit_or_requests_per_hour() -> None:
    admitted = dict(quota_headers(quotas(7, 99.2)))
    assert admitted["x-ratelimit-limit"] == "20" and admitted["x-ratelimit-remaining"] == "7"
    assert admitted["x-ratelimit-reset"] == "100" and admitted["x-ratelimit-remaining-tokens"] == "400"
    refused = dict(quota_headers(quotas(7, 100), "concurrent_streams", 2))
    assert refused["x-ratelimit-limit"] == "2" and refused["x-ratelimit-remaining"] == "0"
    assert refused["x-ratelimit-reset"] == "2" and refused["x-ratelimit-limit-requests"] == "20"
    assert quota_headers([]) == ()


def test_admitted_refused_and_settled() -> None:
    fake = FakeLimiter()

    async def main() -> None:
        async for target in serving(fake):
            gate = GrpcQuotaGate(target)
            reservation = await gate.reserve(PRINCIPAL, "chatcmpl-1", 30, 70)
            assert reservation.id == "r/free/x/1" and reservation.reserved_tokens == 100
            assert ("x-ratelimit-remaining", "7") in reservation.headers
            sent = fake.reserves[-1]
            sent_fields = (sent.key_id, sent.tier, sent.prompt_tokens, sent.max_tokens)
            assert sent_fields == (PRINCIPAL.key_id, common_pb2.TIER_FREE, 30, 70)
            assert len(sent.nonce) == 32, "a fresh nonce makes a retried Reserve admit once"
            await gate.settle(reservation, 42)
            assert [(s.reservation_id, s.used_tokens) for s in fake.settled] == [("r/free/x/1", 42)]

            fake.allow = False
            with pytest.raises(ResourceExhausted) as refused:
                await gate.reserve(PRINCIPAL, "chatcmpl-2", 30, 70)
            assert "concurrency limit" in str(refused.value) and refused.value.retry_after_s == 2
            assert ("x-ratelimit-limit", "2") in refused.value.metadata
            await gate.close()

    asyncio.run(main())


def test_unreachable_limiter_is_unavailable_and_settle_never_raises() -> None:
    async def main() -> None:
        gate = GrpcQuotaGate(f"127.0.0.1:{free_port()}", timeout_s=0.5, retry_delays_s=(0.01,))
        with pytest.raises(Unavailable):
            await gate.reserve(PRINCIPAL, "chatcmpl-3", 1, 1)
        await gate.settle(Reservation("r/free/x/2", 2), 1)  # retried in the background, then logged: never raised
        started = time.monotonic()
        await gate.close(timeout_s=3.0)
        assert time.monotonic() - started < 3.5 and gate.in_background == 0

    asyncio.run(main())


def test_a_request_abandoned_during_reserve_is_released() -> None:
    fake = FakeLimiter()
    fake.delay_s = 0.3

    async def main() -> None:
        async for target in serving(fake):
            gate = GrpcQuotaGate(target)
            task = asyncio.create_task(gate.reserve(PRINCIPAL, "chatcmpl-4", 5, 5))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await gate.close()  # waits for the release it started
            assert fake.settled == []
            released = [(r.key_id, r.tier, r.nonce) for r in fake.released]
            assert released == [(PRINCIPAL.key_id, common_pb2.TIER_FREE, fake.reserves[0].nonce)]

    asyncio.run(main())


def test_a_reserve_whose_answer_never_came_is_released_by_its_nonce() -> None:
    """The deadline passes while the limiter decides: it may still admit, so the gate releases that nonce."""
    fake = FakeLimiter()
    fake.delay_s = 0.5

    async def main() -> None:
        async for target in serving(fake):
            gate = GrpcQuotaGate(target, timeout_s=0.2)
            with pytest.raises(DeadlineExceeded):
                await gate.reserve(PRINCIPAL, "chatcmpl-5", 5, 5)
            await gate.close()
            assert [r.nonce for r in fake.released] == [fake.reserves[0].nonce]
            assert fake.released[0].request_id == "chatcmpl-5"

    asyncio.run(main())


def test_a_retried_reserve_uses_a_new_nonce_and_releases_the_first() -> None:
    fake = FakeLimiter()
    fake.unavailable = 1

    async def main() -> None:
        async for target in serving(fake):
            gate = GrpcQuotaGate(target)
            reservation = await gate.reserve(PRINCIPAL, "chatcmpl-6", 5, 5)
            await gate.close()
            assert reservation.id == "r/free/x/1"
            first, second = (r.nonce for r in fake.reserves)
            assert first != second and [r.nonce for r in fake.released] == [first]

    asyncio.run(main())


def test_a_settlement_that_timed_out_is_sent_again_and_close_waits_for_it() -> None:
    fake = FakeLimiter()
    fake.settle_delays = [0.5]  # the first Settle outlives its deadline (and lands later: settling is idempotent)

    async def main() -> None:
        async for target in serving(fake):
            gate = GrpcQuotaGate(target, timeout_s=0.2, retry_delays_s=(0.05,))
            await gate.settle(Reservation("r/free/x/3", 10), 4)
            assert gate.in_background == 1
            await gate.close()
            assert gate.in_background == 0
            assert [(s.reservation_id, s.used_tokens) for s in fake.settled][-1] == ("r/free/x/3", 4)
            assert len(fake.settled) >= 1

    asyncio.run(main())


def test_refusals_are_answers_nothing_is_released() -> None:
    fake = FakeLimiter()
    fake.allow = False

    async def main() -> None:
        async for target in serving(fake):
            gate = GrpcQuotaGate(target)
            with pytest.raises(ResourceExhausted):
                await gate.reserve(PRINCIPAL, "chatcmpl-7", 5, 5)
            await gate.close()
            assert fake.released == []

    asyncio.run(main())
