"""The whole mesh against llama.cpp's llama-server on the same SmolLM2 GGUF, side by side in one run.

    python -m benchmarks.mesh [--concurrency 1 8] [--rounds 2] [--max-tokens 128] [--out bench-mesh.json]

Starts the mesh as `llmesh up` does (Redis, tritonserver with SmolLM2 fp32 + int8, cache, limiter, router, gateway,
Envoy) on free ports, with an enterprise key and the edge's per-IP and per-key limits lifted (they are sized for
people, not for a benchmark), and llama-server (benchmarks/engine's build, 2 threads, as many slots as the highest
concurrency). Closed-loop streaming clients (benchmarks.engine's `load`) send the same distinct prompts to Envoy's
POST /v1/chat/completions (model pinned to the int8 variant, temperature 0) and to llama-server's; systems
alternate per round. Prompts are numbered so the response cache cannot answer them (see analysis.salted_prompts).
llmesh has no ignore_eos, so the prompts ask for long answers; llama-server gets ignore_eos unless
--no-ignore-eos; tokens per request are reported for both.

Then: cache hits (one cached request repeated through Envoy's HTTP path, non-streaming and streaming, p50/p99),
the TTFT breakdown at concurrency 1 (the same kind of fresh request straight to Triton, to the router's Generate, to
the gateway, through Envoy gRPC and HTTP; plus router Prepare and a cache Lookup miss on their own), and the
cache-hit path per hop from benchmarks.cache. Prints the goal table; writes JSON with command, machine and date.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import redis.asyncio as aioredis

from benchmarks.engine.__main__ import ANCHOR, LlamaClient, llama_server_binary, load, start_llama
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
from benchmarks.mesh.clients import (
    ChatStreamClient,
    close_channels,
    content_and_usage,
    sse_event,
    tier_field,
    ttft_chat_grpc,
    ttft_http,
    ttft_router,
    ttft_triton,
    user_turn,
)
from control.launcher import Mesh, MeshSettings
from control.process import ManagedProcess, free_port
from llmesh import paths, tls
from llmesh.model_artifact import ChatTokenizer
from llmesh.types import Tier
from llmesh.v1 import cache_pb2, cache_pb2_grpc, chat_pb2, chat_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc
from router.triton_client import TritonReplica
from triton_models.config import BuildSettings
from triton_models.repository import ensure_model_repository

VARIANTS = ("smollm2-135m", "smollm2-135m-int8")
MEASURED = "smollm2-135m-int8"
ROOT = Path(__file__).resolve().parents[2]
# Lines of limiter_service/policy.toml lifted for the benchmark: (shipped, replacement).
EDGE_LIMITS = (
    ("per_ip_per_minute = 1200", 'per_ip_per_minute = "unlimited"'),
    ("per_key_per_minute = 600", 'per_key_per_minute = "unlimited"'),
)


def service_port(settings: MeshSettings, service: str) -> int:
    """A service's gRPC port: `settings.<service>.port` (services' own settings inside MeshSettings), or the flat
    `<service>_port` of the layout before it, so the tool runs on either side of that change."""
    nested = getattr(settings, service, None)
    return int(getattr(nested, "port", None) or getattr(settings, f"{service}_port"))


def machine() -> dict[str, object]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(cpuinfo),
        "load_avg": os.getloadavg(),
        "python": sys.version.split()[0],
        "git_commit": commit,
    }


def benchmark_policy(state: Path) -> Path:
    text = (ROOT / "limiter_service" / "policy.toml").read_text()
    for shipped, lifted in EDGE_LIMITS:
        if shipped not in text:
            raise SystemExit(f"limiter_service/policy.toml no longer has {shipped!r}; update EDGE_LIMITS")
        text = text.replace(shipped, lifted)
    path = state / "limiter-policy.toml"
    path.write_text(text)
    return path


def start_mesh(state: Path, repository: Path, log_level: str) -> Mesh:
    settings = MeshSettings.on_free_ports(
        limiter_policy_file=benchmark_policy(state),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        model_repository=repository,
        state_dir=state,
        startup_timeout_s=600,
        log_level=log_level,
    )
    mesh = Mesh(settings)
    print(f"starting the mesh (logs: {mesh.log_dir}) ...", flush=True)
    mesh.start()
    return mesh


async def create_key(redis_url: str, tier: Tier, redis_options: dict[str, Any]) -> str:
    from gateway.auth import RedisApiKeyStore

    client = aioredis.from_url(redis_url, **redis_options)
    try:
        return await RedisApiKeyStore(client).create(tier, "benchmarks.mesh")
    finally:
        await client.aclose()


# ---- throughput and TTFT, both systems ------------------------------------------------------------------------


async def compare(
    args: argparse.Namespace, envoy_base: str, api_key: str, llama_base: str | None, tag: str
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    counter = 0
    for rnd in range(args.rounds):
        for c in args.concurrency:
            n = max(args.requests, c * args.requests_per_slot)
            prompts = salted_prompts(tag, counter, n)
            warm = salted_prompts(tag, counter + n, 2)
            counter += n + 2
            systems = [LLMESH] + ([ANCHOR] if llama_base else [])
            if rnd % 2:
                systems.reverse()
            for system in systems:
                if system == ANCHOR:
                    extra = {} if args.no_ignore_eos else {"ignore_eos": True}
                    client = ChatStreamClient(cast(str, llama_base), "", MEASURED, c, extra)
                else:
                    client = ChatStreamClient(envoy_base, api_key, MEASURED, c)
                # benchmarks.engine's `load` only calls client.stream(prompt, max_tokens) and client.close().
                driven = cast(LlamaClient, client)
                try:
                    await load(driven, system, cast(list[list[int]], warm), min(c, 2), 8)
                    stats = await load(driven, system, cast(list[list[int]], prompts), c, args.max_tokens)
                finally:
                    await client.close()
                s = stats.summary()
                row: dict[str, object] = {
                    "round": rnd,
                    "system": system,
                    "concurrency": c,
                    **s,
                    "requests": n,
                    "tokens_per_request": s["tokens"] / n,
                    "load1": os.getloadavg()[0],
                }
                rows.append(row)
                print(
                    f"round {rnd} c={c:<3} {system:<10} {s['tok_s']:7.1f} tok/s  "
                    f"TTFT p50 {s['ttft_p50_ms']:7.1f} p99 {s['ttft_p99_ms']:7.1f} ms  "
                    f"ITL p50 {s['itl_p50_ms']:6.1f} ms  {s['tokens'] / n:5.1f} tok/req  (load {row['load1']:.1f})",
                    flush=True,
                )
    return rows


# ---- cache hits through Envoy ---------------------------------------------------------------------------------


async def cache_hits(envoy_base: str, api_key: str, warmup: int, requests: int) -> dict[str, dict[str, float]]:
    """One cached answer requested again and again through Envoy's HTTP path: non-streaming (end to end) and
    streaming (first content and end to end), interleaved."""
    body = {
        "model": MEASURED,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "temperature": 0,
        "max_tokens": 32,
    }
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=envoy_base, headers=headers, timeout=120) as http:
        first = await http.post("/v1/chat/completions", json=body)  # generates and stores
        first.raise_for_status()

        async def plain() -> float:
            start = time.perf_counter()
            reply = await http.post("/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - start
            if reply.status_code != 200 or reply.json().get("llmesh_cache") != "exact":
                raise RuntimeError(f"expected an exact cache hit, got {reply.status_code} {reply.text[:200]}")
            return elapsed

        streamed_first: list[float] = []

        async def streamed() -> float:
            start = time.perf_counter()
            first_content, hit = None, False
            async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    event = sse_event(line)
                    if event is None:
                        continue
                    hit = hit or event.get("llmesh_cache") == "exact"
                    if first_content is None and content_and_usage(event)[0]:
                        first_content = time.perf_counter()
            end = time.perf_counter()
            if not hit or first_content is None:
                raise RuntimeError("expected a streamed exact cache hit with content")
            streamed_first.append(first_content - start)
            return end - start

        calls: dict[str, Callable[[], Awaitable[float]]] = {"http": plain, "http_stream": streamed}
        for call in calls.values():
            for _ in range(warmup):
                await call()
        streamed_first.clear()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(requests):
            for name, call in calls.items():
                samples[name].append(await call())
    result = {name: latency_summary(values) for name, values in samples.items()}
    result["http_stream_first_content"] = latency_summary(streamed_first)
    return result


# ---- where TTFT goes at concurrency 1 -------------------------------------------------------------------------


async def ttft_breakdown(
    mesh: Mesh, repository: Path, api_key: str, tag: str, requests: int, tokens: int
) -> dict[str, dict[str, float]]:
    """Fresh (uncacheable) requests straight to each layer, interleaved, sequential; time to the first token."""
    from llmesh.apikeys import hash_key, key_id_for

    s = mesh.settings
    tokenizer = ChatTokenizer.from_model_dir(repository / MEASURED / "1")
    auth = [("authorization", f"Bearer {api_key}")]
    sampling = common_pb2.SamplingParams(max_tokens=tokens, temperature=0.0, top_p=1.0)
    client_tls = s.tls_files("client")  # internal parts (Triton included) take only the mesh's certificates
    triton_tls = client_tls if s.router.triton_tls else None
    triton = TritonReplica(mesh.triton_url.split(",")[0], timeout_s=120, tls=triton_tls)
    channels = {
        name: tls.aio_channel(f"127.0.0.1:{port}", client_tls if name != "envoy" else None)
        for name, port in (("envoy", s.http_port), ("gateway", service_port(s, "gateway")),
                           ("router", service_port(s, "router")), ("cache", service_port(s, "cache")))
    }  # fmt: skip
    envoy_chat = chat_pb2_grpc.ChatServiceStub(channels["envoy"])
    gateway_chat = chat_pb2_grpc.ChatServiceStub(channels["gateway"])
    router = router_pb2_grpc.RouterServiceStub(channels["router"])
    cache = cache_pb2_grpc.CacheServiceStub(channels["cache"])
    key_id = key_id_for(hash_key(api_key))
    tiers = {
        "generate": tier_field(router_pb2.GenerateRequest, Tier.ENTERPRISE),
        "prepare": tier_field(router_pb2.PrepareRequest, Tier.ENTERPRISE),
        "cache": tier_field(cache_pb2.CacheKey, Tier.ENTERPRISE),
    }
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{s.http_port}",
        headers={"authorization": f"Bearer {api_key}", "content-type": "application/json"},
        timeout=120,
    )
    counter = 0

    def fresh() -> str:
        nonlocal counter
        counter += 1
        return salted_prompts(f"{tag}b", counter, 1)[0]

    def chat(text: str) -> chat_pb2.ChatCompletionRequest:
        messages = user_turn(text)
        return chat_pb2.ChatCompletionRequest(model=MEASURED, messages=messages, max_tokens=tokens, temperature=0)

    async def triton_direct() -> float:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": fresh()}]))
        return await ttft_triton(triton, MEASURED, f"bd{counter}", ids, tokens)

    async def router_generate() -> float:
        request = router_pb2.GenerateRequest(
            request_id=f"bd{counter}", tier=tiers["generate"], model=MEASURED, messages=user_turn(fresh()),
            sampling=sampling,
        )  # fmt: skip
        return await ttft_router(router, request)

    async def router_prepare() -> float:
        messages = user_turn(fresh())
        request = router_pb2.PrepareRequest(tier=tiers["prepare"], model=MEASURED, messages=messages, sampling=sampling)
        start = time.perf_counter()
        await router.Prepare(request, timeout=30)
        return time.perf_counter() - start

    async def cache_lookup_miss() -> float:
        messages = user_turn(fresh())
        key = cache_pb2.CacheKey(
            key_id=key_id, tier=tiers["cache"], variant=MEASURED, messages=messages, sampling=sampling
        )
        start = time.perf_counter()
        reply = await cache.Lookup(cache_pb2.CacheLookupRequest(key=key), timeout=30)
        if reply.hit:
            raise RuntimeError("a fresh prompt hit the cache")
        return time.perf_counter() - start

    async def gateway_grpc() -> float:
        return await ttft_chat_grpc(gateway_chat, chat(fresh()), auth)

    async def envoy_grpc() -> float:
        return await ttft_chat_grpc(envoy_chat, chat(fresh()), auth)

    async def envoy_http() -> float:
        body = {
            "model": MEASURED, "messages": [{"role": "user", "content": fresh()}], "max_tokens": tokens,
            "temperature": 0, "stream": True,
        }  # fmt: skip
        return await ttft_http(http, body)

    calls: dict[str, Callable[[], Awaitable[float]]] = {
        "triton direct": triton_direct,
        "router Generate": router_generate,
        "gateway gRPC": gateway_grpc,
        "envoy gRPC": envoy_grpc,
        "envoy HTTP": envoy_http,
        "router Prepare (unary)": router_prepare,
        "cache Lookup miss (unary)": cache_lookup_miss,
    }
    try:
        for call in calls.values():
            for _ in range(3):
                await call()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(requests):
            for name, call in calls.items():
                samples[name].append(await call())
    finally:
        await http.aclose()
        await triton.close()
        await close_channels(*channels.values())
    return {name: latency_summary(values) for name, values in samples.items()}


def cache_hops(mesh: Mesh, requests: int, concurrency: int) -> str:
    """benchmarks.cache's per-hop cache-hit table on this mesh; printed, and returned as text for the JSON."""
    from benchmarks.cache.__main__ import latency

    class Tee(io.StringIO):
        def write(self, text: str) -> int:
            if sys.__stdout__ is not None:
                sys.__stdout__.write(text)
            return super().write(text)

    captured = Tee()
    with contextlib.redirect_stdout(captured):
        asyncio.run(latency(mesh, requests, concurrency))
    return captured.getvalue()


