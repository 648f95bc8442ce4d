"""The mesh benchmark's pure parts: prompts, aggregation, ratios, the goal table, SSE parsing, tier fields."""

from __future__ import annotations

import math

import pytest

from benchmarks.engine.__main__ import ANCHOR
from benchmarks.mesh.analysis import (
    LLMESH,
    aggregate,
    cpu_model,
    format_goal,
    goals,
    latency_summary,
    layer_differences,
    ratios,
    salted_prompts,
)
from benchmarks.mesh.clients import content_and_usage, sse_event, tier_field
from cache_service.semantic import lexically_compatible
from llmesh.types import Tier
from llmesh.v1 import cache_pb2, router_pb2


def test_salted_prompts_are_distinct_and_never_semantic_hits_of_each_other() -> None:
    prompts = salted_prompts("ab12", 0, 20)
    assert len(set(prompts)) == 20
    assert prompts[0].startswith("Request ab12-0. ")
    assert salted_prompts("ab12", 5, 1)[0] == prompts[5]
    assert not any(lexically_compatible(a, b) for i, a in enumerate(prompts) for b in prompts[i + 1 :])


def row(rnd: int, system: str, c: int, tok_s: float, ttft: float) -> dict[str, object]:
    return {"round": rnd, "system": system, "concurrency": c, "tok_s": tok_s, "ttft_p50_ms": ttft, "note": "x"}


def test_aggregate_takes_the_median_over_rounds_per_level_and_system() -> None:
    rows = [
        row(0, LLMESH, 1, 100, 90),
        row(1, LLMESH, 1, 110, 70),
        row(2, LLMESH, 1, 200, 80),
        row(0, ANCHOR, 8, 50, 5),
    ]
    table = aggregate(rows)
    assert table["1"][LLMESH] == {"tok_s": 110, "ttft_p50_ms": 80}
    assert table["8"][ANCHOR]["tok_s"] == 50
    assert list(table) == ["1", "8"]


def test_ratios_are_llmesh_over_anchor_and_skip_missing_measures() -> None:
    assert ratios({"tok_s": 120, "ttft_p50_ms": 60}, {"tok_s": 100, "ttft_p50_ms": 50}) == {
        "tok_s": 1.2,
        "ttft_p50_ms": 1.2,
    }


def test_goals_met_missed_and_not_measured() -> None:
    table = {
        "1": {LLMESH: {"tok_s": 130.0, "ttft_p50_ms": 59.0}, ANCHOR: {"tok_s": 127.0, "ttft_p50_ms": 50.0}},
        "8": {LLMESH: {"ttft_p50_ms": 150.0}, ANCHOR: {"ttft_p50_ms": 144.0}},
    }
    verdicts = {g.measure: g.met for g in goals(table, 2.9)}
    assert verdicts == {
        "single_stream_tok_s": True,
        "ttft_p50_c1_ms": True,
        "ttft_p50_c8_ms": False,
        "cache_hit_http_p50_ms": True,
    }
    no_anchor = goals({"1": {LLMESH: {"tok_s": 1.0, "ttft_p50_ms": 1.0}}}, None)
    assert [g.met for g in no_anchor] == [None, None, None, None]
    assert "not measured" in format_goal(no_anchor[0])
    assert "MISSED" in format_goal(goals(table, 3.5)[3])
    assert goals(table, 3.5)[3].as_dict()["llmesh_then"] == 5.2


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary([0.001, 0.002, 0.003])
    assert summary["p50_ms"] == pytest.approx(2.0) and summary["mean_ms"] == pytest.approx(2.0)
    assert summary["n"] == 3
    assert math.isnan(latency_summary([])["p50_ms"])


def test_layer_differences_subtract_the_called_layer() -> None:
    p50 = {"triton direct": 40.0, "router Generate": 55.0, "gateway gRPC": 70.0, "envoy gRPC": 72.0}
    diffs = layer_differences(p50)
    assert list(diffs.values()) == [15.0, 15.0, 2.0]  # no HTTP measured: that step is left out


def test_cpu_model() -> None:
    assert cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert cpu_model("") == ""


def test_sse_parsing() -> None:
    event = sse_event('data: {"choices": [{"delta": {"content": "Hi"}}], "usage": null}')
    assert event is not None and content_and_usage(event) == ("Hi", None)
    assert content_and_usage({"choices": [], "usage": {"completion_tokens": 7}}) == ("", 7)
    assert sse_event("data: [DONE]") is None and sse_event(": keep-alive") is None and sse_event("") is None
    with pytest.raises(RuntimeError):
        sse_event('data: {"error": {"message": "boom"}}')


def test_tier_field_follows_the_stubs() -> None:
    for message in (router_pb2.GenerateRequest, router_pb2.PrepareRequest, cache_pb2.CacheKey):
        value = tier_field(message, Tier.PAID)
        assert value in ("paid", 2)
        message(tier=value)  # accepted by the message
