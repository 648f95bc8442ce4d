"""The response cache's core with an in-memory backend, a fake clock and a bag-of-words embedder.

The same behaviours run against real Redis in tests/integration/test_cache_redis.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from prometheus_client import CollectorRegistry

from cache_service.config import CacheSettings
from cache_service.core import Answer, AnswerCache, CacheRequest
from cache_service.metrics import CacheMetrics
from llmesh.types import ChatMessage, SamplingParams, Usage
from tests.fixtures.cache import FakeClock, MemoryBackend, WordEmbedder

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
# Bag-of-words cosine with the question below: 6 / sqrt(6 * 9) = 0.816.
PARAPHRASE = "Please tell me: what is the capital of France?"
ANSWER = Answer(("The capital", " of France", " is Paris."), "stop", Usage(12, 7))
SETTINGS = CacheSettings(ttl_s=60, semantic_threshold=0, single_flight_wait_s=5)


def req(text: str = "What is the capital of France?", key_id: str = "aaaa", **kw) -> CacheRequest:  # type: ignore[no-untyped-def]
    fields = {"key_id": key_id, "tier": "paid", "variant": "small", "sampling": GREEDY} | kw
    messages = kw.pop("messages", None) or (ChatMessage("user", text),)
    fields["messages"] = messages
    return CacheRequest(**fields)


def make(settings: CacheSettings = SETTINGS, **kw):  # type: ignore[no-untyped-def]
    backend = kw.pop("backend", None) or MemoryBackend()
    clock = kw.pop("clock", None) or FakeClock()
    registry = CollectorRegistry()
    cache = AnswerCache(backend, settings, CacheMetrics(registry), clock=clock, **kw)
    return cache, backend, clock, registry


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_store_then_exact_hit_replays_the_same_chunks() -> None:
    async def scenario() -> None:
        cache, _, _, registry = make()
        miss = await cache.lookup(req())
        assert not miss.hit and miss.store and miss.flight_token
        assert await cache.store(req(), ANSWER, miss.flight_token) == "stored"
        hit = await cache.lookup(req())
        assert hit.hit and hit.layer == "exact" and hit.answer == ANSWER
        labels = {"tier": "paid", "variant": "small"}
        assert metric(registry, "llmesh_cache_hits_total", layer="exact", **labels) == 1
        assert metric(registry, "llmesh_cache_misses_total", layer="exact", **labels) == 1
        assert metric(registry, "llmesh_cache_tokens_saved_total", kind="completion", **labels) == 7
        assert metric(registry, "llmesh_cache_tokens_saved_total", kind="prompt", **labels) == 12
        expected_cost = (
            12 * SETTINGS.price_per_million_prompt_tokens + 7 * SETTINGS.price_per_million_completion_tokens
        ) / 1e6
        assert metric(registry, "llmesh_cache_cost_saved_total", **labels) == pytest.approx(expected_cost)

    run(scenario())


def test_entries_expire_after_the_ttl() -> None:
    async def scenario() -> None:
        cache, backend, clock, _ = make()
        await cache.store(req(), ANSWER)
        clock.advance(59.9)
        assert (await cache.lookup(req())).hit
        clock.advance(0.2)
        assert not (await cache.lookup(req())).hit
        assert not any(":e:" in k for k in backend.data)  # the expired entry was deleted, not just skipped

    run(scenario())


def test_one_tenant_never_reads_anothers_entry() -> None:
    async def scenario() -> None:
        embedder = WordEmbedder()
        settings = dataclasses.replace(SETTINGS, semantic_threshold=0.5)
        cache, _, _, _ = make(settings, embedder=embedder)
        await cache.store(req(key_id="aaaa"), ANSWER)
        assert (await cache.lookup(req(key_id="aaaa"))).hit
        # Same request, other key: no exact hit, and no semantic hit either (identical text, similarity 1).
        other = await cache.lookup(req(key_id="bbbb"))
        assert not other.hit and other.outcome == "leader"

    run(scenario())


def test_public_scope_is_shared_only_where_configured() -> None:
    async def scenario() -> None:
        cache, _, _, _ = make(dataclasses.replace(SETTINGS, public_tiers="free"))
        await cache.store(req(key_id="aaaa", tier="free"), ANSWER)
        assert (await cache.lookup(req(key_id="bbbb", tier="free"))).hit
        assert not (await cache.lookup(req(key_id="bbbb", tier="paid"))).hit

    run(scenario())


def test_flush_one_tenant_keeps_the_others() -> None:
    async def scenario() -> None:
        cache, _, _, _ = make()
        for key_id in ("aaaa", "bbbb"):
            await cache.store(req(key_id=key_id), ANSWER)
        assert await cache.flush("aaaa") == 1
        assert not (await cache.lookup(req(key_id="aaaa"))).hit
        assert (await cache.lookup(req(key_id="bbbb"))).hit
        await cache.flush()
        assert not (await cache.lookup(req(key_id="bbbb"))).hit

    run(scenario())


def test_sampled_requests_bypass_the_cache_unless_configured() -> None:
    async def scenario() -> None:
        sampled = req(sampling=SamplingParams(max_tokens=16, temperature=0.8))
        cache, backend, _, registry = make()
        result = await cache.lookup(sampled)
        assert result.outcome == "bypass" and not result.store
        assert await cache.store(sampled, ANSWER) == "skipped"
        assert backend.calls == 0
        assert metric(registry, "llmesh_cache_bypassed_total", reason="not_deterministic") == 1

        cache, _, _, _ = make(dataclasses.replace(SETTINGS, cache_sampled=True))
        await cache.store(sampled, ANSWER)
        assert (await cache.lookup(sampled)).hit

    run(scenario())


def test_unfinished_or_oversized_answers_are_not_stored() -> None:
    async def scenario() -> None:
        cache, _, _, _ = make(dataclasses.replace(SETTINGS, max_entry_bytes=300))
        assert await cache.store(req(), Answer(("a",), "cancelled", Usage(1, 1))) == "released"
        assert await cache.store(req(), Answer(("x" * 400,), "stop", Usage(1, 1))) == "skipped"
        assert not (await cache.lookup(req())).hit

    run(scenario())


def test_memory_bound_evicts_least_recently_used() -> None:
    async def scenario() -> None:
        probe, probe_backend, _, _ = make()
        await probe.store(req("question 0"), ANSWER)
        limit = 4 * probe_backend.total_bytes + 10  # room for four entries of this size
        cache, backend, clock, registry = make(dataclasses.replace(SETTINGS, max_bytes=limit))
        for i in range(3):
            await cache.store(req(f"question {i}"), ANSWER)
            clock.advance(1)
        assert (await cache.lookup(req("question 0"))).hit  # now the most recently used
        clock.advance(1)
        for i in range(3, 6):
            await cache.store(req(f"question {i}"), ANSWER)
            clock.advance(1)
        assert backend.total_bytes <= limit
        assert metric(registry, "llmesh_cache_evictions_total") == 2
        assert (await cache.lookup(req("question 0"))).hit
        assert not (await cache.lookup(req("question 1"))).hit

    run(scenario())


def test_single_flight_identical_concurrent_misses_generate_once() -> None:
    async def scenario() -> None:
        cache, _, _, registry = make(monotonic=time.monotonic)
        cache.start()
        generations = 0

        async def client() -> tuple[str, Answer]:
            nonlocal generations
            result = await cache.lookup(req())
            if result.hit:
                assert result.answer is not None
                return result.outcome, result.answer
            generations += 1
            await asyncio.sleep(0.2)  # generating
            await cache.store(req(), ANSWER, result.flight_token)
            return result.outcome, ANSWER

        results = await asyncio.gather(*(client() for _ in range(8)))
        await cache.close()
        assert generations == 1
        assert sorted(o for o, _ in results) == ["leader"] + ["waited"] * 7
        assert all(a == ANSWER for _, a in results)
        assert metric(registry, "llmesh_cache_single_flight_total", outcome="served") == 7

    run(scenario())


def test_waiters_fall_through_at_once_when_the_leader_fails() -> None:
    async def scenario() -> None:
        cache, _, _, registry = make(monotonic=time.monotonic)
        cache.start()
        leader = await cache.lookup(req())
        waiter = asyncio.create_task(cache.lookup(req()))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await cache.store(req(), None, leader.flight_token)  # generation failed
        result = await waiter
        await cache.close()
        assert result.outcome == "fell_through" and result.store and not result.hit
        assert time.monotonic() - started < 1.0  # released by the notification, not by the 5 s bound
        assert metric(registry, "llmesh_cache_single_flight_total", outcome="fell_through") == 1

    run(scenario())


def test_waiting_is_bounded_when_the_leader_hangs() -> None:
    async def scenario() -> None:
        cache, _, _, _ = make(monotonic=time.monotonic)
        cache.start()
        await cache.lookup(req())  # leader that never stores
        started = time.monotonic()
        result = await cache.lookup(req(), max_wait_s=0.3)
        await cache.close()
        assert result.outcome == "fell_through" and result.store
        assert 0.3 <= time.monotonic() - started < 2.0

    run(scenario())


def test_asked_not_to_wait_a_lookup_says_in_flight_at_once() -> None:
    """The gateway asks this way, reserves quota, then asks again and waits (gateway/pipeline.py)."""

    async def scenario() -> None:
        cache, _, _, _ = make(monotonic=time.monotonic)
        cache.start()
        leader = await cache.lookup(req(), wait_for_leader=False)
        assert leader.outcome == "leader" and leader.flight_token, "no one in flight: this one leads"
        started = time.monotonic()
        asked = await cache.lookup(req(), wait_for_leader=False)
        assert asked.in_flight and not asked.store and not asked.hit and not asked.flight_token
        assert time.monotonic() - started < 0.2
        waiter = asyncio.create_task(cache.lookup(req()))
        await asyncio.sleep(0.05)
        await cache.store(req(), ANSWER, leader.flight_token)
        assert (await waiter).outcome == "waited"
        done = await cache.lookup(req(), wait_for_leader=False)
        await cache.close()
        assert done.hit and not done.in_flight

    run(scenario())


def test_a_truncated_or_cancelled_answer_is_not_stored() -> None:
    async def scenario() -> None:
        cache, _, _, _ = make(monotonic=time.monotonic)
        leader = await cache.lookup(req())
        for reason in ("cancelled", "error", ""):
            cut = Answer(ANSWER.chunks, reason, ANSWER.usage)
            assert await cache.store(req(), cut, leader.flight_token) == "released"
            # Not stored, and the lock is free again: the next identical request leads, at once.
            leader = await cache.lookup(req(), wait_for_leader=False)
            assert not leader.hit and leader.outcome == "leader"
        assert await cache.store(req(), Answer(ANSWER.chunks, "length", ANSWER.usage), leader.flight_token) == "stored"
        assert (await cache.lookup(req())).hit

    run(scenario())


def test_backend_down_bypasses_without_touching_it_until_the_cooldown() -> None:
    async def scenario() -> None:
        monotonic = FakeClock(0.0)
        cache, backend, _, registry = make(monotonic=monotonic)
        await cache.store(req(), ANSWER)
        backend.down = True
        first = await cache.lookup(req())
        assert first.outcome == "bypass" and not first.store and not cache.backend_up
        calls = backend.calls
        for _ in range(5):
            assert (await cache.lookup(req())).outcome == "bypass"
        assert await cache.store(req(), ANSWER) == "skipped"
        assert backend.calls == calls  # the breaker is open: no call reached the dead backend
        assert metric(registry, "llmesh_cache_backend_up") == 0
        assert metric(registry, "llmesh_cache_bypassed_total", reason="backend_down") == 6

        backend.down = False
        monotonic.advance(SETTINGS.breaker_cooldown_s + 0.1)
        assert (await cache.lookup(req())).hit  # the probe succeeds and closes the breaker
        assert cache.backend_up and metric(registry, "llmesh_cache_backend_up") == 1

    run(scenario())


def test_backend_changes_are_reported_once_each_way() -> None:
    async def scenario() -> None:
        monotonic = FakeClock(0.0)
        reports: list[bool] = []
        cache, backend, _, _ = make(monotonic=monotonic, on_backend_change=reports.append)
        backend.down = True
        await cache.lookup(req())
        monotonic.advance(SETTINGS.breaker_cooldown_s)
        await cache.lookup(req())  # a failed probe: open -> half-open -> open, still down
        assert reports == [False]
        backend.down = False
        monotonic.advance(SETTINGS.breaker_cooldown_s)
        await cache.lookup(req())
        assert reports == [False, True]

    run(scenario())


def test_a_down_backend_is_probed_in_the_background_and_recovers_without_traffic() -> None:
    async def scenario() -> None:
        settings = dataclasses.replace(SETTINGS, breaker_cooldown_s=0.05)
        reports: list[bool] = []
        cache, backend, _, registry = make(settings, monotonic=time.monotonic, on_backend_change=reports.append)
        cache.start()
        backend.down = True
        assert not await cache.probe()
        assert reports == [False] and metric(registry, "llmesh_cache_backend_up") == 0
        await asyncio.sleep(0.3)
        assert not cache.backend_up
        calls = backend.calls
        assert calls >= 2, "probed again while down"
        backend.down = False
        await asyncio.sleep(0.3)
        assert cache.backend_up and reports == [False, True] and metric(registry, "llmesh_cache_backend_up") == 1
        calls = backend.calls
        await asyncio.sleep(0.2)
        assert backend.calls == calls, "no probes while the backend is up"
        await cache.close()

    run(scenario())


def test_semantic_hit_needs_the_same_bucket_and_the_threshold() -> None:
    async def scenario() -> None:
        embedder = WordEmbedder()
        cache, _, _, registry = make(dataclasses.replace(SETTINGS, semantic_threshold=0.8), embedder=embedder)
        await cache.store(req("What is the capital of France?"), ANSWER)
        hit = await cache.lookup(req(PARAPHRASE))
        assert hit.hit and hit.layer == "semantic" and hit.similarity == pytest.approx(6 / 54**0.5)
        # Similar enough (5 of 6 words: 0.83) but one word swapped: the lexical guard refuses it.
        assert not (await cache.lookup(req("What is the capital of Spain?"))).hit
        assert not (await cache.lookup(req("Who painted the Mona Lisa?"))).hit
        assert not (await cache.lookup(req(PARAPHRASE, variant="large"))).hit
        assert not (await cache.lookup(req(PARAPHRASE, key_id="bbbb"))).hit
        other_sampling = SamplingParams(max_tokens=99, temperature=0.0)
        assert not (await cache.lookup(req(PARAPHRASE, sampling=other_sampling))).hit
        multi_turn = (
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", "Hello!"),
            ChatMessage("user", PARAPHRASE),
        )
        assert not (await cache.lookup(req(messages=multi_turn))).hit
        assert metric(registry, "llmesh_cache_hits_total", layer="semantic", tier="paid", variant="small") == 1

    run(scenario())


def test_the_same_request_stored_while_it_was_embedded_is_an_exact_hit() -> None:
    # A concurrent leader finished while this lookup was embedding its question: the semantic index then holds
    # this very request, which is an exact hit, not a semantic one.
    class StoringEmbedder(WordEmbedder):
        def __init__(self) -> None:
            super().__init__()
            self.cache: AnswerCache | None = None

        async def embed(self, text: str):  # type: ignore[no-untyped-def]
            vector = await super().embed(text)
            if self.cache is not None and len(self.calls) == 1:
                await self.cache.store(req(), ANSWER)
            return vector

    async def scenario() -> None:
        embedder = StoringEmbedder()
        cache, _, _, _ = make(dataclasses.replace(SETTINGS, semantic_threshold=0.8), embedder=embedder)
        embedder.cache = cache
        hit = await cache.lookup(req())
        assert hit.hit and hit.layer == "exact" and hit.outcome == "hit_exact" and hit.answer == ANSWER

    run(scenario())


def test_semantic_neighbour_that_expired_is_not_served() -> None:
    async def scenario() -> None:
        cache, _, clock, _ = make(dataclasses.replace(SETTINGS, semantic_threshold=0.8), embedder=WordEmbedder())
        await cache.store(req("What is the capital of France?"), ANSWER)
        clock.advance(61)
        assert not (await cache.lookup(req(PARAPHRASE))).hit

    run(scenario())


def test_semantic_index_is_shared_between_replicas() -> None:
    async def scenario() -> None:
        backend, clock = MemoryBackend(), FakeClock()
        settings = dataclasses.replace(SETTINGS, semantic_threshold=0.8)
        one, _, _, _ = make(settings, backend=backend, clock=clock, embedder=WordEmbedder())
        two, _, _, _ = make(settings, backend=backend, clock=clock, embedder=WordEmbedder())
        assert not (await two.lookup(req(PARAPHRASE))).hit  # two mirrors the empty bucket
        await one.store(req("What is the capital of France?"), ANSWER)
        assert (await two.lookup(req(PARAPHRASE))).layer == "semantic"
        await one.flush("aaaa")
        assert not (await two.lookup(req(PARAPHRASE))).hit

    run(scenario())
