"""`llmesh top`: a live terminal view of the mesh from the services' Prometheus endpoints.

Every `interval` seconds it scrapes gateway, router, cache, limiter and each Triton's /metrics; rates and
percentiles come from the difference between two scrapes (counters and histogram buckets), gauges from the latest.
`parse_metrics`, `compute_view` and `render` are pure, so a frame is a function of two canned scrapes.

Where a column comes from (first source that has it):
- req/s, err %: llmesh_gateway_requests_total{variant,code} (code != OK is an error); else router decisions.
- latency p50/p95/p99: llmesh_gateway_request_duration_seconds; TTFT: llmesh_gateway_ttft_seconds, else
  llmesh_router_ttft_seconds. Percentiles interpolate within histogram buckets, like PromQL histogram_quantile.
- out tok/s: llmesh_gateway_tokens_total{direction="completion"} (cache hits generate none).
- cache hit: llmesh_cache_hits_total (all layers) / lookups (exact-layer hits + misses).
- in flight: llmesh_router_in_flight; queued: nv_inference_pending_request_count summed over Tritons.
- replicas: healthy/total from llmesh_router_replica_healthy (every replica serves every variant), else the
  number of Tritons reporting the variant.
The last row, "all", sums every variant and also counts requests refused before routing (no variant label).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from control.launcher import MeshSettings
from llmesh import paths

K = TypeVar("K")
Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_metrics(text: str) -> Samples:
    """Prometheus text format -> {(sample name, sorted labels): value}. Names stay exactly as exposed; lines that
    do not parse are skipped (a live view must not die on one odd exporter line)."""
    samples: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, _, label_text, value_text = match.group(1), match.group(2), match.group(3), match.group(4)
        labels: dict[str, str] = {}
        if label_text:
            for label in _LABEL.finditer(label_text):
                labels[label.group(1)] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], label.group(2))
        try:
            value = float(value_text)
        except ValueError:
            continue
        samples[(name, tuple(sorted(labels.items())))] = value
    return samples


@dataclass(frozen=True)
class Scrape:
    """One round of scrapes. `sources` maps a source ("gateway", "router", "cache", "limiter", "triton <url>") to its
    samples, or to None when it did not answer."""

    time: float
    sources: Mapping[str, Samples | None]

    def samples(self, prefix: str) -> list[Samples]:
        return [s for name, s in self.sources.items() if name.startswith(prefix) and s is not None]


def _series(samples: Iterable[Samples], name: str) -> Iterable[tuple[dict[str, str], float]]:
    for source in samples:
        for (sample_name, labels), value in source.items():
            if sample_name == name:
                yield dict(labels), value


def _sum_by(samples: Iterable[Samples], name: str, label: str, keep: Callable[[dict[str, str]], bool] | None = None
            ) -> dict[str, float]:  # fmt: skip
    totals: dict[str, float] = defaultdict(float)
    for labels, value in _series(samples, name):
        if keep is None or keep(labels):
            totals[labels.get(label, "")] += value
    return dict(totals)


def _delta(current: Mapping[K, float], previous: Mapping[K, float]) -> dict[K, float]:
    """Counter increase per key; a counter that went down was reset (restart), so its whole value is new."""
    out = {}
    for key, value in current.items():
        before = previous.get(key, 0.0)
        out[key] = value - before if value >= before else value
    return out


def _buckets(samples: Iterable[Samples], name: str, label: str) -> dict[str, dict[float, float]]:
    """{label value: {upper bound: cumulative count}} summed over the other labels."""
    out: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in _series(samples, name + "_bucket"):
        le = labels.get("le")
        if le is None:
            continue
        out[labels.get(label, "")][float(le)] += value
    return {k: dict(v) for k, v in out.items()}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """PromQL's histogram_quantile on cumulative bucket counts: linear within the bucket that holds the rank;
    a rank in the +Inf bucket returns the highest finite bound. None when the histogram is empty."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _histogram_delta(
    current: dict[str, dict[float, float]], previous: dict[str, dict[float, float]]
) -> dict[str, dict[float, float]]:
    return {key: _delta(buckets, previous.get(key, {})) for key, buckets in current.items()}


