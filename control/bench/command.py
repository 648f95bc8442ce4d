"""`llmesh bench`: flags, then each target in turn with the same workload and seed, then the reports."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from control.bench.client import ChatClient, Target, http_client
from control.bench.load import LoadPlan, run_load
from control.bench.report import TargetRun, terminal_table, write_reports
from control.bench.stats import summarize
from control.bench.stream import RequestResult
from control.bench.workload import (
    DEFAULT_TIER,
    Price,
    WorkloadGenerator,
    WorkloadSpec,
    parse_price,
    poisson_gaps,
    spec_from_mapping,
    with_overrides,
)

DEFAULT_TARGET = "http://127.0.0.1:8080/v1"
DEFAULT_REQUESTS = 50
EXAMPLE_WORKLOAD = Path(__file__).parent / "workloads" / "mixed.toml"


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{what} must look like NAME=VALUE, got {text!r}")
    return name, value


def _target_arg(text: str) -> tuple[str, str]:
    """[NAME=]URL; the name defaults to host:port."""
    name, sep, url = text.partition("=")
    if not sep or "/" in name or ":" in name:
        url, name = text, ""
    if not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"target must be an http(s) URL (optionally NAME=URL), got {text!r}")
    return name or url.split("://", 1)[1].split("/", 1)[0], url


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_argument_group("targets")
    targets.add_argument(
        "--target", action="append", type=_target_arg, metavar="[NAME=]URL",
        help=f"OpenAI API base URL; repeat to run several targets one after another (default {DEFAULT_TARGET})",
    )  # fmt: skip
    targets.add_argument(
        "--api-key", action="append", metavar="KEY",
        help="key for every request: once for all targets, or once per --target in the same order "
        "(default: env LLMESH_KEY when no --key is given)",
    )  # fmt: skip
    targets.add_argument(
        "--key", action="append", type=lambda t: _pair(t, "--key"), metavar="TIER=KEY",
        help="a tier's key; requests are spread over the tiers by weight (targets without --api-key use them)",
    )  # fmt: skip
    targets.add_argument(
        "--tier-weight", action="append", type=lambda t: _pair(t, "--tier-weight"), metavar="TIER=WEIGHT",
        help="relative share of a tier's requests (default: the workload's [tiers], else 1)",
    )  # fmt: skip

    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--workload", type=Path, metavar="FILE",
        help=f"TOML or JSON workload (example: {EXAMPLE_WORKLOAD.name} in control/bench/workloads); flags override it",
    )  # fmt: skip
    workload.add_argument("--seed", type=int, help="same seed, same request sequence and arrivals")
    workload.add_argument("--model", help="the request's model field (default auto)")
    workload.add_argument("--max-tokens", type=_positive_int)
    workload.add_argument("--temperature", type=float)
    workload.add_argument(
        "--mix", action="append", type=lambda t: _pair(t, "--mix"), metavar="KIND=WEIGHT",
        help="replace the mix: short, long, shared_prefix, repeat",
    )  # fmt: skip
    workload.add_argument(
        "--price", action="append", type=lambda t: _pair(t, "--price"), metavar="VARIANT=USD[,USD]",
        help="USD per 1k tokens for a variant: one price, or prompt,completion (default: the gateway's prices)",
    )  # fmt: skip

    load = parser.add_argument_group("load (bounded by --requests and/or --duration)")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=_positive_int, help="requests kept in flight (default 1)")
    mode.add_argument("--rate", type=_positive_float, help="Poisson arrivals per second (open loop)")
    load.add_argument("--requests", type=_positive_int, help=f"default {DEFAULT_REQUESTS} unless --duration is given")
    load.add_argument("--duration", type=_positive_float, metavar="SECONDS", help="stop sending after this long")
    load.add_argument("--max-in-flight", type=_positive_int, default=512, help="cap for --rate (default 512)")
    load.add_argument("--no-stream", action="store_true", help="plain JSON answers (no TTFT/ITL)")
    load.add_argument("--timeout", type=_positive_float, default=300.0, help="per request, seconds (default 300)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("llmesh-bench"), help="directory for bench.json/.md/.png")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_workload_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the workload file must hold a table/object")
    return data


def mesh_prices() -> dict[str, Price]:
    """The gateway's prices (env LLMESH_GATEWAY_PRICES_PER_1K, else its default), so that by default the bench's
    cost and the mesh's llmesh_gateway_cost_total agree."""
    from gateway.config import GatewaySettings
    from gateway.metrics import parse_prices

    text = os.environ.get("LLMESH_GATEWAY_PRICES_PER_1K", GatewaySettings().prices_per_1k)
    return {variant: Price(price, price) for variant, price in parse_prices(text).items()}


