"""llmesh top: Prometheus text parsing, rates and percentiles from two scrapes, the rendered frame, --once."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily
from rich.console import Console

from control import cli, top
from control.process import free_port
from control.top import Scrape, compute_view, histogram_quantile, parse_metrics, render
from llmesh.metrics import LATENCY_BUCKETS

TRITON_BEFORE = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="smollm2-135m",version="1"} 10
nv_inference_request_success{model="smollm2-135m-int8",version="1"} 4
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="smollm2-135m",version="1"} 0
nv_inference_pending_request_count{model="smollm2-135m-int8",version="1"} 0
"""
TRITON_AFTER = TRITON_BEFORE.replace("} 10", "} 30").replace(
    'nv_inference_pending_request_count{model="smollm2-135m",version="1"} 0',
    'nv_inference_pending_request_count{model="smollm2-135m",version="1"} 5',
)


class Mesh:
    """Gateway, router and cache metrics under the real names, recorded through prometheus_client."""

    def __init__(self) -> None:
        self.gateway, self.router, self.cache = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
        self.requests = Counter(
            "llmesh_gateway_requests_total", "", ["tier", "variant", "code"], registry=self.gateway
        )  # fmt: skip
        self.duration = Histogram(
            "llmesh_gateway_request_duration_seconds", "", ["tier", "variant"], buckets=LATENCY_BUCKETS,
            registry=self.gateway,
        )  # fmt: skip
        self.ttft = Histogram(
            "llmesh_gateway_ttft_seconds", "", ["tier", "variant"], buckets=LATENCY_BUCKETS, registry=self.gateway
        )
        self.tokens = Counter(
            "llmesh_gateway_tokens_total", "", ["tier", "variant", "direction"], registry=self.gateway
        )  # fmt: skip
        self.decisions = Counter(
            "llmesh_router_decisions_total", "", ["tier", "variant", "reason"], registry=self.router
        )  # fmt: skip
        self.router_ttft = Histogram(
            "llmesh_router_ttft_seconds", "", ["variant", "replica"], buckets=LATENCY_BUCKETS, registry=self.router
        )
        self.in_flight = Gauge("llmesh_router_in_flight", "", ["variant"], registry=self.router)
        self.healthy = Gauge("llmesh_router_replica_healthy", "", ["replica"], registry=self.router)
        self.outstanding = Gauge("llmesh_router_replica_outstanding", "", ["replica"], registry=self.router)
        self.hits = Counter("llmesh_cache_hits_total", "", ["layer", "tier", "variant"], registry=self.cache)
        self.misses = Counter("llmesh_cache_misses_total", "", ["layer", "tier", "variant"], registry=self.cache)

    def scrape(self, when: float, triton: str | None, gateway: bool = True) -> Scrape:
        def text(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            return parse_metrics(generate_latest(registry).decode())

        return Scrape(
            when,
            {
                "gateway": text(self.gateway) if gateway else None,
                "router": text(self.router),
                "cache": text(self.cache),
                "limiter": None,
                "triton 0": parse_metrics(triton) if triton is not None else None,
            },
        )


@pytest.fixture
def mesh() -> Mesh:
    m = Mesh()
    m.requests.labels("paid", "smollm2-135m", "OK").inc(100)  # history before the first scrape
    m.healthy.labels("127.0.0.1:8001").set(1)
    m.healthy.labels("127.0.0.1:8011").set(0)
    m.outstanding.labels("127.0.0.1:8001").set(3)
    return m


def traffic(m: Mesh) -> None:
    """Over 2 s: 20 OK + 5 refused for smollm2-135m, 5 unauthenticated; 10 cache lookups, 4 hits (3 exact)."""
    m.requests.labels("paid", "smollm2-135m", "OK").inc(16)
    m.requests.labels("free", "smollm2-135m", "OK").inc(4)
    m.requests.labels("free", "smollm2-135m", "RESOURCE_EXHAUSTED").inc(5)
    m.requests.labels("free", "", "UNAUTHENTICATED").inc(5)  # refused before routing: no variant
    for _ in range(10):
        m.duration.labels("paid", "smollm2-135m").observe(0.07)  # all in the (0.05, 0.1] bucket
        m.ttft.labels("paid", "smollm2-135m").observe(0.02)  # (0.01, 0.025]
    for _ in range(10):
        m.duration.labels("free", "smollm2-135m").observe(0.3)  # (0.25, 0.5]
        m.ttft.labels("free", "smollm2-135m").observe(0.02)
    m.tokens.labels("paid", "smollm2-135m", "out").inc(300)
    m.tokens.labels("paid", "smollm2-135m", "in").inc(5000)
    m.hits.labels("exact", "paid", "smollm2-135m").inc(3)
    m.misses.labels("exact", "paid", "smollm2-135m").inc(7)
    m.hits.labels("semantic", "paid", "smollm2-135m").inc(1)
    m.misses.labels("semantic", "paid", "smollm2-135m").inc(6)
    m.in_flight.labels("smollm2-135m").set(4)
    m.decisions.labels("paid", "smollm2-135m", "default").inc(20)


def test_parse_metrics_keeps_names_labels_and_skips_junk() -> None:
    samples = parse_metrics(
        '# TYPE a counter\na_total{x="1",y="q\\"uote"} 3\nb 4.5 1700000000\nc{le="+Inf"} +Inf\nnot a metric line\n'
    )
    assert samples[("a_total", (("x", "1"), ("y", 'q"uote')))] == 3.0
    assert samples[("b", ())] == 4.5
    assert math.isinf(samples[("c", (("le", "+Inf"),))])
    assert len(samples) == 3
    # Triton's counters have no _total suffix; the name stays as exposed.
    assert ("nv_inference_request_success", (("model", "smollm2-135m"), ("version", "1"))) in parse_metrics(
        TRITON_BEFORE
    )


def test_histogram_quantile_interpolates_within_buckets() -> None:
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.5 + 0.5 * (38 - 30) / 10)
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == pytest.approx(0.1)  # rank in +Inf
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_view_from_two_scrapes(mesh: Mesh) -> None:
    before = mesh.scrape(100.0, TRITON_BEFORE)
    traffic(mesh)
    view = compute_view(before, mesh.scrape(102.0, TRITON_AFTER))
    assert view.interval_s == 2.0
    [row] = [r for r in view.rows if r.variant == "smollm2-135m"]
    assert row.qps == pytest.approx(25 / 2)  # history before the first scrape does not count
    assert row.error_rate == pytest.approx(5 / 25)
    p50, p95, p99 = row.latency
    assert p50 == pytest.approx(0.1)  # half of 20 at <= 0.1 s
    assert p95 == pytest.approx(0.25 + 0.25 * (19 - 10) / 10)
    assert p99 is not None and 0.25 < p99 <= 0.5
    assert row.ttft[0] == pytest.approx(0.01 + 0.015 * 10 / 20)
    assert row.tokens_out_per_s == pytest.approx(150.0)  # "in" tokens are not output
    assert row.cache_hit_rate == pytest.approx(4 / 10)  # all hits over exact-layer lookups
    assert (row.in_flight, row.queued) == (4.0, 5.0)
    assert row.replicas == "1/2"
    assert [(r.replica, r.healthy, r.outstanding) for r in view.replicas] == [
        ("127.0.0.1:8001", True, 3.0),
        ("127.0.0.1:8011", False, None),  # never set: unknown, not 0
    ]
    assert view.sources == {"gateway": True, "router": True, "cache": True, "limiter": False, "triton 0": True}
    # A variant only Triton knows about still gets a row.
    assert any(r.variant == "smollm2-135m-int8" and r.queued == 0.0 for r in view.rows)
    total = view.rows[-1]
    assert total.variant == "all"
    assert total.qps == pytest.approx(30 / 2)  # the unauthenticated requests count here
    assert total.error_rate == pytest.approx(10 / 30)
    assert total.latency[0] == pytest.approx(0.1) and total.tokens_out_per_s == pytest.approx(150.0)
    assert (total.in_flight, total.queued, total.cache_hit_rate) == (4.0, 5.0, pytest.approx(0.4))