@dataclass(frozen=True)
class VariantRow:
    variant: str
    qps: float | None = None
    error_rate: float | None = None
    latency: tuple[float | None, float | None, float | None] = (None, None, None)  # p50, p95, p99 seconds
    ttft: tuple[float | None, float | None] = (None, None)  # p50, p95 seconds
    tokens_out_per_s: float | None = None
    cache_hit_rate: float | None = None
    in_flight: float | None = None
    queued: float | None = None
    replicas: str = ""


@dataclass(frozen=True)
class ReplicaRow:
    replica: str
    healthy: bool
    outstanding: float | None


@dataclass(frozen=True)
class TopView:
    interval_s: float
    rows: list[VariantRow]
    replicas: list[ReplicaRow]
    # Source -> answered.
    sources: dict[str, bool]
    notes: list[str] = field(default_factory=list)


def _percentiles(current: Scrape, previous: Scrape, prefix: str, name: str) -> dict[str, dict[float, float]]:
    return _histogram_delta(
        _buckets(current.samples(prefix), name, "variant"), _buckets(previous.samples(prefix), name, "variant")
    )


def _rate(current: Scrape, previous: Scrape, prefix: str, name: str, label: str, dt: float,
          keep: Callable[[dict[str, str]], bool] | None = None) -> dict[str, float]:  # fmt: skip
    now = _sum_by(current.samples(prefix), name, label, keep)
    before = _sum_by(previous.samples(prefix), name, label, keep)
    return {k: v / dt for k, v in _delta(now, before).items()}


OUT_DIRECTIONS = ("completion", "out", "output")
ALL = "all"


def _merged(histograms: Mapping[str, Mapping[float, float]]) -> dict[float, float]:
    total: dict[float, float] = defaultdict(float)
    for buckets in histograms.values():
        for bound, count in buckets.items():
            total[bound] += count
    return dict(total)