# ---- main -----------------------------------------------------------------------------------------------------


def print_summary(report: dict[str, object]) -> None:
    table = cast(dict[str, dict[str, dict[str, float]]], report["table"])
    print("\nmedian over rounds; ratio = llmesh / llama.cpp (tok/s: > 1 is better; latencies: < 1 is better)")
    for c, by_system in table.items():
        for system, s in by_system.items():
            line = (
                f"c={c:<3} {system:<10} {s['tok_s']:7.1f} tok/s  TTFT p50 {s['ttft_p50_ms']:7.1f} "
                f"p99 {s['ttft_p99_ms']:7.1f} ms  ITL p50 {s['itl_p50_ms']:6.1f} ms  "
                f"{s['tokens_per_request']:5.1f} tok/req"
            )
            anchor = by_system.get(ANCHOR)
            if anchor and system != ANCHOR:
                r = ratios(s, anchor)
                line += (
                    f"   x{r['tok_s']:.2f} tok/s, TTFT p50 x{r['ttft_p50_ms']:.2f}, p99 x{r['ttft_p99_ms']:.2f}, "
                    f"ITL p50 x{r['itl_p50_ms']:.2f}"
                )
            print(line)
    print(f"\n{'goal':<24}{'llmesh':>10}{'llama.cpp':>11}   {'target':<22}{'verdict':<14}(the issue's numbers)")
    for goal in cast(list[dict[str, object]], report["goals_printed"]):
        print(goal)