def test_router_metrics_stand_in_when_the_gateway_has_none(mesh: Mesh) -> None:
    before = mesh.scrape(0.0, None, gateway=False)
    traffic(mesh)
    mesh.router_ttft.labels("smollm2-135m", "127.0.0.1:8001").observe(0.2)
    view = compute_view(before, mesh.scrape(4.0, None, gateway=False))
    row, total = view.rows
    assert (row.variant, total.variant) == ("smollm2-135m", "all")
    assert row.qps == pytest.approx(20 / 4) and total.qps == pytest.approx(20 / 4)
    assert row.error_rate is None and row.latency == (None, None, None)
    assert row.ttft[0] == pytest.approx(0.1 + 0.15 * 0.5)
    assert any("router decisions" in note for note in view.notes)


def test_a_restarted_counter_counts_from_zero(mesh: Mesh) -> None:
    before = mesh.scrape(0.0, TRITON_BEFORE)
    fresh = Mesh()  # the gateway restarted: its counters start again
    fresh.requests.labels("paid", "smollm2-135m", "OK").inc(6)
    after = Scrape(
        1.0, {**mesh.scrape(1.0, TRITON_AFTER).sources, "gateway": fresh.scrape(1.0, None).sources["gateway"]}
    )
    [row] = [r for r in compute_view(before, after).rows if r.variant == "smollm2-135m"]
    assert row.qps == pytest.approx(6.0)


