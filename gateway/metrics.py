"""The gateway's view of every request: rate, errors by code, latency, time to first token, inter-token gaps,
tokens and cost per tier and variant (llmesh/metrics.py conventions)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from llmesh import errors
from llmesh.metrics import LATENCY_BUCKETS, TOKEN_GAP_BUCKETS
from llmesh.types import GenerateEvent, Usage

log = logging.getLogger(__name__)

# gRPC status names, as in the `code` label.
_CODES: tuple[tuple[type[errors.MeshError], str], ...] = (
    (errors.InvalidRequest, "INVALID_ARGUMENT"),
    (errors.Unauthenticated, "UNAUTHENTICATED"),
    (errors.PermissionDenied, "PERMISSION_DENIED"),
    (errors.ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (errors.Unavailable, "UNAVAILABLE"),
    (errors.DeadlineExceeded, "DEADLINE_EXCEEDED"),
)


def code_of(exc: BaseException) -> str:
    for exc_type, code in _CODES:
        if isinstance(exc, exc_type):
            return code
    # The caller went away (gRPC cancels the handler task) or stopped reading.
    return "CANCELLED" if isinstance(exc, GeneratorExit | asyncio.CancelledError) else "INTERNAL"


def parse_prices(text: str) -> dict[str, float]:
    """'variant=price per 1k tokens,...' -> {variant: price}."""
    prices: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        prices[name.strip()] = float(value)
    return prices


class GatewayObserver(Protocol):
    def rejected(self, tier: str, code: str) -> None: ...

    def stage(self, name: str, seconds: float) -> None:
        """Time one step of the request path took (auth, prepare, cache_lookup, reserve, first_event)."""
        ...

    def observe(
        self, events: AsyncIterator[GenerateEvent], tier: str, clock: Callable[[], float] = time.monotonic
    ) -> AsyncIterator[GenerateEvent]: ...


class NullGatewayObserver:
    def rejected(self, tier: str, code: str) -> None:
        pass

    def stage(self, name: str, seconds: float) -> None:
        pass

    def observe(
        self, events: AsyncIterator[GenerateEvent], tier: str, clock: Callable[[], float] = time.monotonic
    ) -> AsyncIterator[GenerateEvent]:
        return events


class PrometheusGatewayObserver:
    def __init__(self, registry: CollectorRegistry, prices_per_1k: Mapping[str, float]) -> None:
        self._prices = dict(prices_per_1k)
        self.requests = Counter(
            "llmesh_gateway_requests_total", "Chat requests by outcome", ["tier", "variant", "code"], registry=registry
        )
        self.duration = Histogram(
            "llmesh_gateway_request_duration_seconds", "End-to-end time of chat requests that were answered",
            ["tier", "variant"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "llmesh_gateway_ttft_seconds", "Time from the request reaching the gateway to its first text",
            ["tier", "variant"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.gaps = Histogram(
            "llmesh_gateway_inter_token_seconds", "Gaps between streamed text chunks",
            ["variant"], buckets=TOKEN_GAP_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tokens = Counter(
            "llmesh_gateway_tokens_total", "Tokens by direction (prompt = in, completion = out)",
            ["tier", "variant", "direction"], registry=registry,
        )  # fmt: skip
        self.stages = Histogram(
            "llmesh_gateway_stage_seconds",
            "Time of each step before generation: auth, prepare (router), cache_lookup, reserve (limiter), and "
            "first_event (router Generate until its first event)",
            ["stage"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.cost = Counter(
            "llmesh_gateway_cost_total", "Cost of answered requests at the configured price per 1k tokens",
            ["tier", "variant"], registry=registry,
        )  # fmt: skip

    def stage(self, name: str, seconds: float) -> None:
        self.stages.labels(name).observe(seconds)

    def rejected(self, tier: str, code: str) -> None:
        """A request refused before routing (auth, validation): no variant yet."""
        self.requests.labels(tier, "", code).inc()

    async def observe(
        self, events: AsyncIterator[GenerateEvent], tier: str, clock: Callable[[], float] = time.monotonic
    ) -> AsyncIterator[GenerateEvent]:
        start = clock()
        variant, cached = "", False
        first: float | None = None
        last = start
        usage: Usage | None = None
        code = "CANCELLED"
        try:
            async for event in events:
                if event.route is not None:
                    variant = event.route.variant
                cached = cached or bool(getattr(event, "cache", ""))
                if event.delta:
                    now = clock()
                    if first is None:
                        first = now
                        self.ttft.labels(tier, variant).observe(now - start)
                    else:
                        self.gaps.labels(variant).observe(now - last)
                    last = now
                if event.usage is not None:
                    # The answer is complete; a consumer that stops reading now did not cancel anything.
                    usage, code = event.usage, "OK"
                yield event
        except BaseException as exc:
            if usage is None:
                code = code_of(exc)
            raise
        finally:
            self.requests.labels(tier, variant, code).inc()
            log.info(
                "request done tier=%s variant=%s code=%s ttft_ms=%s duration_ms=%.1f prompt_tokens=%s "
                "completion_tokens=%s cache=%s",
                tier, variant, code, f"{(first - start) * 1000:.1f}" if first is not None else "-",
                (clock() - start) * 1000, usage.prompt_tokens if usage else "-",
                usage.completion_tokens if usage else "-", "hit" if cached else "miss",
            )  # fmt: skip
            if usage is not None:
                self.duration.labels(tier, variant).observe(clock() - start)
                if not cached:
                    # Cache hits cost nothing to serve; the cache service counts the tokens they saved.
                    self.tokens.labels(tier, variant, "prompt").inc(usage.prompt_tokens)
                    self.tokens.labels(tier, variant, "completion").inc(usage.completion_tokens)
                    self.cost.labels(tier, variant).inc(usage.total_tokens / 1000 * self._prices.get(variant, 0.0))
