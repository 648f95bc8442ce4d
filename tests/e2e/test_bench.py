"""`llmesh bench` through the real mesh (Envoy -> gateway -> cache/limiter -> router -> Triton): a short mixed
workload over three tiers (one with a wrong key), two targets side by side, then the reports and the counts."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from control import cli
from control.top import parse_metrics
from tests.fixtures.mesh import RunningMesh

REQUESTS = 10


def metric_sum(port: int, name: str, **labels: str) -> float:
    """A metric summed over the series whose labels include `labels`, scraped from a service's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        value
        for (sample, series), value in parse_metrics(text).items()
        if sample == name and labels.items() <= dict(series).items()
    )


def server_counts(mesh: RunningMesh) -> dict[str, float]:
    """What the mesh itself counted: cache hits, requests (all, OK), cost."""
    gateway, cache = mesh.settings.gateway.metrics_port, mesh.settings.cache.metrics_port
    return {
        "cache_hits": metric_sum(cache, "llmesh_cache_hits_total"),
        "requests": metric_sum(gateway, "llmesh_gateway_requests_total"),
        "ok": metric_sum(gateway, "llmesh_gateway_requests_total", code="OK"),
        "cost": metric_sum(gateway, "llmesh_gateway_cost_total"),
    }


def served_variants(mesh: RunningMesh, key: str) -> list[str]:
    reply = httpx.get(f"{mesh.http_base}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    return [m["id"] for m in reply.json()["data"] if m["id"] != "auto"]


def test_bench_mixed_workload_two_targets(
    mesh: RunningMesh, paid_key: str, free_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = tmp_path / "workload.json"
    workload.write_text(
        json.dumps(
            {
                "seed": 11,
                "max_tokens": 6,
                "mix": {"short": 1, "long": 1, "shared_prefix": 1, "repeat": 3},
                "kinds": {"long_words": 120, "shared_prefix_words": 80, "repeat_pool": 2},
                "tiers": {"paid": 3, "free": 1, "stranger": 1},
            }
        )
    )
    out = tmp_path / "out"
    before = server_counts(mesh)
    argv = ["bench", "--workload", str(workload), "--concurrency", "2", "--requests", str(REQUESTS)]
    argv += ["--target", f"first={mesh.http_base}/v1", "--target", f"again={mesh.http_base}/v1"]
    argv += ["--key", f"paid={paid_key}", "--key", f"free={free_key}", "--key", "stranger=lm-not-a-real-key"]
    argv += ["--out", str(out)]
    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "again / first" in printed and "TTFT p50" in printed and "cache hit rate" in printed
    report = json.loads((out / "bench.json").read_text())
    markdown = (out / "bench.md").read_text()
    assert "| metric | first | again | again / first |" in markdown
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    first, again = report["targets"]
    # Same seed, same workload: the same requests in the same order on both targets.
    assert [(r["index"], r["kind"], r["tier"]) for r in first["requests"]] == [
        (r["index"], r["kind"], r["tier"]) for r in again["requests"]
    ]
    assert {r["kind"] for r in first["requests"]} == {"short", "long", "shared_prefix", "repeat"}
    for target in (first, again):
        s, requests = target["summary"], target["requests"]
        assert s["requests"] == len(requests) == REQUESTS
        assert s["ok"] + sum(s["errors"].values()) == REQUESTS
        assert sum(t["requests"] for t in s["by_tier"].values()) == REQUESTS
        assert sum(k["requests"] for k in s["by_kind"].values()) == REQUESTS
        # The wrong key is refused at the gateway with 401; the real keys are served.
        strangers = [r for r in requests if r["tier"] == "stranger"]
        assert strangers and all(r["status"] == "401" and "API key" in r["error"] for r in strangers)
        assert s["errors"].get("401") == len(strangers)
        paid = [r for r in requests if r["tier"] == "paid"]
        assert paid and all(r["status"] == "ok" for r in paid)
        ok = [r for r in requests if r["status"] == "ok"]
        assert s["ok"] == len(ok) and s["completion_tokens"] == sum(r["completion_tokens"] for r in ok)
        assert all(0 < r["completion_tokens"] <= 6 and r["prompt_tokens"] > 0 and r["usage_reported"] for r in ok)
        assert all(r["ttft"] is not None and 0 < r["ttft"] <= r["e2e"] for r in ok)
        assert s["ttft"]["count"] == len(ok) and s["ttft"]["p50"] <= s["ttft"]["p99"]
        assert s["e2e"]["p50"] <= s["e2e"]["p95"] <= s["e2e"]["p99"]
        assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0
        # The mesh says, on every answer, whether its response cache served it.
        assert s["cache_known"] == len(ok) and s["cache_hit_rate"] is not None
        assert s["unpriced_variants"] == [] and s["cost"] is not None and s["cost_per_1k_tokens"] is not None
        assert set(s["by_variant"]) <= set(served_variants(mesh, paid_key))

    # The second run repeats the first's requests, so the cache answers more of them.
    assert again["summary"]["cache_hits"] > first["summary"]["cache_hits"]
    # The client's accounting agrees with the mesh's own counters: requests, successes, cache hits, and cost (the
    # bench prices variants like the gateway by default, and neither bills cache hits).
    after = server_counts(mesh)
    both = [first["summary"], again["summary"]]
    assert after["requests"] - before["requests"] == 2 * REQUESTS
    assert after["ok"] - before["ok"] == sum(s["ok"] for s in both)
    assert after["cache_hits"] - before["cache_hits"] == sum(s["cache_hits"] for s in both)
    assert after["cost"] - before["cost"] == pytest.approx(sum(s["cost"] for s in both), rel=1e-6)


def test_bench_open_loop_non_streaming(mesh: RunningMesh, paid_key: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--target", f"{mesh.http_base}/v1", "--api-key", paid_key, "--rate", "4", "--duration", "1.5"]
    argv += ["--no-stream", "--max-tokens", "4", "--seed", "3", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    [target] = report["targets"]
    s = target["summary"]
    assert s["requests"] == len(target["requests"]) >= 1
    assert s["ok"] == s["requests"] and s["errors"] == {}
    # A whole JSON body arrives at once: TTFT is the end-to-end time, there are no inter-token gaps.
    assert all(r["ttft"] == pytest.approx(r["e2e"]) and r["itl_mean"] is None for r in target["requests"])
    assert s["itl"]["count"] == 0
    assert report["load"]["rate"] == 4.0 and report["stream"] is False
    # Arrivals started within the duration.
    assert all(r["start"] < 1.5 for r in target["requests"])
