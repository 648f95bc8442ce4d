"""QuotaGate over gRPC: the gateway's side of the limiter (limiter_service, protos/llmesh/v1/limiter.proto).

Reserve before generating, settle once after. A refusal becomes ResourceExhausted with retry-after and
x-ratelimit-* trailers (HTTP 429 with those headers through Envoy); an admitted request carries the same headers
with what remains, which the gateway sends as initial metadata with its first message.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Iterable

import grpc

from gateway.pipeline import Reservation
from llmesh.convert import tier_to_pb
from llmesh.errors import ResourceExhausted
from llmesh.grpc_util import error_from_rpc
from llmesh.types import Principal
from llmesh.v1 import limiter_pb2, limiter_pb2_grpc

log = logging.getLogger(__name__)

# Header suffixes in the style OpenAI clients know, next to the draft-standard x-ratelimit-limit/remaining/reset.
_DETAIL = (("requests_per_hour", "requests"), ("tokens_per_hour", "tokens"))


def _reset_s(quota: limiter_pb2.QuotaState, now_ms: float) -> int:
    if quota.reset_unix_ms <= 0:
        return 0
    return max(0, math.ceil((quota.reset_unix_ms - now_ms) / 1000))


def quota_headers(
    quotas: Iterable[limiter_pb2.QuotaState], refused_by: str = "", retry_after_s: int | None = None
) -> tuple[tuple[str, str], ...]:
    """x-ratelimit-limit/-remaining/-reset describe the limit that refused the request, or requests per hour when
    it was admitted; -requests and -tokens variants describe those two budgets either way. Reset is in seconds."""
    by_name = {q.name: q for q in quotas}
    if not by_name:
        return ()
    now_ms = time.time() * 1000
    main = by_name.get(refused_by) or by_name.get("requests_per_hour") or next(iter(by_name.values()))
    reset = retry_after_s if refused_by and retry_after_s is not None else _reset_s(main, now_ms)
    headers = [
        ("x-ratelimit-limit", str(main.limit)),
        ("x-ratelimit-remaining", str(main.remaining)),
        ("x-ratelimit-reset", str(reset)),
    ]
    for name, suffix in _DETAIL:
        q = by_name.get(name)
        if q is not None:
            headers += [
                (f"x-ratelimit-limit-{suffix}", str(q.limit)),
                (f"x-ratelimit-remaining-{suffix}", str(q.remaining)),
                (f"x-ratelimit-reset-{suffix}", str(_reset_s(q, now_ms))),
            ]
    return tuple(headers)


class GrpcQuotaGate:
    """The pipeline's QuotaGate. If the limiter itself cannot be reached, requests fail with UNAVAILABLE: the
    limiter's own Redis failure policy is per tier, but without the limiter there is no policy to apply."""

    def __init__(self, target: str, timeout_s: float = 1.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = limiter_pb2_grpc.LimiterServiceStub(self._channel)
        self._timeout_s = timeout_s
        # Reserve calls whose caller left (they finish, then release what they got), and those releases.
        self._abandoned: set[asyncio.Future[limiter_pb2.ReserveResponse]] = set()
        self._background: set[asyncio.Future[None]] = set()

    async def close(self) -> None:
        if self._abandoned:
            await asyncio.gather(*self._abandoned, return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._channel.close()

    async def _reserve_call(self, message: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        # One retry on UNAVAILABLE (e.g. the limiter restarted); the nonce makes it admit the request at most once.
        for attempt in (1, 2):
            try:
                return await self._stub.Reserve(message, timeout=self._timeout_s)
            except grpc.RpcError as err:
                if attempt == 2 or err.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise error_from_rpc(err, "limiter") from err
        raise AssertionError("unreachable")

    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        message = limiter_pb2.ReserveRequest(
            request_id=request_id,
            key_id=principal.key_id,
            tier=tier_to_pb(principal.tier),
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            nonce=uuid.uuid4().hex,
        )
        call = asyncio.ensure_future(self._reserve_call(message))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The caller left while the limiter was deciding: if it admitted the request, give it back.
            self._abandoned.add(call)
            call.add_done_callback(self._release_if_admitted)
            raise
        if not reply.allowed:
            retry_s = max(1, math.ceil(reply.retry_after_ms / 1000))
            raise ResourceExhausted(
                reply.message or f"{reply.refused_by} limit reached",
                retry_after_s=retry_s,
                metadata=quota_headers(reply.quotas, reply.refused_by, retry_s),
            )
        return Reservation(reply.reservation_id, prompt_tokens + max_tokens, quota_headers(reply.quotas))

    def _release_if_admitted(self, call: asyncio.Future[limiter_pb2.ReserveResponse]) -> None:
        self._abandoned.discard(call)
        if call.cancelled() or call.exception() is not None or not call.result().allowed:
            return
        task = asyncio.ensure_future(self.settle(Reservation(call.result().reservation_id, 0), 0))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        try:
            await self._stub.Settle(
                limiter_pb2.SettleRequest(reservation_id=reservation.id, used_tokens=used_tokens),
                timeout=self._timeout_s,
            )
        except grpc.RpcError as err:
            # Not the caller's problem: the reservation stays charged in full until its lease ends.
            log.warning("settling %s failed (%s): %s", reservation.id, err.code(), err.details())  # type: ignore[attr-defined]