def build_spec(args: argparse.Namespace) -> WorkloadSpec:
    spec = spec_from_mapping(_load_workload_file(args.workload)) if args.workload else WorkloadSpec()
    # Lowest to highest precedence: the mesh's prices, the workload file's, --price.
    prices = {**mesh_prices(), **spec.prices}
    for variant, text in args.price or []:
        prices[variant] = parse_price([float(p) for p in text.split(",")] if "," in text else float(text), variant)
    tier_weights = dict(spec.tier_weights)
    tier_weights.update({tier: float(w) for tier, w in args.tier_weight or []})
    return with_overrides(
        spec,
        seed=args.seed,
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        mix={kind: float(w) for kind, w in args.mix} if args.mix else None,
        prices=prices,
        tier_weights=tier_weights,
    )


def build_targets(args: argparse.Namespace) -> list[Target]:
    named = args.target or [("llmesh", DEFAULT_TARGET)]
    tier_keys = dict(args.key or [])
    keys = list(args.api_key or [])
    if not keys and not tier_keys and os.environ.get("LLMESH_KEY"):
        keys = [os.environ["LLMESH_KEY"]]
    if len(keys) > 1 and len(keys) != len(named):
        raise ValueError(f"{len(keys)} --api-key for {len(named)} --target: give one for all, or one per target")
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"target names must differ (use NAME=URL): {names}")
    return [
        Target(name, url, api_key=keys[i] if len(keys) > 1 else (keys[0] if keys else ""), tier_keys=tier_keys)
        for i, (name, url) in enumerate(named)
    ]


def build_plan(args: argparse.Namespace) -> LoadPlan:
    requests = args.requests if args.requests or args.duration else DEFAULT_REQUESTS
    concurrency = None if args.rate else (args.concurrency or 1)
    return LoadPlan(concurrency, args.rate, requests, args.duration, args.max_in_flight)


async def run_target(
    target: Target,
    spec: WorkloadSpec,
    tiers: Sequence[str],
    plan: LoadPlan,
    stream: bool,
    timeout_s: float,
    on_result: Callable[[RequestResult], None],
) -> TargetRun:
    pool = plan.concurrency or plan.max_in_flight
    async with http_client(pool, timeout_s) as http:
        outcome = await run_load(
            plan,
            WorkloadGenerator(spec, tiers),
            ChatClient(http, target, stream),
            gaps=poisson_gaps(plan.rate, spec.seed) if plan.rate else None,
            on_result=on_result,
        )
    summary = summarize(target.name, outcome.results, outcome.wall_s, spec.prices, outcome.delayed_arrivals)
    return TargetRun(target, outcome, summary)


def _progress_callback(progress: Progress, task: TaskID) -> Callable[[RequestResult], None]:
    errors = 0

    def advance(result: RequestResult) -> None:
        nonlocal errors
        errors += 0 if result.ok else 1
        progress.update(task, advance=1, errors=errors)

    return advance


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or (Console() if Console().is_terminal else Console(width=160))
    # httpx logs every request at INFO: thousands of lines under load.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        spec = build_spec(args)
        targets = build_targets(args)
        plan = build_plan(args)
        tiers = sorted({tier for target in targets for tier in target.tier_keys}) or [DEFAULT_TIER]
        WorkloadGenerator(spec, tiers)  # validates tier weights before any traffic
    except (ValueError, OSError, tomllib.TOMLDecodeError) as exc:
        console.print(f"llmesh bench: {exc}", style="red", markup=False, highlight=False)
        return 2
    stream = not args.no_stream
    console.print(
        f"llmesh bench: {plan.describe()}; {'streaming' if stream else 'non-streaming'}; seed {spec.seed}; "
        f"tiers {', '.join(tiers)}",
        markup=False,
        highlight=False,
    )
    runs: list[TargetRun] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=args.no_progress,
    )
    with progress:
        for target in targets:
            task = progress.add_task(target.name, total=plan.requests, errors=0)
            advance = _progress_callback(progress, task)
            runs.append(asyncio.run(run_target(target, spec, tiers, plan, stream, args.timeout, advance)))
    paths = write_reports(runs, spec, plan, stream, args.out)
    console.print(terminal_table([run.summary for run in runs]))
    for run_ in runs:
        if run_.summary.errors:
            errors_text = ", ".join(f"{kind}: {n}" for kind, n in run_.summary.errors.items())
            console.print(f"{run_.target.name} errors by status: {errors_text}", markup=False, highlight=False)
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}", markup=False, highlight=False)
    return 0 if all(run_.summary.ok for run_ in runs) else 1