def compute_view(previous: Scrape, current: Scrape) -> TopView:
    dt = current.time - previous.time
    if dt <= 0:
        raise ValueError("the two scrapes must be in time order")
    notes: list[str] = []

    gateway_qps = _rate(current, previous, "gateway", "llmesh_gateway_requests_total", "variant", dt)
    gateway_errors = _rate(
        current, previous, "gateway", "llmesh_gateway_requests_total", "variant", dt,
        keep=lambda labels: labels.get("code", "OK") != "OK",
    )  # fmt: skip
    router_qps = _rate(current, previous, "router", "llmesh_router_decisions_total", "variant", dt)
    qps = gateway_qps or router_qps
    if not gateway_qps and router_qps:
        notes.append("req/s from router decisions (no gateway metrics)")

    latency = _percentiles(current, previous, "gateway", "llmesh_gateway_request_duration_seconds")
    ttft = _percentiles(current, previous, "gateway", "llmesh_gateway_ttft_seconds")
    if not any(b for b in ttft.values()):
        ttft = _percentiles(current, previous, "router", "llmesh_router_ttft_seconds")
    tokens_out = _rate(
        current, previous, "gateway", "llmesh_gateway_tokens_total", "variant", dt,
        keep=lambda labels: labels.get("direction", "") in OUT_DIRECTIONS,
    )  # fmt: skip

    hits = _rate(current, previous, "cache", "llmesh_cache_hits_total", "variant", dt)
    exact = lambda labels: labels.get("layer", "exact") == "exact"  # noqa: E731
    lookups = _rate(current, previous, "cache", "llmesh_cache_hits_total", "variant", dt, keep=exact)
    for variant, misses in _rate(current, previous, "cache", "llmesh_cache_misses_total", "variant", dt, exact).items():
        lookups[variant] = lookups.get(variant, 0.0) + misses

    in_flight = _sum_by(current.samples("router"), "llmesh_router_in_flight", "variant")
    queued = _sum_by(current.samples("triton"), "nv_inference_pending_request_count", "model")

    healthy = {labels.get("replica", ""): v for labels, v in _series(current.samples("router"),
                                                                       "llmesh_router_replica_healthy")}  # fmt: skip
    outstanding = {
        labels.get("replica", ""): v
        for labels, v in _series(current.samples("router"), "llmesh_router_replica_outstanding")
    }
    triton_models: dict[str, int] = defaultdict(int)
    for samples in current.samples("triton"):
        for model in {dict(labels).get("model", "") for (name, labels) in samples if name.startswith("nv_inference")}:
            if model:
                triton_models[model] += 1
    replicas_text = f"{sum(1 for v in healthy.values() if v >= 1)}/{len(healthy)}" if healthy else ""

    variants = sorted(
        (set(qps) | set(latency) | set(ttft) | set(tokens_out) | set(hits) | set(lookups) | set(in_flight)
         | set(queued)) - {""}
    )  # fmt: skip
    rows = []
    for v in variants:
        requests = qps.get(v)
        row_latency = latency.get(v, {})
        row_ttft = ttft.get(v, {})
        rows.append(
            VariantRow(
                variant=v,
                qps=requests,
                error_rate=(gateway_errors.get(v, 0.0) / requests) if gateway_qps and requests else None,
                latency=(
                    histogram_quantile(0.5, row_latency),
                    histogram_quantile(0.95, row_latency),
                    histogram_quantile(0.99, row_latency),
                ),
                ttft=(histogram_quantile(0.5, row_ttft), histogram_quantile(0.95, row_ttft)),
                tokens_out_per_s=tokens_out.get(v),
                cache_hit_rate=hits.get(v, 0.0) / lookups[v] if lookups.get(v) else None,
                in_flight=in_flight.get(v),
                queued=queued.get(v),
                replicas=replicas_text or (str(triton_models[v]) if v in triton_models else ""),
            )
        )
    if rows or qps:
        # Requests refused before routing (auth, quota) have no variant: they show up here only.
        total_qps = sum(qps.values())
        all_latency, all_ttft = _merged(latency), _merged(ttft)
        total_lookups = sum(lookups.values())
        rows.append(
            VariantRow(
                variant=ALL,
                qps=total_qps if qps else None,
                error_rate=sum(gateway_errors.values()) / total_qps if gateway_qps and total_qps else None,
                latency=(
                    histogram_quantile(0.5, all_latency),
                    histogram_quantile(0.95, all_latency),
                    histogram_quantile(0.99, all_latency),
                ),
                ttft=(histogram_quantile(0.5, all_ttft), histogram_quantile(0.95, all_ttft)),
                tokens_out_per_s=sum(tokens_out.values()) if tokens_out else None,
                cache_hit_rate=sum(hits.values()) / total_lookups if total_lookups else None,
                in_flight=sum(in_flight.values()) if in_flight else None,
                queued=sum(queued.values()) if queued else None,
                replicas=replicas_text or (str(len(current.samples("triton"))) if triton_models else ""),
            )
        )
    replicas = [ReplicaRow(name, healthy[name] >= 1, outstanding.get(name)) for name in sorted(healthy)]
    return TopView(dt, rows, replicas, {name: s is not None for name, s in current.sources.items()}, notes)


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "ms":
        return f"{value * 1000:.0f}"
    if kind == "%":
        return f"{value * 100:.0f}%"
    if kind == "rate":
        return f"{value:.1f}"
    return f"{value:g}"


def render(view: TopView, title: str = "llmesh top") -> RenderableType:
    up = [name for name, ok in view.sources.items() if ok]
    down = [name for name, ok in view.sources.items() if not ok]
    header = Text(f"{title}  (rates over {view.interval_s:.1f} s; latencies in ms)  up: {', '.join(up) or 'none'}")
    if down:
        header.append(f"  down: {', '.join(down)}", style="red")
    table = Table(expand=False, caption=None if view.rows else "no traffic, or no metrics yet")
    for column in ("variant", "req/s", "err", "p50", "p95", "p99", "TTFT p50", "TTFT p95", "out tok/s", "cache hit",
                   "in flight", "queued", "replicas"):  # fmt: skip
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for i, r in enumerate(view.rows):
        is_total = r.variant == ALL
        table.add_row(
            r.variant,
            _fmt(r.qps, "rate"),
            _fmt(r.error_rate, "%"),
            *(_fmt(x, "ms") for x in r.latency),
            *(_fmt(x, "ms") for x in r.ttft),
            _fmt(r.tokens_out_per_s, "rate"),
            _fmt(r.cache_hit_rate, "%"),
            _fmt(r.in_flight, "n"),
            _fmt(r.queued, "n"),
            r.replicas or "-",
            style="bold" if is_total else None,
            end_section=i + 1 < len(view.rows) and view.rows[i + 1].variant == ALL,
        )
    parts: list[RenderableType] = [header, table]
    if view.replicas:
        replicas = Table(title="replicas")
        replicas.add_column("replica")
        replicas.add_column("healthy")
        replicas.add_column("outstanding", justify="right")
        for rep in view.replicas:
            replicas.add_row(rep.replica, "yes" if rep.healthy else "[red]no[/red]", _fmt(rep.outstanding, "n"))
        parts.append(replicas)
    parts += [Text(note, style="dim") for note in view.notes]
    return Group(*parts)


