"""Engine benchmark: llmesh's Triton variants against llama.cpp's server on the same GGUF, in one run.

    python -m benchmarks.engine [--rounds 2] [--concurrency 1 8 32] [--max-tokens 128] [--out results.json]

For each concurrency level and round (systems interleaved, so machine noise hits all of them alike) a fixed
prompt set is sent by closed-loop streaming clients; measured per system: TTFT p50/p99, inter-token latency
p50/p99, output tokens/s. llama.cpp's `llama-server` (built once by benchmarks/engine/build_llama_server.sh, or
found on PATH) runs with as many parallel slots as the concurrency and 2 threads. Also measured: this machine's
read bandwidth and fp32 GEMM rate (roofline share of each variant), prefix-cache TTFT (1,000-token shared system
prompt, miss vs hit), 64 concurrent requests against the KV budget (blocks and memory from Triton's metrics), and
quality (perplexity on triton_models/data, int8-vs-fp32 top-1 agreement). Prints ratios; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from control.process import ManagedProcess, free_port, free_ports, http_ok_probe
from llmesh import paths
from llmesh.model_artifact import ChatTokenizer
from llmesh.types import SamplingParams, Tier
from router.triton_client import TritonReplica
from triton_models.config import BuildSettings
from triton_models.repository import ensure_model_repository
from triton_models.runtime import prepare_backend_dir, tritonserver_command

QUESTIONS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue, step by step.",
    "Tell me about the history of the bicycle.",
    "Write a poem about the ocean at night.",
    "Describe how bread is made, from wheat to loaf.",
]
# Variants measured per model family (`--model`): the first is the one compared with llama.cpp in the ratios.
MODELS = {
    "smollm2": ("smollm2-135m-int8", "smollm2-135m"),
    "gemma3": ("gemma3-270m",),
    "qwen2.5-coder-0.5b": ("qwen2.5-coder-0.5b",),
    "qwen2.5-coder-1.5b": ("qwen2.5-coder-1.5b",),
}
ANCHOR = "llama.cpp"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class RunStats:
    system: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    ttft: list[float] = field(default_factory=list, repr=False)
    itl: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def summary(self) -> dict[str, float]:
        return {
            "tok_s": self.tokens_per_s,
            "ttft_p50_ms": 1000 * percentile(self.ttft, 50),
            "ttft_p99_ms": 1000 * percentile(self.ttft, 99),
            "itl_p50_ms": 1000 * percentile(self.itl, 50),
            "itl_p99_ms": 1000 * percentile(self.itl, 99),
            "tokens": self.output_tokens,
        }


# ---- clients ------------------------------------------------------------------------------------------------


async def _timed(stream: object) -> tuple[float | None, list[float], int]:
    """Consume an async iterator of token counts; returns first-token time, per-token times, token count."""
    first, times, count = None, [], 0
    async for n in stream:  # type: ignore[attr-defined]
        if n <= 0:
            continue
        now = time.perf_counter()
        first = first if first is not None else now
        times.extend([now] * n)
        count += n
    return first, times, count


class TritonClient:
    def __init__(self, url: str, variant: str) -> None:
        self.source = TritonReplica(url, timeout_s=600)
        self.variant = variant
        self._ids = 0

    async def stream(self, prompt: list[int], max_tokens: int):  # type: ignore[no-untyped-def]
        self._ids += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        async for chunk in self.source.stream(self.variant, f"b{self._ids}", prompt, params, Tier.PAID):
            yield len(chunk.token_ids)

    async def close(self) -> None:
        await self.source.close()


class LlamaClient:
    def __init__(self, url: str) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=url, timeout=600)

    async def stream(self, prompt: list[int], max_tokens: int):  # type: ignore[no-untyped-def]
        body = {
            "prompt": prompt,
            "n_predict": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "return_tokens": True,
            "cache_prompt": True,
        }
        async with self.http.stream("POST", "/completion", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                tokens = event.get("tokens")
                n = len(tokens) if isinstance(tokens, list) else (1 if event.get("content") else 0)
                if event.get("stop"):
                    # The final event repeats nothing new unless it carries the last token.
                    yield n if event.get("content") else 0
                    return
                yield n

    async def close(self) -> None:
        await self.http.aclose()


async def load(
    client: TritonClient | LlamaClient, system: str, prompts: list[list[int]], concurrency: int, max_tokens: int
) -> RunStats:
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    stats = RunStats(system, concurrency, len(prompts), 0, 0.0)

    async def worker() -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            sent = time.perf_counter()
            first, times, count = await _timed(client.stream(prompt, max_tokens))
            if first is not None:
                stats.ttft.append(first - sent)
                stats.itl.extend(np.diff(times).tolist())
            stats.output_tokens += count

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stats.wall_s = time.perf_counter() - started
    return stats


# ---- servers --------------------------------------------------------------------------------------------------


def llama_server_binary() -> Path:
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    script = Path(__file__).resolve().parent / "build_llama_server.sh"
    print("llama-server: using the cached build, or building it once (~8 min on 2 cores) ...", flush=True)
    out = subprocess.run(
        ["bash", str(script)], check=True, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}
    )
    return Path(out.stdout.strip().splitlines()[-1])


def start_llama(binary: Path, gguf: Path, slots: int, ctx_per_slot: int, log_dir: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = [
        str(binary),
        "-m",
        str(gguf),
        "-t",
        "2",
        "-np",
        str(slots),
        "-c",
        str(slots * ctx_per_slot),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-webui",
        "-cb",
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    proc = ManagedProcess(f"llama-server-{slots}", argv, log_dir / f"llama-server-{slots}.log", env=env).start()
    proc.wait_ready(http_ok_probe(f"http://127.0.0.1:{port}/health"), timeout=120)
    return proc, f"http://127.0.0.1:{port}"


def start_triton(repository: Path, log_dir: Path, variants: tuple[str, ...]) -> tuple[ManagedProcess, str, str]:
    grpc_port, http_port, metrics_port = free_ports(3)
    argv, env = tritonserver_command(
        repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        backend_dir=prepare_backend_dir(paths.cache_dir()),
    )
    proc = ManagedProcess("tritonserver", argv, log_dir / "tritonserver.log", env=env).start()
    for v in variants:
        proc.wait_ready(http_ok_probe(f"http://127.0.0.1:{http_port}/v2/models/{v}/ready"), timeout=300)
    return proc, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"


def triton_metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith("llmesh_engine_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- machine ceilings -----------------------------------------------------------------------------------------


def machine_ceilings() -> dict[str, float]:
    a = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB, far beyond the caches
    a.sum()
    best = min(_timeit(a.sum) for _ in range(5))
    bandwidth = a.nbytes / best
    m = np.random.rand(1024, 1024).astype(np.float32)
    m @ m
    gemm = 2 * 1024**3 / min(_timeit(lambda: m @ m) for _ in range(5))
    return {"read_gb_s": bandwidth / 1e9, "gemm_gflop_s": gemm / 1e9}


def _timeit(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(version_dir: Path) -> tuple[float, float]:
    """(bytes read per decode step, matmul FLOPs per token) of a built variant, from its initializers."""
    import onnx

    model = onnx.load(str(version_dir / "model.onnx"), load_external_data=False)
    bytes_read, flops = 0.0, 0.0
    for init in model.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        item = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT64: 8}.get(init.data_type, 4)
        if init.name == "token_embd":  # only gathered rows are read
            continue
        bytes_read += size * item
    for node in model.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "MatMulNBits":
            flops += 2 * attrs["K"] * attrs["N"]
    if flops == 0:  # fp32 graph: count MatMul weights
        names = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
        flops = sum(2 * float(np.prod(i.dims)) for i in model.graph.initializer if i.name in names)
    return bytes_read, flops


# ---- experiments ----------------------------------------------------------------------------------------------


async def prefix_cache_ttft(url: str, variant: str, tokenizer: ChatTokenizer) -> dict[str, float]:
    """TTFT with a ~1,000-token system prompt: first use (miss) vs a second question on it (hit)."""
    client = TritonClient(url, variant)
    misses: list[float] = []
    hits: list[float] = []
    for trial in range(3):
        system = f"Reference manual, edition {trial}. " + " ".join(
            f"Rule {i}: every request number {i} must be answered politely and briefly." for i in range(70)
        )

        def prompt(q: str, system: str = system) -> list[int]:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
            return tokenizer.encode(tokenizer.apply_chat_template(msgs))

        for target, question in ((misses, "What is rule 3?"), (hits, "What is rule 7?")):
            p = prompt(question)
            sent = time.perf_counter()
            first, _, _ = await _timed(client.stream(p, 4))
            assert first is not None
            target.append(first - sent)
    await client.close()
    miss, hit = statistics.median(misses), statistics.median(hits)
    return {
        "prompt_tokens": float(len(p)),
        "ttft_miss_ms": 1000 * miss,
        "ttft_hit_ms": 1000 * hit,
        "speedup": miss / hit,
    }


async def kv_budget_64(url: str, metrics_url: str, variant: str, prompts: list[list[int]]) -> dict[str, float]:
    client = TritonClient(url, variant)
    peak = {"blocks": 0.0}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            m = await asyncio.to_thread(triton_metrics, metrics_url)
            peak["blocks"] = max(peak["blocks"], m.get(f'llmesh_engine_kv_blocks_used{{variant="{variant}"}}', 0.0))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    stats = await load(client, variant, (prompts * 8)[:64], 64, 128)
    stop.set()
    await sampler
    await client.close()
    m = triton_metrics(metrics_url)
    label = f'{{variant="{variant}"}}'
    return {
        "requests": 64.0,
        "tokens": float(stats.output_tokens),
        "kv_blocks_total": m[f"llmesh_engine_kv_blocks_total{label}"],
        "kv_blocks_peak_sampled": peak["blocks"],
        "kv_block_bytes": m[f"llmesh_engine_kv_block_bytes{label}"],
        "preemptions": m[f"llmesh_engine_preemptions_total{label}"],
        "process_max_rss_mb": m[f"llmesh_engine_process_max_rss_bytes{label}"] / 2**20,
    }


def speculative(repository: Path, prompts: list[list[int]], max_tokens: int, target: str) -> dict[str, float]:
    """Single-stream greedy decode of `target` with and without its draft (SmolLM2 fp32 with its int8 variant, the
    Qwen 1.5B with the 0.5B), in process (no Triton), alternating per prompt; the outputs must be identical."""
    import dataclasses

    from triton_models.engine import Engine, EngineSampling, GenerationRequest

    version = repository / target / "1"
    spec = Engine.from_model_dir(version)
    if spec.draft is None:
        spec.close()
        return {"enabled": 0.0}
    plain = Engine.from_model_dir(version, dataclasses.replace(spec.config, speculative_k=0))
    times = {"plain": 0.0, "spec": 0.0}
    tokens, identical = 0, True
    for prompt in prompts[:4]:
        request = GenerationRequest(prompt, EngineSampling(max_tokens=max_tokens))
        outputs = {}
        for name, engine in (("plain", plain), ("spec", spec)):
            started = time.perf_counter()
            outputs[name] = engine.generate([request])[0].token_ids
            times[name] += time.perf_counter() - started
        identical &= outputs["plain"] == outputs["spec"]
        tokens += len(outputs["plain"])
    s = spec.stats
    spec.close()
    plain.close()
    return {
        "tokens": float(tokens),
        "plain_ms_per_token": 1000 * times["plain"] / tokens,
        "spec_ms_per_token": 1000 * times["spec"] / tokens,
        "speedup": times["plain"] / times["spec"],
        "acceptance": s.spec_accepted / max(1, s.spec_proposed),
        "k": float(spec.config.speculative_k),
        "identical_output": float(identical),
    }


def quality(repository: Path, variants: tuple[str, ...]) -> dict[str, float]:
    from triton_models import quality as q
    from triton_models.engine import Engine

    tokenizer = ChatTokenizer.from_model_dir(repository / variants[-1] / "1")
    ids = q.sample_ids(tokenizer, 1024)
    results = {}
    for v in variants:
        engine = Engine.from_model_dir(repository / v / "1")
        results[v] = q.evaluate(engine, ids)
        engine.close()
    report = {"tokens": float(len(ids)), **{f"ppl_{v}": results[v].perplexity for v in variants}}
    if len(variants) == 2:
        report[f"top1_agreement_{variants[0]}_vs_{variants[1]}"] = q.top1_agreement(
            results[variants[0]], results[variants[1]]
        )
    return report


# ---- main -----------------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    variants = MODELS[args.model]
    # Drafts are built beside their targets (speculative decoding loads them from the same repository).
    drafts = tuple(d for v in variants if (d := BuildSettings().spec(v).draft) and d not in variants)
    settings = BuildSettings(variants=variants + drafts, max_queue_delay_us=args.max_queue_delay_us)
    repository = ensure_model_repository(settings)
    # llama.cpp serves the very GGUF the variants were built from.
    gguf = settings.source_path(settings.spec(variants[0]).source)
    tokenizer = ChatTokenizer.from_model_dir(repository / variants[0] / "1")
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    log_dir = paths.state_dir() / "bench-engine"
    log_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": "2-core CPU VM",
        "model": args.model,
        "args": vars(args),
    }

    report["ceilings"] = ceilings = machine_ceilings()
    print(
        f"machine: read {ceilings['read_gb_s']:.1f} GB/s, fp32 GEMM {ceilings['gemm_gflop_s']:.0f} GFLOP/s", flush=True
    )
    binary = None if args.no_anchor else llama_server_binary()

    triton, grpc_url, metrics_url = start_triton(repository, log_dir, variants)
    runs: list[RunStats] = []
    run_rows: list[dict[str, object]] = []
    report["runs"] = run_rows
    try:
        for rnd in range(args.rounds):
            for c in args.concurrency:
                n = max(c * args.requests_per_slot, 4)
                batch = [prompts[i % len(prompts)] for i in range(n)]
                systems: list[str] = [*variants] + ([] if binary is None else [ANCHOR])
                if rnd % 2:
                    systems.reverse()
                for system in systems:
                    if system == ANCHOR:
                        assert binary is not None
                        proc, url = start_llama(binary, gguf, c, settings.max_context, log_dir)
                        client: TritonClient | LlamaClient = LlamaClient(url)
                    else:
                        proc, client = None, TritonClient(grpc_url, system)  # type: ignore[assignment]
                    try:
                        await load(client, system, prompts[:2], min(c, 2), 8)  # warm-up
                        stats = await load(client, system, batch, c, args.max_tokens)
                    finally:
                        await client.close()
                        if proc is not None:
                            proc.stop()
                    runs.append(stats)
                    s = stats.summary()
                    s["load1"] = os.getloadavg()[0]
                    run_rows.append({"round": rnd, "system": system, "concurrency": c, **s})
                    print(
                        f"round {rnd} c={c:<3} {system:<18} {s['tok_s']:7.1f} tok/s  "
                        f"TTFT p50 {s['ttft_p50_ms']:7.1f} p99 {s['ttft_p99_ms']:7.1f} ms  "
                        f"ITL p50 {s['itl_p50_ms']:6.1f} p99 {s['itl_p99_ms']:6.1f} ms  "
                        f"(load {s['load1']:.1f})",
                        flush=True,
                    )
        report["prefix_cache"] = await prefix_cache_ttft(grpc_url, variants[0], tokenizer)
        print(f"prefix cache: {report['prefix_cache']}", flush=True)
        report["kv_budget_64"] = await kv_budget_64(grpc_url, metrics_url, variants[0], prompts)
        print(f"64 concurrent: {report['kv_budget_64']}", flush=True)
    finally:
        triton.stop()

    # Aggregate: median over rounds per (system, concurrency); ratios against the anchor.
    table: dict[str, dict[str, dict[str, float]]] = {}
    for c in args.concurrency:
        for system in {r.system for r in runs}:
            mine = [r.summary() for r in runs if r.system == system and r.concurrency == c]
            table.setdefault(str(c), {})[system] = {k: statistics.median(m[k] for m in mine) for k in mine[0]}
    report["table"] = table
    print("\nmedian over rounds (ratio = llmesh / llama.cpp for tok/s; llama.cpp / llmesh for latencies)")
    for c, by_system in table.items():
        anchor = by_system.get(ANCHOR)
        for system, s in by_system.items():
            line = (
                f"c={c:<3} {system:<18} {s['tok_s']:7.1f} tok/s  TTFT p50 {s['ttft_p50_ms']:7.1f} ms  "
                f"ITL p50 {s['itl_p50_ms']:6.1f} ms"
            )
            if anchor and system != ANCHOR:
                ratio_ttft = anchor["ttft_p50_ms"] / s["ttft_p50_ms"]
                line += (
                    f"   x{s['tok_s'] / anchor['tok_s']:.2f} tok/s, TTFT p50 x{ratio_ttft:.2f}, "
                    f"ITL p50 x{anchor['itl_p50_ms'] / s['itl_p50_ms']:.2f}"
                )
            print(line)

    roofline: dict[str, dict[str, float]] = {}
    for v in variants:
        bytes_read, flops = weight_bytes_per_token(repository / v / "1")
        single = ceilings["read_gb_s"] * 1e9 / bytes_read
        batched = ceilings["gemm_gflop_s"] * 1e9 / flops
        roofline[v] = {
            "weight_mb_per_step": bytes_read / 2**20,
            "gflop_per_token": flops / 1e9,
            "roofline_c1_tok_s": single,
            "roofline_batched_tok_s": batched,
            "share_c1": table["1"][v]["tok_s"] / single if "1" in table else float("nan"),
            "share_c32": table["32"][v]["tok_s"] / batched if "32" in table else float("nan"),
        }
        print(f"roofline {v}: {roofline[v]}")
    report["roofline"] = roofline
    targets = [v for v in settings.variants if settings.engine(v)["draft"]]
    if targets:
        report["speculative"] = speculative(repository, prompts, args.max_tokens, targets[0])
        draft = settings.engine(targets[0])["draft"]
        print(f"speculative decoding ({targets[0]}, {draft} drafts, c=1, in process): {report['speculative']}")
    report["quality"] = quality(repository, variants)
    print(f"quality: {report['quality']}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="which model family to measure")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-queue-delay-us", type=int, default=BuildSettings.max_queue_delay_us)
    parser.add_argument("--no-anchor", action="store_true", help="skip llama.cpp")
    parser.add_argument("--out", type=Path, default=Path("bench-engine.json"))
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    args.out.write_text(
        json.dumps(report, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
