"""Traffic through Envoy moves the right counters and histograms on every service; request ids travel end to end."""

from __future__ import annotations

import json
import urllib.request
import uuid

import httpx

from tests.fixtures.mesh import RunningMesh


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def chat(mesh: RunningMesh, key: str | None, content: str = "Say hi.", **extra: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update({k: str(v) for k, v in extra.pop("headers", {}).items()})  # type: ignore[attr-defined]
    payload = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{mesh.http_base}/v1/chat/completions", json=payload, headers=headers, timeout=120)


def test_metrics_move_with_labels_on_every_service(mesh: RunningMesh, paid_key: str, triton_server) -> None:  # type: ignore[no-untyped-def]
    gateway_url = f"http://127.0.0.1:{mesh.settings.gateway.metrics_port}/metrics"
    router_url = f"http://127.0.0.1:{mesh.settings.router.metrics_port}/metrics"
    envoy_url = f"http://127.0.0.1:{mesh.settings.envoy_admin_port}/stats/prometheus"
    cache_url = f"http://127.0.0.1:{mesh.settings.cache.metrics_port}/metrics"
    limiter_url = f"http://127.0.0.1:{mesh.settings.limiter.metrics_port}/metrics"
    before = {
        "gateway": scrape(gateway_url),
        "router": scrape(router_url),
        "triton": scrape(triton_server.metrics_url),
        "cache": scrape(cache_url),
        "limiter": scrape(limiter_url),
    }

    # Fresh prompts, so no answer comes from the response cache (hits cost no tokens).
    run = uuid.uuid4().hex[:8]
    prompts = ["Name a color.", "What is two plus two?", "Spell the word cat."]
    answers = [chat(mesh, paid_key, f"{prompt} ({run})") for prompt in prompts]
    assert all(a.status_code == 200 for a in answers), [(a.status_code, a.text[:300]) for a in answers]
    variant = answers[0].json()["model"]
    assert chat(mesh, None).status_code == 401
    assert chat(mesh, paid_key, max_tokens=0).status_code == 400

    gateway, router, triton = scrape(gateway_url), scrape(router_url), scrape(triton_server.metrics_url)

    def moved(now: dict, then: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
        return value(now, name, **labels) - value(then, name, **labels)

    g = before["gateway"]
    assert moved(gateway, g, "llmesh_gateway_requests_total", tier="paid", variant=variant, code="OK") == 3
    assert moved(gateway, g, "llmesh_gateway_requests_total", tier="", variant="", code="UNAUTHENTICATED") >= 1
    assert moved(gateway, g, "llmesh_gateway_requests_total", tier="paid", variant="", code="INVALID_ARGUMENT") >= 1
    assert moved(gateway, g, "llmesh_gateway_ttft_seconds_count", tier="paid", variant=variant) == 3
    assert moved(gateway, g, "llmesh_gateway_request_duration_seconds_count", tier="paid", variant=variant) == 3
    assert moved(gateway, g, "llmesh_gateway_inter_token_seconds_count", variant=variant) > 0
    completion = moved(gateway, g, "llmesh_gateway_tokens_total", tier="paid", variant=variant, direction="completion")
    generated = [a.json() for a in answers if not a.json().get("llmesh_cache")]
    assert generated, "every answer came from the cache"
    assert completion == sum(a["usage"]["completion_tokens"] for a in generated)
    assert moved(gateway, g, "llmesh_gateway_cost_total", tier="paid", variant=variant) > 0

    r = before["router"]
    decisions = sum(
        moved(router, r, "llmesh_router_decisions_total", tier="paid", variant=variant, reason=reason)
        for reason in ("default", "complexity", "load", "fallback", "pinned")
    )
    assert decisions == 3
    replica = triton_server.grpc_url
    assert moved(router, r, "llmesh_router_ttft_seconds_count", variant=variant, replica=replica) == 3
    assert value(router, "llmesh_router_replica_healthy", replica=replica) == 1.0

    t = before["triton"]
    assert (
        moved(triton, t, "nv_inference_request_success_total", model=variant, version="1") >= 3
        or moved(triton, t, "nv_inference_request_success", model=variant, version="1") >= 3
    )

    cache, limiter = scrape(cache_url), scrape(limiter_url)
    c, lim = before["cache"], before["limiter"]
    misses = total(cache, "llmesh_cache_misses_total", tier="paid") - total(c, "llmesh_cache_misses_total", tier="paid")
    assert misses >= len(generated)
    assert total(limiter, "llmesh_limiter_decisions_total", tier="paid") - total(
        lim, "llmesh_limiter_decisions_total", tier="paid"
    ) >= len(generated), "each generated answer passed the limiter"
    # The same request again is an exact cache hit, counted with its tier and variant.
    repeat = chat(mesh, paid_key, f"{prompts[0]} ({run})")
    assert repeat.json().get("llmesh_cache") == "exact"
    assert total(scrape(cache_url), "llmesh_cache_hits_total", layer="exact", tier="paid", variant=variant) > total(
        cache, "llmesh_cache_hits_total", layer="exact", tier="paid", variant=variant
    )

    envoy = urllib.request.urlopen(envoy_url, timeout=5).read().decode()
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="gateway"}' in envoy


def test_request_id_travels_through_every_hop(mesh: RunningMesh, paid_key: str, triton_server) -> None:  # type: ignore[no-untyped-def]
    reply = chat(mesh, paid_key, headers={"x-request-id": "trace-0123456789"})
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == "trace-0123456789"
    assert reply.json()["id"] == "chatcmpl-trace-0123456789"
    for service in ("gateway", "router"):
        lines = [
            json.loads(line)
            for line in (mesh.log_dir / f"{service}.log").read_text().splitlines()
            if line.startswith("{")
        ]
        assert any(entry.get("request_id") == "chatcmpl-trace-0123456789" for entry in lines), service

    fresh = chat(mesh, paid_key)
    generated = fresh.headers["x-request-id"]
    assert generated and fresh.json()["id"] == f"chatcmpl-{generated}"
