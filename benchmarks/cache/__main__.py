"""Response cache benchmarks.

    .venv/bin/python -m benchmarks.cache                 # both parts below
    .venv/bin/python -m benchmarks.cache latency [--requests 400] [--concurrency 16]
    .venv/bin/python -m benchmarks.cache semantic

latency: starts the whole mesh on free ports (Redis, Triton, cache, router, gateway, Envoy), caches one answer,
then sends the same cache-hit request along every path, interleaved so machine noise hits them alike:
  redis GET (floor)   the client fetches the cached entry straight from Redis: the least a hit can cost
  cache Lookup        gRPC to the cache service (its Redis calls + the hop)
  router Prepare      gRPC to the router (the gateway routes before it looks up)
  gateway gRPC        CreateChatCompletion straight to the gateway (auth, Prepare, Lookup, replay)
  envoy gRPC          the same through Envoy: what a gRPC client sees
  envoy HTTP          OpenAI JSON POST /v1/chat/completions through Envoy (transcoding included)
Prints p50/p99 of sequential requests and requests/s at a fixed concurrency, and each path's ratio to the floor.

semantic: precision, recall and false-hit rate per threshold on cache_service/data/question_pairs.jsonl, cosine
alone and with the lexical guard the cache applies, and the threshold the calibration half picks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import redis.asyncio as aioredis

from cache_service.keys import RedisKeys, ScopePolicy, exact_digest
from control.launcher import Mesh, MeshSettings
from control.process import ManagedProcess, free_port
from llmesh import tls
from llmesh.types import ChatMessage, SamplingParams, Tier
from llmesh.v1 import cache_pb2, cache_pb2_grpc, chat_pb2, chat_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc

QUESTION = "What is the capital of France? Answer in one sentence."
MAX_TOKENS = 32


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_mesh(state: Path) -> tuple[Mesh, ManagedProcess]:
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_proc = ManagedProcess(
        "redis",
        ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--appendonly", "no",
         "--dir", str(state)],
        state / "redis.log",
    ).start()  # fmt: skip
    # The edge's per-key and per-IP request limits are DDoS protection sized for people, not for a benchmark.
    policy = state / "policy.toml"
    shipped = (Path(__file__).resolve().parents[2] / "limiter_service" / "policy.toml").read_text()
    policy.write_text(
        shipped.replace("per_ip_per_minute = 1200", 'per_ip_per_minute = "unlimited"').replace(
            "per_key_per_minute = 600", 'per_key_per_minute = "unlimited"'
        )
    )
    settings = MeshSettings.on_free_ports(
        limiter_policy_file=policy,
        redis_url=redis_url,
        state_dir=state,
        startup_timeout_s=300,
        log_level="warning",
    )
    mesh = Mesh(settings)
    mesh.start()
    return mesh, redis_proc


async def latency(mesh: Mesh, requests: int, concurrency: int) -> None:
    from gateway.auth import RedisApiKeyStore
    from llmesh.apikeys import hash_key, key_id_for

    s = mesh.settings
    redis = aioredis.from_url(s.redis_url)
    api_key = await RedisApiKeyStore(redis).create(Tier.PAID, "benchmark")
    auth = [("authorization", f"Bearer {api_key}")]
    messages = [common_pb2.ChatMessage(role="user", content=QUESTION)]
    chat_request = chat_pb2.ChatCompletionRequest(messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    body = json.dumps(
        {"model": "auto", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
         "max_tokens": MAX_TOKENS}
    ).encode()  # fmt: skip

    envoy = grpc.aio.insecure_channel(f"127.0.0.1:{s.http_port}")
    # Internal services: mutual TLS with the mesh's client certificate.
    gateway = tls.aio_channel(f"127.0.0.1:{s.gateway.port}", s.tls_files("client"))
    cache = tls.aio_channel(f"127.0.0.1:{s.cache.port}", s.tls_files("client"))
    router = tls.aio_channel(f"127.0.0.1:{s.router.port}", s.tls_files("client"))
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{s.http_port}",
        headers={"authorization": f"Bearer {api_key}", "content-type": "application/json"},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
    envoy_stub = chat_pb2_grpc.ChatServiceStub(envoy)
    gateway_stub = chat_pb2_grpc.ChatServiceStub(gateway)

    first = await envoy_stub.CreateChatCompletion(chat_request, metadata=auth, timeout=120)  # generates, stores
    variant = first.model
    hit = await envoy_stub.CreateChatCompletion(chat_request, metadata=auth, timeout=30)
    assert hit.cache == "exact", f"expected a cache hit, got {hit.cache!r}"
    key_id = key_id_for(hash_key(api_key))
    scope = ScopePolicy().scope_for(key_id, Tier.PAID)
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    entry = RedisKeys.for_digest(scope, exact_digest(scope, variant, (ChatMessage("user", QUESTION),), sampling)).entry
    assert await redis.get(entry), "the cached entry is not where the key says"
    lookup = cache_pb2.CacheLookupRequest(
        key=cache_pb2.CacheKey(
            key_id=key_id,
            tier=common_pb2.TIER_PAID,
            variant=variant,
            messages=messages,
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0),
        )
    )
    prepare = router_pb2.PrepareRequest(
        tier=common_pb2.TIER_PAID, model="", messages=messages, sampling=lookup.key.sampling
    )
    cache_stub = cache_pb2_grpc.CacheServiceStub(cache)
    router_stub = router_pb2_grpc.RouterServiceStub(router)

    async def redis_get() -> None:
        assert await redis.get(entry)

    async def cache_lookup() -> None:
        assert (await cache_stub.Lookup(lookup, timeout=5)).hit

    async def router_prepare() -> None:
        await router_stub.Prepare(prepare, timeout=5)

    async def gateway_grpc() -> None:
        assert (await gateway_stub.CreateChatCompletion(chat_request, metadata=auth, timeout=5)).cache

    async def envoy_grpc() -> None:
        assert (await envoy_stub.CreateChatCompletion(chat_request, metadata=auth, timeout=5)).cache

    async def envoy_http() -> None:
        reply = await http.post("/v1/chat/completions", content=body)
        assert reply.status_code == 200 and reply.json()["llmesh_cache"] == "exact"

    paths: dict[str, Callable[[], Awaitable[None]]] = {
        "redis GET (floor)": redis_get,
        "cache Lookup": cache_lookup,
        "router Prepare": router_prepare,
        "gateway gRPC": gateway_grpc,
        "envoy gRPC": envoy_grpc,
        "envoy HTTP": envoy_http,
    }
    for call in paths.values():  # warm connections and code paths
        for _ in range(20):
            await call()
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(requests):
        for name, call in paths.items():
            begin = time.perf_counter()
            await call()
            samples[name].append((time.perf_counter() - begin) * 1000)

    throughput: dict[str, float] = {}
    total = max(requests, concurrency * 20)
    for name, call in paths.items():
        remaining = total

        async def worker(call: Callable[[], Awaitable[None]] = call) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await call()

        begin = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        throughput[name] = total / (time.perf_counter() - begin)

    floor_p50 = percentile(samples["redis GET (floor)"], 0.5)
    floor_rps = throughput["redis GET (floor)"]
    print(f"\ncache-hit latency: {requests} sequential requests per path, interleaved; "
          f"throughput: {total} requests at concurrency {concurrency}")  # fmt: skip
    print(f"{'path':<20}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'p50/floor':>11}{'req/s vs floor':>16}")
    for name in paths:
        p50, p99 = percentile(samples[name], 0.5), percentile(samples[name], 0.99)
        print(
            f"{name:<20}{p50:>9.2f}{p99:>9.2f}{throughput[name]:>9.0f}"
            f"{p50 / floor_p50:>10.1f}x{throughput[name] / floor_rps:>15.2f}x"
        )
    median = {name: percentile(values, 0.5) for name, values in samples.items()}
    print("\nwhere a hit's time goes (differences of p50s):")
    print(f"  cache service over its Redis GET        {median['cache Lookup'] - median['redis GET (floor)']:6.2f} ms")
    print(f"  gateway over Prepare + Lookup            "
          f"{median['gateway gRPC'] - median['router Prepare'] - median['cache Lookup']:6.2f} ms"
          " (auth in Redis, validation, replay, its own gRPC hop)")  # fmt: skip
    print(f"  router Prepare (on every request)        {median['router Prepare']:6.2f} ms")
    print(f"  Envoy hop (gRPC)                         {median['envoy gRPC'] - median['gateway gRPC']:6.2f} ms")
    print(f"  Envoy HTTP/JSON over Envoy gRPC          {median['envoy HTTP'] - median['envoy gRPC']:6.2f} ms")
    goal = "met" if median["envoy gRPC"] < 5.0 else "NOT met"
    print(f"goal (hit p50 < 5 ms through the whole mesh, gRPC): {goal}; HTTP/JSON p50 {median['envoy HTTP']:.2f} ms")

    await http.aclose()
    for channel in (envoy, gateway, cache, router):
        await channel.close()
    await redis.aclose()


def semantic() -> None:
    from cache_service.config import CacheSettings
    from cache_service.embedding import MiniLMEncoder
    from cache_service.evaluation import THRESHOLDS, choose_threshold, guarded, load_pairs, similarities, table

    pairs = load_pairs()
    encoder = MiniLMEncoder.from_wheel()
    begin = time.perf_counter()
    raw = similarities(pairs, encoder.encode)
    texts = len({t for p in pairs for t in (p.a, p.b)})
    elapsed = time.perf_counter() - begin
    sims = {"cosine only": raw, "cosine + lexical guard (served)": guarded(pairs, raw)}
    same = sum(p.same for p in pairs)
    print(f"\n{len(pairs)} labelled pairs ({same} paraphrases, {len(pairs) - same} look-alikes); "
          f"{texts} questions embedded in {elapsed:.1f} s "
          f"({elapsed / texts * 1000:.1f} ms each, batches of 64)")  # fmt: skip
    for label, values in sims.items():
        print(f"\n{label}: all pairs | calibrate half | holdout half")
        print(f"{'thr':>5} {'prec':>6} {'recall':>7} {'false-hit':>10} | {'prec':>6} {'recall':>7} {'false-hit':>10} |"
              f" {'prec':>6} {'recall':>7} {'false-hit':>10}")  # fmt: skip
        split_rows = {}
        for split in ("all", "calibrate", "holdout"):
            idx = [i for i, p in enumerate(pairs) if split == "all" or p.split == split]
            split_rows[split] = table([pairs[i] for i in idx], values[idx], THRESHOLDS)
        for a, c, h in zip(split_rows["all"], split_rows["calibrate"], split_rows["holdout"], strict=True):
            if a.threshold < 0.80:
                continue
            print(
                f"{a.threshold:>5.2f} {a.precision:>6.3f} {a.recall:>7.3f} {a.false_hit_rate:>9.1%} |"
                f" {c.precision:>6.3f} {c.recall:>7.3f} {c.false_hit_rate:>9.1%} |"
                f" {h.precision:>6.3f} {h.recall:>7.3f} {h.false_hit_rate:>9.1%}"
            )
        chosen = choose_threshold(split_rows["calibrate"])
        print(f"threshold picked on the calibrate half (false-hit rate < 1%): {chosen}")
    print(f"shipped default: semantic_threshold = {CacheSettings().semantic_threshold} (0 = off)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", choices=["all", "latency", "semantic"], default="all")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if args.part in ("all", "semantic"):
        semantic()
    if args.part in ("all", "latency"):
        with tempfile.TemporaryDirectory() as tmp:
            mesh, redis_proc = start_mesh(Path(tmp))
            try:
                asyncio.run(latency(mesh, args.requests, args.concurrency))
            finally:
                mesh.stop()
                redis_proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
