"""The gateway's request path. No gRPC here.

authenticate -> validate -> recent quota refusals (gateway/admission.py: a key the limiter just refused is refused
again before anything expensive) -> router.prepare (route + the prompt's token ids) -> cache lookup -> quota reservation
-> router.generate (of the prepared prompt: routed and tokenized once) -> quota settlement -> cache store.

Single flight and quotas: a lookup that finds an identical request in flight does not wait there. The request
takes its quota reservation first and then waits (a second lookup), so every waiter holds a concurrency slot like a
stream, and a refused one never waits; a waiter served the leader's answer is settled with 0 tokens.

Quotas reserve prompt + n * max_tokens (every choice may run to max_tokens) and settle the router's usage: the
prompt once plus the completion tokens of all choices.

The response cache stores one choice's text chunks: requests for several choices (n > 1), log probabilities, or
that may be answered with tool calls (tools offered, tool_choice not "none") bypass it (`cacheable`).

Settlement and cache store run as one task the caller's cancellation cannot stop; `drain` waits for those still
running (the server calls it on shutdown, before closing its clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from gateway.admission import RefusalMemory
from gateway.auth import ApiKeyStore, authenticate
from gateway.metrics import GatewayObserver, NullGatewayObserver, code_of
from gateway.validation import ChatRequestFields, RequestLimits, validate
from llmesh.errors import Internal, MeshError, ResourceExhausted
from llmesh.logs import REQUEST_ID
from llmesh.types import (
    ChatRequest,
    GenerateEvent,
    PreparedPrompt,
    Principal,
    RouteInfo,
    RouteKind,
    Tier,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    Usage,
    VariantInfo,
)

# Finish reasons of an answer that ended by itself; anything else (e.g. "cancelled") was cut short.
FINISHED = ("stop", "length")


class RouterClient(Protocol):
    async def prepare(self, tier: Tier, request: ChatRequest) -> PreparedPrompt:
        """Route, render and tokenize the request (the prompt's size is len(input_ids)); raises what Generate
        would."""
        ...

    def generate(
        self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
    ) -> AsyncIterator[GenerateEvent]:
        """Stream the answer of `prepared` as it is (the router checks it); None: the router prepares anew."""
        ...

    async def list_variants(self) -> list[VariantInfo]: ...


@dataclass(frozen=True)
class Reservation:
    """Quota held for one admitted request until it is settled."""

    id: str
    reserved_tokens: int
    # Response metadata such as x-ratelimit-remaining, for the caller.
    headers: tuple[tuple[str, str], ...] = ()


class QuotaGate(Protocol):
    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        """Admit the request and hold prompt_tokens + max_tokens (the completion budget of all its choices),
        atomically; raise ResourceExhausted if over."""
        ...

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Charge what was used and refund the rest; called exactly once per reservation, also on failure."""
        ...


@dataclass(frozen=True)
class CachedAnswer:
    chunks: tuple[str, ...]
    finish_reason: str
    usage: Usage
    layer: str = "exact"


@dataclass(frozen=True)
class CacheLookup:
    """What a cache lookup found: a hit's answer, or a miss. A miss with `store` is one the cache wants filled;
    `flight_token` is set when this request holds the single-flight lock (identical requests wait for its store).
    A miss without `store` (not cacheable, or the cache was bypassed) is never stored."""

    answer: CachedAnswer | None = None
    store: bool = False
    flight_token: str = ""
    # Asked with wait=False: an identical request is being generated; look up again (waiting) for its answer.
    in_flight: bool = False


NO_STORE = CacheLookup()


class CacheClient(Protocol):
    """The gateway's side of the response cache (cache_service's core is AnswerCache)."""

    async def lookup(
        self, principal: Principal, route: RouteInfo, request: ChatRequest, wait: bool = True
    ) -> CacheLookup:
        """A hit, a miss, or (wait=False) `in_flight` instead of waiting for an identical request's answer."""
        ...

    async def store(
        self,
        principal: Principal,
        route: RouteInfo,
        request: ChatRequest,
        lookup: CacheLookup,
        answer: CachedAnswer | None,
    ) -> None:
        """Fill the miss `lookup` found, passing back its flight token; `answer` None means generation failed or
        was cut short (identical requests waiting on this one are released). Called only when `lookup.store`."""
        ...


def cacheable(request: ChatRequest) -> bool:
    """Whether the response cache may answer (and store) this request: it keeps one choice's text chunks, so not
    with several choices, log probabilities, or tools the model may call."""
    sampling, output = request.sampling, request.output
    may_call_tools = bool(output.tools) and output.tool_choice is not ToolChoice.NONE
    return sampling.n <= 1 and not sampling.logprobs and not may_call_tools


def completion_budget(request: ChatRequest) -> int:
    """Tokens the answer may generate: max_tokens for each choice."""
    return request.sampling.max_tokens * max(1, request.sampling.n)


@dataclass(frozen=True)
class ChoiceOutput:
    """One choice of a complete answer."""

    index: int
    text: str
    finish_reason: str
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    # Choice 0's text and finish_reason; `choices` holds all of them, in index order.
    text: str
    finish_reason: str
    usage: Usage
    route: RouteInfo
    # "exact" or "semantic" when served from the response cache.
    cache: str = ""
    choices: tuple[ChoiceOutput, ...] = ()


class ChatPipeline:
    def __init__(
        self,
        keys: ApiKeyStore,
        router: RouterClient,
        limits: RequestLimits,
        quotas: QuotaGate | None = None,
        cache: CacheClient | None = None,
        observer: GatewayObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
        refusals: RefusalMemory | None = None,
    ) -> None:
        self._keys = keys
        # Recent quota refusals, checked before Prepare (tokenizing) so a refused key costs nothing expensive.
        self._refusals = refusals or RefusalMemory(clock=clock)
        self._clock = clock
        self._router = router
        self._limits = limits
        self._quotas = quotas
        self._cache = cache
        self._observer = observer or NullGatewayObserver()
        self._finishing: set[asyncio.Future[None]] = set()
        self._streams = 0  # requests between their start and their settlement being under way

    async def authenticate(self, authorization: str | None) -> Principal:
        started = self._clock()
        try:
            principal = await authenticate(self._keys, authorization)
            self._observer.stage("auth", self._clock() - started)
            return principal
        except MeshError as exc:
            self._observer.rejected("", code_of(exc))
            raise

    def validate(self, fields: ChatRequestFields, principal: Principal | None = None) -> ChatRequest:
        try:
            return validate(fields, self._limits)
        except MeshError as exc:
            self._observer.rejected(principal.tier.value if principal else "", code_of(exc))
            raise

    def stream(
        self,
        principal: Principal,
        request: ChatRequest,
        request_id: str,
        response_headers: list[tuple[str, str]] | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        """Events from the router: route first, then deltas, then finish_reason + usage; measured by the observer.

        `response_headers` receives the quota headers (x-ratelimit-*) once the request is admitted, for the caller
        to send with its first message.
        """
        REQUEST_ID.set(request_id)
        events = self._stream(principal, request, request_id, response_headers)
        return self._observer.observe(events, principal.tier.value)

    async def _stream(
        self,
        principal: Principal,
        request: ChatRequest,
        request_id: str,
        response_headers: list[tuple[str, str]] | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        """Events from the router: route first, then deltas, then finish_reason + usage.

        Routing happens first (Prepare) so that the cache and the limiter, which slot in here, know the variant and
        the prompt's size before anything is generated.
        """
        with self._in_flight():
            clock, stage = self._clock, self._observer.stage
            if self._quotas is not None:
                self._refusals.check(principal.key_id, completion_budget(request))
            started = clock()
            prepared = await self._router.prepare(principal.tier, request)
            route, prompt_tokens = prepared.route, len(prepared.input_ids)
            stage("prepare", clock() - started)
            lookup = NO_STORE
            reservation: Reservation | None = None
            if self._cache is not None and cacheable(request):
                started = clock()
                # With quotas, never wait inside the first lookup: see the module's docstring.
                lookup = await self._cache.lookup(principal, route, request, wait=self._quotas is None)
                stage("cache_lookup", clock() - started)
                if lookup.in_flight and self._quotas is not None:
                    reservation = await self._reserve(principal, request_id, prompt_tokens, request, response_headers)
                    try:
                        started = clock()
                        lookup = await self._cache.lookup(principal, route, request)
                        stage("cache_wait", clock() - started)
                    except BaseException:
                        await self._finish(principal, route, request, reservation, 0, NO_STORE, None)
                        raise
                hit = lookup.answer
                if hit is not None:
                    try:
                        route_hit = RouteInfo(
                            route.variant, f"{route.reason}; {hit.layer} cache hit", RouteKind.CACHE_HIT
                        )
                        yield GenerateEvent(route=route_hit, cache=hit.layer)
                        for chunk in hit.chunks:
                            yield GenerateEvent(delta=chunk, cache=hit.layer)
                        yield GenerateEvent(finish_reason=hit.finish_reason, usage=hit.usage, cache=hit.layer)
                    finally:
                        if reservation is not None:  # a waiter: it held a slot, the leader's answer cost it nothing
                            await self._finish(principal, route, request, reservation, 0, NO_STORE, None)
                    return
            if reservation is None and self._quotas is not None:
                try:
                    reservation = await self._reserve(principal, request_id, prompt_tokens, request, response_headers)
                except BaseException:
                    # Refused (or the caller left): release identical requests waiting on this one in the cache.
                    await self._finish(principal, route, request, None, 0, lookup, None)
                    raise
            chunks: list[str] = []
            # Until the final usage arrives: about one token per delta or tool call (exactly one per logprob).
            generated = 0
            answer: CachedAnswer | None = None
            # Only one choice's plain text is an answer for the cache (cacheable() keeps the others away from it).
            text_only = True
            used_tokens = 0
            events = self._router.generate(request_id, principal.tier, request, prepared)
            generating_since = clock()
            first = True
            try:
                async for event in events:
                    if first:
                        stage("first_event", clock() - generating_since)
                        first = False
                    if event.delta:
                        chunks.append(event.delta)
                    if event.delta or event.tool_calls:
                        generated += max(len(event.logprobs), 1)
                        used_tokens = prompt_tokens + generated
                    text_only = text_only and not (event.index or event.tool_calls or event.logprobs)
                    if event.usage is not None:
                        used_tokens = event.usage.total_tokens
                        # The router's final event. Only an answer that ended by itself (a stop, or max_tokens) is an
                        # answer to cache; one cut short (cancelled, failed) never is.
                        if event.finish_reason in FINISHED and text_only:
                            answer = CachedAnswer(tuple(chunks), event.finish_reason, event.usage)
                    yield event
            finally:
                try:
                    await events.aclose()  # type: ignore[attr-defined]
                finally:
                    await self._finish(principal, route, request, reservation, used_tokens, lookup, answer)

    async def _reserve(
        self,
        principal: Principal,
        request_id: str,
        prompt_tokens: int,
        request: ChatRequest,
        response_headers: list[tuple[str, str]] | None,
    ) -> Reservation:
        assert self._quotas is not None
        started = self._clock()
        max_tokens = completion_budget(request)
        try:
            reservation = await self._quotas.reserve(principal, request_id, prompt_tokens, max_tokens)
        except ResourceExhausted as exc:
            self._refusals.remember(principal.key_id, exc, prompt_tokens + max_tokens)
            raise
        self._observer.stage("reserve", self._clock() - started)
        if response_headers is not None:
            response_headers.extend(reservation.headers)
        return reservation

    async def _finish(
        self,
        principal: Principal,
        route: RouteInfo,
        request: ChatRequest,
        reservation: Reservation | None,
        used_tokens: int,
        lookup: CacheLookup,
        answer: CachedAnswer | None,
    ) -> None:
        """Settle the reservation, then fill (or release) the cache miss: in a task of its own that the caller's
        cancellation (a client gone, a server shutting down) does not stop, tracked for `drain`."""
        if reservation is None and not (self._cache is not None and lookup.store):
            return
        task = asyncio.ensure_future(self._settle_and_store(principal, route, request, reservation, used_tokens,
                                                            lookup, answer))  # fmt: skip
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        await asyncio.shield(task)

    async def _settle_and_store(
        self,
        principal: Principal,
        route: RouteInfo,
        request: ChatRequest,
        reservation: Reservation | None,
        used_tokens: int,
        lookup: CacheLookup,
        answer: CachedAnswer | None,
    ) -> None:
        try:
            if reservation is not None and self._quotas is not None:
                await self._quotas.settle(reservation, used_tokens)
        finally:
            if self._cache is not None and lookup.store:
                await self._cache.store(principal, route, request, lookup, answer)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        self._streams += 1
        try:
            yield
        finally:
            self._streams -= 1

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the requests still in flight to finish, settlement and cache store included
        (a stream the server cut off runs its finally a moment later, maybe in another task: its generator's
        finalizer). Returns how many did not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self._streams or self._finishing) and (left := deadline - loop.time()) > 0:
            if self._finishing:
                await asyncio.wait(set(self._finishing), timeout=min(left, 0.05))
            else:
                await asyncio.sleep(min(left, 0.05))
        return max(self._streams, len(self._finishing))

    async def complete(
        self,
        principal: Principal,
        request: ChatRequest,
        request_id: str,
        response_headers: list[tuple[str, str]] | None = None,
    ) -> Completion:
        """The whole answer: every choice's text, tool calls and logprobs, read until every choice has finished and
        the usage (of all choices, on the router's last event) has come."""
        n = max(1, request.sampling.n)
        texts: dict[int, list[str]] = {i: [] for i in range(n)}
        calls: dict[int, list[ToolCall]] = {i: [] for i in range(n)}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(n)}
        finished: dict[int, str] = {}
        route: RouteInfo | None = None
        usage: Usage | None = None
        cache = ""
        async for event in self.stream(principal, request, request_id, response_headers):
            route = event.route or route
            cache = event.cache or cache
            if event.index not in texts:
                raise Internal(f"router answered choice {event.index} of a request for {n}")
            texts[event.index].append(event.delta)
            calls[event.index].extend(event.tool_calls)
            logprobs[event.index].extend(event.logprobs)
            if event.finish_reason:
                finished[event.index] = event.finish_reason
            if event.usage is not None:
                usage = event.usage
            if usage is not None and len(finished) == n:
                # The answer is whole: reply now; settlement and cache store finish behind it, as the stream's
                # own ending (they are shielded and tracked for drain).
                break
        if len(finished) < n:
            raise Internal("router closed the stream before the answer was complete")
        if route is None or usage is None:
            raise Internal("router ended the answer without route or usage")
        choices = tuple(
            ChoiceOutput(i, "".join(texts[i]), finished[i], tuple(calls[i]), tuple(logprobs[i])) for i in range(n)
        )
        return Completion(choices[0].text, choices[0].finish_reason, usage, route, cache, choices)

    async def list_models(self, principal: Principal) -> list[VariantInfo]:
        variants = await self._router.list_variants()
        return [v for v in variants if not v.tiers or principal.tier in v.tiers]
