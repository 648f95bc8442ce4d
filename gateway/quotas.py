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
from collections.abc import Awaitable, Callable, Iterable

import grpc

from gateway.pipeline import Reservation
from llmesh.convert import tier_to_pb
from llmesh.errors import MeshError, ResourceExhausted
from llmesh.grpc_util import error_from_rpc
from llmesh.tls import TlsFiles, aio_channel
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


# After these codes the limiter may have admitted the request although no answer came back (the deadline passed,
# the call was cancelled, the connection broke after the request went out): the reservation is released by its
# nonce. Other errors (INVALID_ARGUMENT, PERMISSION_DENIED, ...) are answers: nothing was admitted.
_UNKNOWN_OUTCOME = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
# Pauses between the tries of a release or a settlement that failed that way (both are idempotent).
RETRY_DELAYS_S = (0.1, 0.3, 1.0, 3.0)


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(err, "code", None)
    return code() if callable(code) else None


class GrpcQuotaGate:
    """The pipeline's QuotaGate. If the limiter itself cannot be reached, requests fail with UNAVAILABLE: the
    limiter's own Redis failure policy is per tier, but without the limiter there is no policy to apply.

    No reservation outlives its request: a Reserve whose answer never came (deadline, cancellation, a broken
    connection) or came after its caller left is released by the nonce this gate chose; a settlement that failed
    that way is sent again. Both run in the background, retried (RETRY_DELAYS_S); `close` waits for them, bounded.
    What still fails ends with the reservation's lease in the limiter (its concurrency slot; see limiter.proto).
    """

    def __init__(
        self,
        target: str,
        timeout_s: float = 1.0,
        tls: TlsFiles | None = None,
        retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> None:
        self._channel = aio_channel(target, tls)
        self._stub = limiter_pb2_grpc.LimiterServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._retry_delays_s = retry_delays_s
        # Releases and settlements being retried, and releases waiting for an abandoned Reserve to end.
        self._background: set[asyncio.Future[None]] = set()

    @property
    def in_background(self) -> int:
        return len(self._background)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Wait up to `timeout_s` for releases and settlements still being sent, then close the channel."""
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=timeout_s)
            if pending:
                log.warning(
                    "%d quota releases/settlements unsent at shutdown; they end with their leases", len(pending)
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        await self._channel.close()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reserve_once(self, message: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        try:
            return await self._stub.Reserve(message, timeout=self._timeout_s)
        except grpc.RpcError as err:
            if _code(err) in _UNKNOWN_OUTCOME:
                self._spawn(self._release(message))
            raise
        except asyncio.CancelledError:
            self._spawn(self._release(message))
            raise

    async def _reserve_call(
        self, message: limiter_pb2.ReserveRequest
    ) -> tuple[limiter_pb2.ReserveResponse, limiter_pb2.ReserveRequest]:
        """The answer and the request it answers. One retry on UNAVAILABLE (e.g. the limiter restarted), with a
        new nonce: the first one is being released."""
        for attempt in (1, 2):
            try:
                return await self._reserve_once(message), message
            except grpc.RpcError as err:
                if attempt == 2 or _code(err) != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc(err, "limiter") from err
                retry = limiter_pb2.ReserveRequest()
                retry.CopyFrom(message)
                retry.nonce = uuid.uuid4().hex
                message = retry
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
            reply, _ = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The caller left while the limiter was deciding: whatever it decides is given back.
            self._spawn(self._release_when_decided(call))
            raise
        if not reply.allowed:
            retry_s = max(1, math.ceil(reply.retry_after_ms / 1000))
            raise ResourceExhausted(
                reply.message or f"{reply.refused_by} limit reached",
                retry_after_s=retry_s,
                metadata=quota_headers(reply.quotas, reply.refused_by, retry_s),
                limit=reply.refused_by,
            )
        return Reservation(reply.reservation_id, prompt_tokens + max_tokens, quota_headers(reply.quotas))

    async def _release_when_decided(
        self, call: asyncio.Future[tuple[limiter_pb2.ReserveResponse, limiter_pb2.ReserveRequest]]
    ) -> None:
        try:
            reply, sent = await call
        except (MeshError, asyncio.CancelledError):
            return  # no answer: _reserve_once released it if the outcome was unknown
        if reply.allowed:
            await self._release(sent)

    async def _release(self, reserve: limiter_pb2.ReserveRequest) -> None:
        message = limiter_pb2.ReleaseRequest(
            request_id=reserve.request_id, key_id=reserve.key_id, tier=reserve.tier, nonce=reserve.nonce
        )
        await self._deliver("release", reserve.nonce, lambda: self._stub.Release(message, timeout=self._timeout_s))

    async def _deliver(self, what: str, name: str, send: Callable[[], Awaitable[object]], tries: int = 0) -> bool:
        """Send until answered: retried after each unknown-outcome error, up to len(RETRY_DELAYS_S) more times."""
        last: grpc.StatusCode | None = None
        for delay in (0.0, *self._retry_delays_s)[tries:]:
            if delay:
                await asyncio.sleep(delay)
            try:
                await send()
                return True
            except grpc.RpcError as err:
                code = _code(err)
                if code not in _UNKNOWN_OUTCOME:
                    log.warning("%s of reservation %s refused (%s): %s", what, name, code, err.details())  # type: ignore[attr-defined]
                    return False
                last = code
        log.warning("%s of reservation %s failed (%s); it ends with its lease", what, name, last)
        return False

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        message = limiter_pb2.SettleRequest(reservation_id=reservation.id, used_tokens=used_tokens)

        async def send() -> None:
            await self._stub.Settle(message, timeout=self._timeout_s)

        try:
            await send()
        except grpc.RpcError as err:
            if _code(err) not in _UNKNOWN_OUTCOME:
                log.warning("settling %s refused (%s): %s", reservation.id, _code(err), err.details())  # type: ignore[attr-defined]
                return
            # Not the caller's problem: sent again in the background (settling twice changes nothing).
            self._spawn(self._retry_settle(reservation.id, send))

    async def _retry_settle(self, name: str, send: Callable[[], Awaitable[None]]) -> None:
        await self._deliver("settlement", name, send, tries=1)
