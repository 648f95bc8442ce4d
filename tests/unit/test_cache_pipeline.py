"""The gateway pipeline's side of the cache contract: hit flags on replayed events, waiters released on refusal."""

from __future__ import annotations

import asyncio

import pytest

from gateway.pipeline import CachedAnswer
from llmesh.errors import ResourceExhausted
from llmesh.types import Usage
from tests.unit.test_pipeline import PRINCIPAL, REQUEST, FakeCache, FakeQuotas, FakeRouter, collect, pipeline


def test_replayed_events_carry_the_cache_layer() -> None:
    cache = FakeCache(CachedAnswer(("Hel", "lo"), "stop", Usage(7, 2), layer="semantic"))
    events = asyncio.run(collect(pipeline(FakeRouter(["x"]), FakeQuotas(), cache)))
    assert [e.cache for e in events] == ["semantic"] * 4
    done = asyncio.run(pipeline(FakeRouter(["x"]), FakeQuotas(), cache).complete(PRINCIPAL, REQUEST, "r1"))
    assert done.cache == "semantic" and done.text == "Hello"


def test_generated_events_carry_no_cache_flag() -> None:
    events = asyncio.run(collect(pipeline(FakeRouter(["a", "b"]), FakeQuotas(), FakeCache())))
    assert all(e.cache == "" for e in events)


def test_a_refused_miss_releases_its_single_flight_waiters() -> None:
    cache = FakeCache()
    with pytest.raises(ResourceExhausted):
        asyncio.run(collect(pipeline(FakeRouter(["x"]), FakeQuotas(refuse=True), cache)))
    assert cache.stored == [None]
