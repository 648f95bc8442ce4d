"""The response cache: exact layer, semantic layer, single flight, tenant scopes, bypass on backend failure.

No gRPC here: server.py translates protobufs to these types. The backend (Redis in production), the embedder,
the clocks and the metrics are passed in.

Lookup, for a deterministic request:
1. exact: the normalized key (keys.py) in the request's scope;
2. semantic (single-turn requests, when enabled): the nearest cached question of the same bucket, if its cosine
   similarity reaches the threshold;
3. single flight: atomically re-check the exact entry and take the key's lock. The first request takes it and
   generates (`flight_token` in the result); identical requests arriving meanwhile wait, bounded, for its answer,
   and generate themselves if the leader fails or takes too long. A caller may ask not to wait
   (`wait_for_leader=False`: the answer is `in_flight`), take its quota reservation, and then look up again,
   waiting: so a waiter holds a concurrency slot of its key like any stream (gateway/pipeline.py).
Any backend failure opens the circuit breaker (llmesh/breaker.py): the cache answers "miss, don't store" without
touching Redis until the cooldown passes, so an outage costs at most one short timeout per cooldown, and no request
fails because of the cache. After each cooldown the first request is the probe; while the circuit is open a
background task probes too (`start()`), so the cache, its metric and its health recover without traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cache_service.config import CacheSettings
from cache_service.embedding import Embedder
from cache_service.keys import (
    PUBLIC_SCOPE,
    RedisKeys,
    ScopePolicy,
    bucket_key,
    exact_digest,
    is_deterministic,
    scope_prefix,
    semantic_query,
    tenant_scope,
)
from cache_service.metrics import CacheMetrics
from cache_service.semantic import SemanticIndex
from cache_service.store import BackendError, CacheBackend, RedisBackend
from llmesh.breaker import BreakerState, CircuitBreaker
from llmesh.types import ChatMessage, OutputSpec, SamplingParams, Usage

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# Waiters re-check this often even without a release message (e.g. while pub/sub reconnects).
WAIT_POLL_S = 0.25
# The background probe waits at least this long between probes, also with a cooldown of 0.
MIN_PROBE_INTERVAL_S = 0.1
FINISHED = ("stop", "length")


@dataclass(frozen=True)
class CacheRequest:
    key_id: str
    tier: str
    variant: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    output: OutputSpec = field(default_factory=OutputSpec)
    prompt: str = ""  # a raw completion prompt (messages are then empty)


@dataclass(frozen=True)
class Answer:
    chunks: tuple[str, ...]
    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class LookupResult:
    answer: Answer | None = None
    # "exact" or "semantic" on a hit.
    layer: str = ""
    similarity: float = 0.0
    # On a miss: whether the caller should store its answer afterwards, and the single-flight lock it holds.
    store: bool = False
    flight_token: str = ""
    # Asked with wait_for_leader=False: an identical request holds the single-flight lock; nothing to store.
    in_flight: bool = False
    # For metrics and logs: hit_exact, hit_semantic, waited, miss, leader, fell_through, in_flight, bypass.
    outcome: str = "miss"

    @property
    def hit(self) -> bool:
        return self.answer is not None


def encode_entry(answer: Answer, variant: str, stored_ms: int, expires_ms: int) -> bytes:
    return json.dumps(
        {
            "chunks": list(answer.chunks),
            "finish_reason": answer.finish_reason,
            "usage": [answer.usage.prompt_tokens, answer.usage.completion_tokens],
            "variant": variant,
            "stored_ms": stored_ms,
            "expires_ms": expires_ms,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8", "surrogatepass")


def decode_entry(value: bytes) -> tuple[Answer, int] | None:
    """(answer, expires_ms), or None for anything unreadable (treated as absent)."""
    try:
        data = json.loads(value.decode("utf-8", "surrogatepass"))
        chunks = tuple(str(c) for c in data["chunks"])
        prompt, completion = (int(n) for n in data["usage"])
        return Answer(chunks, str(data["finish_reason"]), Usage(prompt, completion)), int(data["expires_ms"])
    except (ValueError, KeyError, TypeError):
        return None


class AnswerCache:
    """The cache service's core: answers by exact key or semantic neighbour, single flight, bypass while Redis is down.

    `on_backend_change(up)` is called whenever the backend goes down (circuit no longer closed) or comes back; the
    server sets the service's health from it.
    """

    def __init__(
        self,
        backend: CacheBackend,
        settings: CacheSettings,
        metrics: CacheMetrics | None = None,
        embedder: Embedder | None = None,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        on_backend_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        self._embedder = embedder if settings.semantic_threshold > 0 else None
        self._clock = clock
        self._monotonic = monotonic
        self._policy = ScopePolicy.from_lists(settings.public_key_ids, settings.public_tiers)
        self._on_backend_change = on_backend_change
        # Set while the circuit is not closed: wakes the background probe, which waits otherwise.
        self._backend_down = asyncio.Event()
        self._breaker = CircuitBreaker(settings.breaker_cooldown_s, clock=monotonic, on_change=self._breaker_changed)
        self._index = SemanticIndex(backend, settings.semantic_max_entries)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def semantic_enabled(self) -> bool:
        return self._embedder is not None

    @property
    def backend_up(self) -> bool:
        return self._breaker.closed

    def start(self) -> None:
        """Start the background tasks, inside the running loop: the probe of a down backend, and (with single
        flight) the listener of releases from every replica. `close()` ends them."""
        if self._tasks:
            return
        self._tasks.append(asyncio.create_task(self._probe_while_down()))
        if self._settings.single_flight:
            self._tasks.append(asyncio.create_task(self._backend.listen(self._on_released)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # ---- helpers

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _ttl_ms(self) -> int:
        return max(1, int(self._settings.ttl_s * 1000))

    def _scope(self, request: CacheRequest) -> str:
        return self._policy.scope_for(request.key_id, request.tier)

    def _backend_failed(self, op: str, exc: BackendError) -> None:
        if self._metrics:
            self._metrics.backend_errors.labels(op).inc()
        self._breaker.record_failure(f"{op}: {exc}")

    def _backend_ok(self) -> None:
        self._breaker.record_success()

    def _breaker_changed(self, state: BreakerState, reason: str) -> None:
        """The breaker's on_change: the one place that logs, counts and reports the backend going down and back."""
        up, was_up = state is BreakerState.CLOSED, not self._backend_down.is_set()
        if up == was_up:  # open <-> half-open: a probe went out or failed; still bypassed
            log.debug("cache backend circuit %s: %s", state.value, reason)
            return
        if up:
            log.info("cache backend answers again")
            self._backend_down.clear()
        else:
            log.warning("cache backend failed (%s); bypassing the cache, probing every %.1fs", reason,
                        self._settings.breaker_cooldown_s)  # fmt: skip
            self._backend_down.set()
        if self._metrics:
            self._metrics.backend_up.set(1 if up else 0)
        if self._on_backend_change is not None:
            self._on_backend_change(up)

    async def _probe_while_down(self) -> None:
        """While the circuit is open, probe the backend once per cooldown (unless a request took the probe), so the
        cache recovers without traffic. Idle while the backend is up."""
        interval_s = max(self._settings.breaker_cooldown_s, MIN_PROBE_INTERVAL_S)
        while True:
            await self._backend_down.wait()
            await asyncio.sleep(interval_s)
            if self._breaker.closed or not self._breaker.allow():
                continue  # a request's probe closed it meanwhile, or is still out
            await self.probe()

    async def probe(self) -> bool:
        """Ping the backend now and record the outcome (the circuit closes or opens). True if it answered."""
        try:
            await self._backend.ping()
        except BackendError as exc:
            self._backend_failed("probe", exc)
            return False
        self._backend_ok()
        return True

    def _on_released(self, entry: str) -> None:
        for event in self._waiters.get(entry, ()):
            event.set()

    async def _read(self, entry: str) -> Answer | None:
        """The live answer stored under `entry`; an expired or unreadable one is deleted and counts as absent."""
        value = await self._backend.get(entry, self._now_ms())
        return await self._decode_live(entry, value)

    async def _decode_live(self, entry: str, value: bytes | None) -> Answer | None:
        if value is None:
            return None
        decoded = decode_entry(value)
        if decoded is None or decoded[1] <= self._now_ms():
            await self._backend.delete(entry)
            return None
        return decoded[0]

    # ---- lookup

    async def lookup(
        self, request: CacheRequest, max_wait_s: float | None = None, wait_for_leader: bool = True
    ) -> LookupResult:
        started = time.perf_counter()
        result = await self._lookup(request, max_wait_s, wait_for_leader)
        if self._metrics:
            self._metrics.lookup_seconds.labels(result.outcome).observe(time.perf_counter() - started)
        return result

    async def _lookup(self, request: CacheRequest, max_wait_s: float | None, wait_for_leader: bool) -> LookupResult:
        metrics = self._metrics
        if not (is_deterministic(request.sampling) or self._settings.cache_sampled):
            if metrics:
                metrics.bypassed.labels("not_deterministic").inc()
            return LookupResult(outcome="bypass")
        if not self._breaker.allow():
            if metrics:
                metrics.bypassed.labels("backend_down").inc()
            return LookupResult(outcome="bypass")
        try:
            result = await self._lookup_layers(request, max_wait_s, wait_for_leader)
        except BackendError as exc:
            self._backend_failed("lookup", exc)
            if metrics:
                metrics.bypassed.labels("backend_down").inc()
            return LookupResult(outcome="bypass")
        self._backend_ok()
        if metrics:
            labels = (request.tier, request.variant)
            if result.hit:
                metrics.hits.labels(result.layer, *labels).inc()
                usage = result.answer.usage  # type: ignore[union-attr]
                metrics.tokens_saved.labels("prompt", *labels).inc(usage.prompt_tokens)
                metrics.tokens_saved.labels("completion", *labels).inc(usage.completion_tokens)
                cost = (
                    usage.prompt_tokens * self._settings.price_per_million_prompt_tokens
                    + usage.completion_tokens * self._settings.price_per_million_completion_tokens
                ) / 1e6
                metrics.cost_saved.labels(*labels).inc(cost)
            if result.outcome in ("leader", "waited", "fell_through"):
                metrics.single_flight.labels("served" if result.outcome == "waited" else result.outcome).inc()
        return result

    async def _lookup_layers(
        self, request: CacheRequest, max_wait_s: float | None, wait_for_leader: bool
    ) -> LookupResult:
        scope = self._scope(request)
        digest = exact_digest(
            scope, request.variant, request.messages, request.sampling, request.output, request.prompt
        )
        keys = RedisKeys.for_digest(scope, digest)
        labels = (request.tier, request.variant)

        answer = await self._read(keys.entry)
        if answer is not None:
            return LookupResult(answer, "exact", 1.0, outcome="hit_exact")
        if self._metrics:
            self._metrics.misses.labels("exact", *labels).inc()

        semantic = await self._semantic_lookup(scope, request, digest)
        if semantic is not None:
            return semantic

        if not self._settings.single_flight:
            return LookupResult(store=True, outcome="miss")
        token = uuid.uuid4().hex
        lease_ms = int(self._settings.single_flight_lease_s * 1000)
        for _ in range(2):
            value, taken = await self._backend.get_or_lock(keys.entry, keys.lock, token, lease_ms)
            if taken:
                return LookupResult(store=True, flight_token=token, outcome="leader")
            answer = await self._decode_live(keys.entry, value)
            if answer is not None:
                return LookupResult(answer, "exact", 1.0, outcome="hit_exact")
            if value is None:
                break
            # The entry had just expired and is deleted now: try once more to take the lock.
        if not wait_for_leader:
            return LookupResult(in_flight=True, outcome="in_flight")
        wait_s = (
            self._settings.single_flight_wait_s
            if max_wait_s is None
            else min(max_wait_s, self._settings.single_flight_wait_s)
        )
        answer = await self._wait_for_leader(keys, wait_s)
        if answer is not None:
            return LookupResult(answer, "exact", 1.0, outcome="waited")
        return LookupResult(store=True, outcome="fell_through")

    async def _semantic_lookup(self, scope: str, request: CacheRequest, digest: str) -> LookupResult | None:
        if self._embedder is None:
            return None
        query = semantic_query(
            scope, request.variant, request.messages, request.sampling, request.output, request.prompt
        )
        if query is None or len(query.text) > self._settings.semantic_max_chars:
            return None
        try:
            vector = await self._embedder.embed(query.text)
        except Exception as exc:  # the embedder is an optimization: its failure must never fail the request
            log.warning("embedding failed, semantic layer skipped: %s", exc)
            return None
        neighbours = await self._index.search(
            bucket_key(scope, query.bucket), vector, query.text, self._settings.semantic_threshold
        )
        for neighbour in neighbours:
            answer = await self._read(RedisKeys.for_digest(scope, neighbour.digest).entry)
            if answer is not None and neighbour.digest == digest:
                # This very request was stored while we embedded it (a concurrent leader finished): exact.
                return LookupResult(answer, "exact", 1.0, outcome="hit_exact")
            if answer is not None:
                return LookupResult(answer, "semantic", neighbour.similarity, outcome="hit_semantic")
        if self._metrics:
            self._metrics.misses.labels("semantic", request.tier, request.variant).inc()
        return None

    async def _wait_for_leader(self, keys: RedisKeys, wait_s: float) -> Answer | None:
        """The leader's answer, or None if it released without one, vanished, or took longer than `wait_s`."""
        deadline = self._monotonic() + wait_s
        event = asyncio.Event()
        self._waiters.setdefault(keys.entry, set()).add(event)
        try:
            while True:
                answer = await self._read(keys.entry)
                if answer is not None:
                    return answer
                if not await self._backend.exists(keys.lock):
                    return None
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    return None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, WAIT_POLL_S))
                event.clear()
        finally:
            waiters = self._waiters.get(keys.entry)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[keys.entry]

    # ---- store

    async def store(self, request: CacheRequest, answer: Answer | None, flight_token: str = "") -> str:
        """Keep a finished answer (None: generation failed; only release waiters). Returns the result label."""
        result = await self._store(request, answer, flight_token)
        if self._metrics:
            self._metrics.stores.labels(result).inc()
        return result

    async def _store(self, request: CacheRequest, answer: Answer | None, flight_token: str) -> str:
        if not (is_deterministic(request.sampling) or self._settings.cache_sampled):
            return "skipped"
        if not self._breaker.allow():
            return "skipped"
        scope = self._scope(request)
        digest = exact_digest(
            scope, request.variant, request.messages, request.sampling, request.output, request.prompt
        )
        keys = RedisKeys.for_digest(scope, digest)
        result = "released"
        try:
            if answer is not None and answer.finish_reason in FINISHED:
                now_ms = self._now_ms()
                value = encode_entry(answer, request.variant, now_ms, now_ms + self._ttl_ms())
                if len(value) > self._settings.max_entry_bytes:
                    result = "skipped"
                else:
                    evicted = await self._backend.put(
                        keys.entry, value, self._ttl_ms(), now_ms, self._settings.max_bytes
                    )
                    if self._metrics and evicted:
                        self._metrics.evictions.inc(evicted)
                    result = "stored"
            # Always tell waiters, also when this request was not the leader: they re-check and may be served.
            await self._backend.release(keys.lock, flight_token, keys.entry)
            if result == "stored":
                await self._semantic_add(scope, request, digest)
        except BackendError as exc:
            self._backend_failed("store", exc)
            return "failed"
        self._backend_ok()
        return result

    async def _semantic_add(self, scope: str, request: CacheRequest, digest: str) -> None:
        if self._embedder is None:
            return
        query = semantic_query(
            scope, request.variant, request.messages, request.sampling, request.output, request.prompt
        )
        if query is None or len(query.text) > self._settings.semantic_max_chars:
            return
        try:
            vector = await self._embedder.embed(query.text)
        except Exception as exc:  # see _semantic_lookup
            log.warning("embedding failed, answer not added to the semantic index: %s", exc)
            return
        await self._index.add(bucket_key(scope, query.bucket), digest, vector, query.text, self._ttl_ms())

    # ---- operations

    async def flush(self, key_id: str | None = None, public: bool = False) -> int:
        return await flush_scope(self._backend, key_id, public)


async def flush_scope(backend: CacheBackend, key_id: str | None = None, public: bool = False) -> int:
    """Delete one tenant's entries (by key id), the public scope's, or everything. Returns keys deleted.

    Replicas notice on their next lookup: their semantic mirrors see the bucket's generation change.
    """
    if key_id is not None:
        return await backend.flush(scope_prefix(tenant_scope(key_id)))
    if public:
        return await backend.flush(scope_prefix(PUBLIC_SCOPE))
    return await backend.flush(None)


async def flush_cache(
    redis_url: str,
    key_id: str | None = None,
    public: bool = False,
    timeout_s: float = 5.0,
    redis_options: Mapping[str, Any] | None = None,
) -> int:
    """`llmesh cache flush`: straight to the cache's Redis, so it works whether or not the service runs.
    `redis_options`: credentials (llmesh.redis_auth.RedisAuth.client_options)."""
    backend = RedisBackend.from_url(redis_url, timeout_s, **(redis_options or {}))
    try:
        return await flush_scope(backend, key_id, public)
    finally:
        await backend.close()
