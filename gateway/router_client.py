"""RouterClient over gRPC: translates llmesh types <-> router protobufs and statuses <-> domain errors.

Every call runs under the router's time budget (the watchdog, llmesh/budgets.py): a call unanswered for half the
budget is followed by a health check, and a router that leaves that unanswered too is hung: the call ends with
UNAVAILABLE. A live router is waited for as long as it needs (a generation queued behind others), up to the calls'
own deadlines. One hung call opens a circuit breaker, so later requests fail at once instead of each paying the
budget, until after a cooldown one request tries the router again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from llmesh.breaker import BreakerState, CircuitBreaker
from llmesh.budgets import CHANNEL_OPTIONS, DependencyHung, Watchdog, health_probe
from llmesh.convert import (
    logprobs_from_pb,
    messages_to_pb,
    output_to_pb,
    prepared_from_pb,
    prepared_to_pb,
    route_from_pb,
    sampling_to_pb,
    tier_to_pb,
    tiers_from_pb,
    tool_calls_from_pb,
    usage_from_pb,
)
from llmesh.errors import Internal, InvalidRequest, Unavailable
from llmesh.grpc_util import error_from_rpc
from llmesh.tls import TlsFiles, aio_channel
from llmesh.types import ChatRequest, GenerateEvent, PreparedPrompt, Tier, VariantInfo
from llmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


class GrpcRouterClient:
    def __init__(
        self,
        target: str,
        timeout_s: float = 330.0,
        tls: TlsFiles | None = None,
        hang_budget_s: float = 2.0,
        cooldown_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = aio_channel(target, tls, CHANNEL_OPTIONS)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._cooldown_s = cooldown_s
        self._watchdog = Watchdog.with_budget("the router", health_probe(self._channel), hang_budget_s)
        self.breaker = CircuitBreaker(cooldown_s, failure_threshold=1, clock=clock, on_change=self._changed)

    def _changed(self, state: BreakerState, reason: str) -> None:
        if state is BreakerState.OPEN:
            log.warning("router does not answer (%s); failing requests at once for %.1fs", reason, self._cooldown_s)
        elif state is BreakerState.CLOSED:
            log.info("router answers again")

    def _admit(self) -> None:
        if not self.breaker.allow():
            raise Unavailable(f"{self._watchdog.hung()}; retry shortly")

    async def _call(self, awaitable: Awaitable[T], short_deadline: bool = True) -> T:
        """The router's answer, or its error as a domain error; a hung router opens the breaker, and so does one
        that lets a `short_deadline` pass (not a generation's, which a long answer may reach)."""
        try:
            result = await self._watchdog.call(awaitable)
        except DependencyHung as exc:
            self.breaker.record_failure(str(exc))
            raise
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and short_deadline:  # type: ignore[attr-defined]
                self.breaker.record_failure("deadline exceeded")
            elif err.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                self.breaker.record_success()  # an answer of the router's own
            raise error_from_rpc(err, "router") from err
        self.breaker.record_success()
        return result

    async def close(self) -> None:
        await self._channel.close()

    async def prepare(self, tier: Tier, request: ChatRequest) -> PreparedPrompt:
        message = router_pb2.PrepareRequest(
            tier=tier_to_pb(tier),
            model=request.model,
            messages=messages_to_pb(request.messages),
            sampling=sampling_to_pb(request.sampling),
            output=output_to_pb(request.output),
            prompt=request.prompt,
        )
        self._admit()
        reply = await self._call(self._stub.Prepare(message, timeout=10.0))
        try:
            return prepared_from_pb(reply.prepared)
        except InvalidRequest as exc:
            # The router's answer, not the caller's request, is malformed.
            raise Internal(f"router answered Prepare with a malformed prompt: {exc}") from exc

    async def generate(
        self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
    ) -> AsyncIterator[GenerateEvent]:
        message = router_pb2.GenerateRequest(
            request_id=request_id,
            tier=tier_to_pb(tier),
            model=request.model,
            # Sent also with a prepared prompt: a fallback to a variant that tokenizes differently needs them.
            messages=messages_to_pb(request.messages),
            sampling=sampling_to_pb(request.sampling),
            output=output_to_pb(request.output),
            prompt=request.prompt,
        )
        if prepared is not None:
            message.prepared.CopyFrom(prepared_to_pb(prepared))
        call = self._stub.Generate(message, timeout=self._timeout_s)
        try:
            while (chunk := await self._call(call.read(), short_deadline=False)) is not grpc.aio.EOF:
                assert isinstance(chunk, router_pb2.GenerateChunk)
                yield GenerateEvent(
                    delta=chunk.delta,
                    finish_reason=chunk.finish_reason,
                    usage=usage_from_pb(chunk.usage) if chunk.HasField("usage") else None,
                    route=route_from_pb(chunk.route) if chunk.HasField("route") else None,
                    index=chunk.index,
                    logprobs=logprobs_from_pb(chunk.logprobs),
                    tool_calls=tool_calls_from_pb(chunk.tool_calls),
                )
        finally:
            # Also runs when our caller goes away mid-stream: the router then cancels the generation.
            call.cancel()

    async def list_variants(self) -> list[VariantInfo]:
        self._admit()
        reply = await self._call(self._stub.ListVariants(router_pb2.ListVariantsRequest(), timeout=5.0))
        return [
            VariantInfo(v.name, v.description, v.context_length, tiers_from_pb(v.tiers, f"variant {v.name} tiers"))
            for v in reply.variants
        ]