def test_scrapes_must_be_in_time_order(mesh: Mesh) -> None:
    with pytest.raises(ValueError):
        compute_view(mesh.scrape(5.0, None), mesh.scrape(5.0, None))


def test_render_shows_rows_replicas_and_down_sources(mesh: Mesh) -> None:
    before = mesh.scrape(100.0, TRITON_BEFORE)
    traffic(mesh)
    console = Console(record=True, width=200)
    console.print(render(compute_view(before, mesh.scrape(102.0, TRITON_AFTER))))
    text = console.export_text()
    line = next(line for line in text.splitlines() if "smollm2-135m " in line and "12.5" in line)
    assert "20%" in line and "150.0" in line and "40%" in line and "1/2" in line
    assert "down: limiter" in text
    assert "127.0.0.1:8011" in text and "no" in text
    empty = Console(record=True, width=200)
    empty.print(render(compute_view(Scrape(0.0, {"gateway": None}), Scrape(1.0, {"gateway": None}))))
    empty_text = empty.export_text()
    assert "no traffic" in empty_text and "up: none" in empty_text


class GrowingCounter:
    """A collector whose counter grows by 6 at every scrape, so two scrapes always differ by exactly 6."""

    def __init__(self) -> None:
        self.scrapes = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        self.scrapes += 1
        family = CounterMetricFamily("llmesh_router_decisions", "", labels=["tier", "variant", "reason"])
        family.add_metric(["paid", "smollm2-135m", "default"], 6.0 * self.scrapes)
        yield family


@pytest.fixture
def live_router() -> Iterator[str]:
    registry = CollectorRegistry()
    registry.register(GrowingCounter())  # type: ignore[arg-type]
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    thread.join(timeout=5)


def test_once_prints_one_frame_from_real_endpoints(live_router: str, capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    argv = ["top", "--once", "--interval", "0.5", "--router", live_router]
    argv += ["--gateway", dead, "--cache", dead, "--limiter", dead, "--triton", dead]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "up: router" in out and "down: gateway, cache, limiter, triton 0" in out
    row = next(line for line in out.splitlines() if "smollm2-135m" in line)
    rate = float(row.split("│")[2])
    assert 6 / 1.5 < rate <= 6 / 0.5  # 6 decisions over the interval (0.5 s plus scrape time)
    assert top.default_endpoints()["router"].endswith(":9102/metrics")