async def measure(args: argparse.Namespace, mesh: Mesh, repository: Path, report: dict[str, object]) -> None:
    s = mesh.settings
    envoy_base = f"http://127.0.0.1:{s.http_port}"
    # The password of the redis-server the launcher started (and made one for).
    api_key = await create_key(s.redis_url, Tier.ENTERPRISE, s.redis_auth(os.environ).client_options(s.redis_url))
    tag = secrets.token_hex(2)
    llama: ManagedProcess | None = None
    llama_base = None
    try:
        if not args.no_anchor:
            binary = args.llama_server or llama_server_binary()
            gguf = BuildSettings(variants=VARIANTS).source_path("smollm2")
            slots, ctx = max(args.concurrency), BuildSettings().max_context
            llama, llama_base = start_llama(binary, gguf, slots, ctx, mesh.log_dir)
            report["llama_server"] = {"binary": str(binary), "gguf": str(gguf), "slots": max(args.concurrency),
                                      "threads": 2}  # fmt: skip
        report["runs"] = rows = await compare(args, envoy_base, api_key, llama_base, tag)
    finally:
        if llama is not None:
            llama.stop()
    report["table"] = aggregate(rows)
    if args.cache_requests:
        hits = await cache_hits(envoy_base, api_key, args.cache_warmup, args.cache_requests)
        report["cache_hit"] = hits
        print(f"\ncache hit through Envoy, {args.cache_requests} sequential requests each (ms):")
        for name, v in hits.items():
            print(f"  {name:<28} p50 {v['p50_ms']:6.2f}  p99 {v['p99_ms']:6.2f}  mean {v['mean_ms']:6.2f}")
    if args.breakdown:
        bd = await ttft_breakdown(mesh, repository, api_key, tag, args.breakdown, args.breakdown_tokens)
        p50 = {name: v["p50_ms"] for name, v in bd.items()}
        report["ttft_breakdown"] = {"paths": bd, "differences_p50_ms": layer_differences(p50)}
        print(f"\nTTFT at concurrency 1 per layer, fresh prompts, {args.breakdown} each, interleaved (ms):")
        for name, v in bd.items():
            print(f"  {name:<28} p50 {v['p50_ms']:7.2f}  p99 {v['p99_ms']:7.2f}")
        for name, ms in layer_differences(p50).items():
            print(f"  {name:<72} {ms:7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency; systems alternate first")
    parser.add_argument("--requests", type=int, default=8, help="least requests per system, level and round")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests = max(--requests, this * c)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-anchor", action="store_true", help="skip llama.cpp")
    parser.add_argument("--llama-server", type=Path, help="llama-server binary (default: benchmarks/engine's build)")
    parser.add_argument("--no-ignore-eos", action="store_true", help="let llama-server stop at end of sequence")
    parser.add_argument("--cache-requests", type=int, default=200, help="cache-hit calls per path; 0 = skip")
    parser.add_argument("--cache-warmup", type=int, default=20)
    parser.add_argument("--breakdown", type=int, default=20, help="TTFT breakdown calls per layer; 0 = skip")
    parser.add_argument("--breakdown-tokens", type=int, default=4, help="max_tokens of the breakdown's requests")
    parser.add_argument("--cache-hops", type=int, default=200,
                        help="benchmarks.cache's per-hop cache-hit requests per path; 0 = skip")  # fmt: skip
    parser.add_argument("--log-level", default="info", help="the services' log level (their logs stay)")
    parser.add_argument("--state-dir", type=Path, default=None, help="default: <llmesh state>/bench-mesh")
    parser.add_argument("--out", type=Path, default=Path("bench-mesh.json"))
    args = parser.parse_args(argv)

    report: dict[str, object] = {
        "command": shlex.join([sys.executable, "-m", "benchmarks.mesh", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "variant": MEASURED,
    }
    state = args.state_dir or paths.state_dir() / "bench-mesh"
    state.mkdir(parents=True, exist_ok=True)
    repository = ensure_model_repository(BuildSettings(variants=VARIANTS))
    mesh = start_mesh(state, repository, args.log_level)
    report["log_dir"] = str(mesh.log_dir)
    try:
        asyncio.run(measure(args, mesh, repository, report))
        if args.cache_hops:
            try:
                report["cache_hops"] = cache_hops(mesh, args.cache_hops, 16)
            except (grpc.aio.AioRpcError, AssertionError, TypeError, ValueError) as exc:
                # benchmarks.cache follows its own copy of the contracts; a mismatch must not cost the run.
                print(f"benchmarks.cache latency failed: {exc!r}", file=sys.stderr)
                report["cache_hops"] = f"failed: {exc!r}"
    finally:
        mesh.stop()

    hit = cast(dict[str, dict[str, float]], report.get("cache_hit", {})).get("http", {}).get("p50_ms")
    goal_list = goals(cast(dict[str, dict[str, dict[str, float]]], report["table"]), hit)
    report["goals"] = [g.as_dict() for g in goal_list]
    report["goals_printed"] = [format_goal(g) for g in goal_list]
    print_summary(report)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