# --- I/O: endpoints, scraping, the live loop -------------------------------------------------------------------


def default_endpoints() -> dict[str, str]:
    """Metrics URLs matching `llmesh up`'s defaults."""
    s = MeshSettings()
    urls = {
        "gateway": f"http://127.0.0.1:{s.gateway.metrics_port}/metrics",
        "router": f"http://127.0.0.1:{s.router.metrics_port}/metrics",
        "limiter": f"http://127.0.0.1:{s.limiter.metrics_port}/metrics",
        "cache": f"http://127.0.0.1:{s.cache.metrics_port}/metrics",
    }
    for i in range(s.replicas):
        urls[f"triton {i}"] = f"http://127.0.0.1:{s.triton_metrics_port + 10 * i}/metrics"
    return urls


async def scrape(client: httpx.AsyncClient, endpoints: Mapping[str, str], clock: Callable[[], float]) -> Scrape:
    async def one(url: str) -> Samples | None:
        try:
            reply = await client.get(url)
        except httpx.HTTPError:
            return None
        return parse_metrics(reply.text) if reply.status_code == 200 else None

    when = clock()
    results = await asyncio.gather(*(one(url) for url in endpoints.values()))
    return Scrape(when, dict(zip(endpoints, results, strict=True)))


def services_note(state_dir: Path) -> str:
    """Which parts the launcher started (<state dir>/services.json) and whether their pids still run."""
    try:
        services = json.loads((state_dir / "services.json").read_text())
    except (OSError, ValueError):
        return ""
    parts = []
    for name, info in services.items():
        pid = info.get("pid") if isinstance(info, dict) else None
        alive = isinstance(pid, int) and Path(f"/proc/{pid}").exists()
        parts.append(f"{name} {'running' if alive else 'gone'}")
    return "launcher: " + ", ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = default_endpoints()
    for name in ("gateway", "router", "cache", "limiter"):
        parser.add_argument(f"--{name}", default=defaults[name], metavar="URL", help=f"default {defaults[name]}")
    parser.add_argument(
        "--triton", action="append", metavar="URL",
        help="a Triton metrics URL; repeat per replica (default " + ", ".join(
            v for k, v in defaults.items() if k.startswith("triton")) + ")",
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (default 2)")
    parser.add_argument("--once", action="store_true", help="print one frame (two scrapes, --interval apart), exit")
    parser.add_argument("--state-dir", type=Path, default=None, help="where services.json is (default: llmesh up's)")


def _endpoints(args: argparse.Namespace) -> dict[str, str]:
    endpoints = {name: getattr(args, name) for name in ("gateway", "router", "cache", "limiter")}
    tritons = args.triton or [v for k, v in default_endpoints().items() if k.startswith("triton")]
    endpoints.update({f"triton {i}": url for i, url in enumerate(tritons)})
    return endpoints


async def _frames(args: argparse.Namespace, show: Callable[[RenderableType], None], once: bool) -> None:
    endpoints = _endpoints(args)
    state_dir = args.state_dir or paths.state_dir()
    async with httpx.AsyncClient(timeout=min(args.interval, 2.0)) as client:
        previous = await scrape(client, endpoints, time.monotonic)
        while True:
            await asyncio.sleep(max(0.0, previous.time + args.interval - time.monotonic()))
            current = await scrape(client, endpoints, time.monotonic)
            view = compute_view(previous, current)
            note = services_note(state_dir)
            if note:
                view.notes.append(note)
            show(render(view))
            if once:
                return
            previous = current


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    # Piped (--once | less): no terminal width to fit, so do not squeeze the table into 80 columns.
    console = console or (Console() if Console().is_terminal else Console(width=160))
    # httpx logs every request at INFO: thousands of lines under load.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.interval <= 0:
        console.print("llmesh top: --interval must be > 0", style="red")
        return 2
    if args.once:
        asyncio.run(_frames(args, console.print, once=True))
        return 0
    try:
        with Live(console=console, refresh_per_second=4, screen=False) as live:
            asyncio.run(_frames(args, live.update, once=False))
    except KeyboardInterrupt:
        pass
    return 0
