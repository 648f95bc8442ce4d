"""Structured outputs on the engine itself (in-process, no mesh, no Triton): what grammar-constrained decoding costs
and whether its answers validate.

    python -m benchmarks.engine.structured [--model qwen2.5-coder-0.5b] [--schemas 200] [--rounds 5]
                                           [--concurrency 8] [--max-tokens 256] [--throughput-max-tokens 36]
                                           [--out results.json]

Every request asks for a JSON answer to a schema from benchmarks/engine/schemas.py (the prompt shows the schema);
"constrained" is the same request with the grammar {"json_schema": schema} (EngineSampling.grammar). Greedy unless
--temperature is given (then seeded). Measured, with the goals of the structured-outputs issue:

1. throughput: `--concurrency` requests at once, constrained vs the same prompts unconstrained, same max_tokens
   (`--throughput-max-tokens`); tok/s = generated tokens / wall time of the batch. `--rounds` rounds, the order
   alternating between rounds (machine noise hits both alike); the ratio is the median of the per-round ratios.
   Goal >= 0.9x. The schemas here are large ones (estimated answer >= THROUGHPUT_MIN_TOKENS) and max_tokens is
   below that, so every request, constrained or not, runs to max_tokens: both batches then generate the same
   tokens with the same batch sizes step by step, and the ratio is the constraint's cost per token, not a
   difference in answer lengths (unconstrained answers tend to be longer: code fences, prose). How many
   requests ended otherwise is printed.
2. neighbours: half the batch unconstrained beside half constrained, vs the whole batch unconstrained (the same
   prompts and max_tokens as 1); for the unconstrained half, per-request tok/s = its tokens / (its finish - the
   batch's start), the mean over the half, ratio per round, median. Goal >= 0.97x. Also printed: whether the
   unconstrained half generated the same tokens in both batches.
3. validity: `--schemas` schemas (seeds 0..N-1), one constrained request each (all submitted at once, the engine
   batches them); answers that finish with "stop" must parse and validate (jsonschema, Draft 2020-12). Goal 100%;
   answers that end with "length" are counted apart.

Before the timed rounds one untimed round of each kind runs (compiled grammars are cached by the engine, the
prompts' K/V by its prefix cache: both kinds meet the same warm engine). Grammar compilation, paid at submit,
is timed on its own in (3). Prints the command, the machine and the date; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from benchmarks.engine.schemas import answer_messages, estimated_tokens, generate_schema
from llmesh.model_artifact import ChatTokenizer
from triton_models.config import BuildSettings
from triton_models.engine import Engine, EngineSampling, GenerationRequest, GenerationResult
from triton_models.engine.requests import CollectingSink, FinishReason
from triton_models.repository import ensure_model_repository

THROUGHPUT_SEED = 10_000  # the throughput rounds' schemas: apart from the validity run's seeds 0..N-1
THROUGHPUT_MIN_TOKENS = 110  # their estimated answer length (schemas.estimated_tokens); Qwen2.5-0.5B answers ~0.4x that
GOALS = {"throughput": 0.9, "neighbours": 0.97, "validity": 1.0}


class TimedSink(CollectingSink):
    """CollectingSink that notes when its request ended."""

    def __init__(self, result: GenerationResult) -> None:
        super().__init__(result)
        self.ended_at = float("nan")

    def finish(self, reason: FinishReason, index: int = 0, last: bool = True) -> None:
        super().finish(reason, index, last)
        self.ended_at = time.perf_counter()

    def fail(self, message: str) -> None:
        super().fail(message)
        self.ended_at = time.perf_counter()


@dataclass
class BatchRun:
    results: list[GenerationResult]
    seconds: list[float]  # per request: finish - batch start
    wall_s: float
    cpu_s: float  # this process's CPU time over the batch (all threads): less sensitive to other load than wall_s
    submit_s: float  # time spent in submit (grammar compilation, when not cached)

    @property
    def tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def request_tokens_per_s(self, indices: Sequence[int]) -> float:
        """Mean over `indices` of each request's tokens / its time from the batch's start to its finish."""
        return statistics.fmean(len(self.results[i].token_ids) / self.seconds[i] for i in indices)


def run_batch(engine: Engine, requests: Sequence[GenerationRequest]) -> BatchRun:
    """Submit every request at once and step the engine on this thread until all have ended."""
    results = [GenerationResult() for _ in requests]
    sinks = [TimedSink(r) for r in results]
    cpu_started, started = time.process_time(), time.perf_counter()
    for request, sink in zip(requests, sinks, strict=True):
        engine.submit(request, sink)
    submitted = time.perf_counter()
    while engine.has_work():
        engine.step()
    ended, cpu_ended = time.perf_counter(), time.process_time()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, the first: {errors[0]}")
    seconds = [s.ended_at - started for s in sinks]
    return BatchRun(results, seconds, ended - started, cpu_ended - cpu_started, submitted - started)


def grammar_for(schema: dict[str, Any]) -> str:
    return json.dumps({"json_schema": schema})


@dataclass
class Prompts:
    """One prompt per schema, and the sampling the run uses (constrained or not)."""

    schemas: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    max_tokens: int
    temperature: float

    def request(self, i: int, constrained: bool) -> GenerationRequest:
        seed = None if self.temperature == 0.0 else i
        grammar = grammar_for(self.schemas[i]) if constrained else None
        sampling = EngineSampling(self.max_tokens, temperature=self.temperature, seed=seed, grammar=grammar)
        return GenerationRequest(self.prompt_ids[i], sampling)

    def batch(self, constrained: Sequence[bool]) -> list[GenerationRequest]:
        return [self.request(i, c) for i, c in enumerate(constrained)]


def make_prompts(
    tokenizer: ChatTokenizer, schemas: Sequence[dict[str, Any]], max_tokens: int, temperature: float
) -> Prompts:
    ids = [tokenizer.encode_chat(answer_messages(s)) for s in schemas]
    return Prompts(list(schemas), ids, max_tokens, temperature)


def large_schemas(count: int, min_tokens: int = THROUGHPUT_MIN_TOKENS) -> list[dict[str, Any]]:
    """The first `count` schemas from THROUGHPUT_SEED on whose estimated answer is at least `min_tokens`."""
    found: list[dict[str, Any]] = []
    seed = THROUGHPUT_SEED
    while len(found) < count:
        schema = generate_schema(seed)
        if estimated_tokens(schema) >= min_tokens:
            found.append(schema)
        seed += 1
    return found


def ended_early(run: BatchRun, indices: Sequence[int] | None = None) -> int:
    """Requests (of `indices`, default all) that did not run to max_tokens."""
    chosen = range(len(run.results)) if indices is None else indices
    return sum(run.results[i].finish_reason != "length" for i in chosen)


def paired_runs(
    engine: Engine, first: Sequence[GenerationRequest], second: Sequence[GenerationRequest], rounds: int
) -> Iterator[tuple[BatchRun, BatchRun]]:
    """(run of `first`, run of `second`) per round, after one warm-up run of each (grammars compiled and cached,
    prompts' K/V cached); the order alternates between rounds so neither batch always runs on a warmer machine."""
    run_batch(engine, first)
    run_batch(engine, second)
    for r in range(rounds):
        if r % 2 == 0:
            a, b = run_batch(engine, first), run_batch(engine, second)
        else:
            b, a = run_batch(engine, second), run_batch(engine, first)
        yield a, b


@dataclass
class ThroughputRound:
    constrained_tok_s: float
    unconstrained_tok_s: float
    constrained_tokens: int
    unconstrained_tokens: int
    cpu_ratio: float  # the same ratio by CPU time: tokens per CPU second, constrained / unconstrained
    ended_early: int  # requests of either batch that stopped before max_tokens

    @property
    def ratio(self) -> float:
        return self.constrained_tok_s / self.unconstrained_tok_s


def measure_throughput(engine: Engine, prompts: Prompts, rounds: int) -> list[ThroughputRound]:
    n = len(prompts.schemas)
    constrained, plain = prompts.batch([True] * n), prompts.batch([False] * n)
    out = []
    for r, (c, u) in enumerate(paired_runs(engine, constrained, plain, rounds)):
        cpu_ratio = (c.tokens / c.cpu_s) / (u.tokens / u.cpu_s)
        result = ThroughputRound(
            c.tokens_per_s, u.tokens_per_s, c.tokens, u.tokens, cpu_ratio, ended_early(c) + ended_early(u)
        )
        out.append(result)
        print(
            f"  throughput round {r + 1}: constrained {c.tokens_per_s:.2f} tok/s ({c.tokens} tokens), "
            f"unconstrained {u.tokens_per_s:.2f} tok/s ({u.tokens} tokens), ratio {result.ratio:.3f} "
            f"(by CPU time {cpu_ratio:.3f}), {result.ended_early} ended before max_tokens",
            flush=True,
        )
    return out


@dataclass
class NeighbourRound:
    mixed_tok_s: float  # per-request tok/s of the unconstrained half, beside the constrained half
    alone_tok_s: float  # the same requests' per-request tok/s in an all-unconstrained batch
    cpu_ratio: float  # CPU time of the all-unconstrained batch / of the mixed one (same tokens when none ends early)
    same_tokens: bool  # the unconstrained half generated the same tokens in both batches
    ended_early: int  # requests of either batch that stopped before max_tokens

    @property
    def ratio(self) -> float:
        return self.mixed_tok_s / self.alone_tok_s


def measure_neighbours(engine: Engine, prompts: Prompts, rounds: int) -> list[NeighbourRound]:
    n = len(prompts.schemas)
    half = list(range(n // 2))
    mixed = prompts.batch([i >= n // 2 for i in range(n)])  # the first half unconstrained, the rest constrained
    plain = prompts.batch([False] * n)
    out = []
    for r, (m, a) in enumerate(paired_runs(engine, mixed, plain, rounds)):
        same = all(m.results[i].token_ids == a.results[i].token_ids for i in half)
        result = NeighbourRound(
            m.request_tokens_per_s(half), a.request_tokens_per_s(half), a.cpu_s / m.cpu_s, same,
            ended_early(m) + ended_early(a),
        )  # fmt: skip
        out.append(result)
        print(
            f"  neighbours round {r + 1}: beside constrained {result.mixed_tok_s:.2f} tok/s per request, "
            f"all unconstrained {result.alone_tok_s:.2f}, ratio {result.ratio:.3f} (by CPU time "
            f"{result.cpu_ratio:.3f}), same tokens {same}, {result.ended_early} ended before max_tokens",
            flush=True,
        )
    return out


@dataclass
class Validity:
    schemas: int
    stopped: int = 0  # finished with "stop"
    valid: int = 0  # of those, parsed and validated
    length: int = 0  # ended at max_tokens
    tokens: int = 0
    wall_s: float = 0.0
    compile_ms_mean: float = 0.0  # grammar compilation at submit, per schema (none cached)
    invalid: list[dict[str, Any]] = field(default_factory=list)  # the first few failures, for a look

    @property
    def valid_fraction(self) -> float:
        return self.valid / self.stopped if self.stopped else float("nan")


def check_answer(schema: dict[str, Any], text: str) -> str | None:
    """None if `text` is JSON valid against `schema`, else why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    error = next(iter(Draft202012Validator(schema).iter_errors(value)), None)
    return None if error is None else f"invalid: {error.message}"


def measure_validity(engine: Engine, tokenizer: ChatTokenizer, prompts: Prompts) -> Validity:
    run = run_batch(engine, prompts.batch([True] * len(prompts.schemas)))
    outcome = Validity(len(prompts.schemas), tokens=run.tokens, wall_s=run.wall_s)
    outcome.compile_ms_mean = 1000 * run.submit_s / len(prompts.schemas)
    for schema, result in zip(prompts.schemas, run.results, strict=True):
        if result.finish_reason == "length":
            outcome.length += 1
            continue
        outcome.stopped += 1
        text = tokenizer.decode(result.token_ids)
        problem = check_answer(schema, text)
        if problem is None:
            outcome.valid += 1
        elif len(outcome.invalid) < 5:
            outcome.invalid.append({"schema": schema, "answer": text, "problem": problem})
    return outcome


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="variant to build (cached) and run")
    parser.add_argument("--schemas", type=int, default=200, help="schemas in the validity run")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per throughput comparison")
    parser.add_argument("--concurrency", type=int, default=8, help="requests per throughput batch")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of the validity run")
    parser.add_argument("--throughput-max-tokens", type=int, default=36, help="max_tokens of the timed batches")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else seeded sampling")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: the model's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "neighbours", "validity"])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.concurrency < 2 or args.rounds < 1 or args.schemas < 1:
        parser.error("--concurrency must be >= 2, --rounds and --schemas >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.engine.structured " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine()
    print(
        f"command: {command}\nmachine: {info['cpu']}, {info['cores']} cores; python {info['python']}\n"
        f"date: {info['date']}",
        flush=True,
    )
    version_dir = ensure_model_repository(BuildSettings(variants=(args.model,))) / args.model / "1"
    engine = Engine.from_model_dir(version_dir, threads=args.threads)
    tokenizer = ChatTokenizer.from_model_dir(version_dir)
    report: dict[str, Any] = {
        "command": command,
        "machine": info,
        "model": args.model,
        "args": vars(args) | {"out": str(args.out) if args.out else None},
    }
    rows: list[tuple[str, str, str, bool]] = []
    try:
        throughput_prompts = make_prompts(
            tokenizer, large_schemas(args.concurrency), args.throughput_max_tokens, args.temperature
        )
        # The first constrained request builds the engine's grammar compiler (tokenizer load): not timed anywhere.
        run_batch(engine, [throughput_prompts.request(0, constrained=True)])
        if "throughput" not in args.skip:
            rounds = measure_throughput(engine, throughput_prompts, args.rounds)
            ratio = statistics.median(r.ratio for r in rounds)
            report["throughput"] = {"rounds": [asdict(r) | {"ratio": r.ratio} for r in rounds], "median_ratio": ratio}
            c_tok = statistics.median(r.constrained_tok_s for r in rounds)
            u_tok = statistics.median(r.unconstrained_tok_s for r in rounds)
            cpu = statistics.median(r.cpu_ratio for r in rounds)
            early = sum(r.ended_early for r in rounds)
            rows.append((
                f"constrained vs unconstrained output tok/s, concurrency {args.concurrency}, max_tokens "
                f"{args.throughput_max_tokens} (median {c_tok:.2f} vs {u_tok:.2f}; by CPU time {cpu:.3f}x; "
                f"{early} requests ended early)",
                f"{ratio:.3f}x", f">= {GOALS['throughput']}x", ratio >= GOALS["throughput"],
            ))  # fmt: skip
        if "neighbours" not in args.skip:
            neighbour_rounds = measure_neighbours(engine, throughput_prompts, args.rounds)
            ratio = statistics.median(r.ratio for r in neighbour_rounds)
            report["neighbours"] = {
                "rounds": [asdict(r) | {"ratio": r.ratio} for r in neighbour_rounds],
                "median_ratio": ratio,
            }
            half = args.concurrency // 2
            cpu = statistics.median(r.cpu_ratio for r in neighbour_rounds)
            same = all(r.same_tokens for r in neighbour_rounds)
            rows.append((
                f"{half} unconstrained beside {args.concurrency - half} constrained vs all unconstrained "
                f"(per-request tok/s; by CPU time {cpu:.3f}x; same tokens: {'yes' if same else 'NO'})",
                f"{ratio:.3f}x", f">= {GOALS['neighbours']}x", ratio >= GOALS["neighbours"],
            ))  # fmt: skip
        if "validity" not in args.skip:
            print(f"  validity: {args.schemas} schemas, max_tokens {args.max_tokens} ...", flush=True)
            schemas = [generate_schema(seed) for seed in range(args.schemas)]
            prompts = make_prompts(tokenizer, schemas, args.max_tokens, args.temperature)
            validity = measure_validity(engine, tokenizer, prompts)
            report["validity"] = asdict(validity) | {"valid_fraction": validity.valid_fraction}
            rows.append((
                f"schema-valid answers of those ending 'stop' ({validity.valid}/{validity.stopped}; "
                f"{validity.length} of {validity.schemas} ended 'length'; {validity.tokens} tokens in "
                f"{validity.wall_s:.0f} s; grammar compile {validity.compile_ms_mean:.1f} ms/schema)",
                f"{100 * validity.valid_fraction:.1f}%", "100%", validity.valid_fraction >= GOALS["validity"],
            ))  # fmt: skip
            for failure in validity.invalid:
                print(
                    f"  INVALID: {failure['problem']}\n    answer: {failure['answer']!r}\n"
                    f"    schema: {json.dumps(failure['schema'])}"
                )
    finally:
        engine.close()
    print(f"\n{args.model}, greedy" if args.temperature == 0.0 else f"\n{args.model}, temperature {args.temperature}")
    print("| measure | result | goal | met |\n|---|---|---|---|")
    for measure, result, goal, met in rows:
        print(f"| {measure} | {result} | {goal} | {'yes' if met else 'NO'} |")
    report["table"] = [{"measure": m, "result": r, "goal": g, "met": ok} for m, r, g, ok in rows]
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if all(met for *_, met in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
