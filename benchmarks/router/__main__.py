"""Overhead of the router hop: the same requests sent straight to Triton and through the router, interleaved.

    .venv/bin/python -m benchmarks.router [--requests 200] [--max-tokens 1]

Both paths use the same Triton client code; the router path adds a gRPC hop, routing, chat templating,
tokenization and detokenization. Prints p50/p99 of time to first token and to the end, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from control.process import ManagedProcess, free_ports, grpc_health_probe, http_ok_probe
from llmesh.model_artifact import ChatTokenizer
from llmesh.paths import cache_dir
from llmesh.types import SamplingParams, Tier
from llmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.triton_client import TritonReplica
from triton_models.config import BuildSettings
from triton_models.repository import ensure_model_repository
from triton_models.runtime import prepare_backend_dir, tritonserver_command

QUESTION = "What is the capital of France?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def direct(replica: TritonReplica, variant: str, input_ids: list[int], max_tokens: int) -> tuple[float, float]:
    begin = time.perf_counter()
    first = None
    async for _chunk in replica.stream(variant, "bench", input_ids, SamplingParams(max_tokens, 0.0), Tier.PAID):
        first = first or time.perf_counter() - begin
    return first or 0.0, time.perf_counter() - begin


async def routed(stub: router_pb2_grpc.RouterServiceStub, max_tokens: int) -> tuple[float, float]:
    request = router_pb2.GenerateRequest(
        request_id="bench",
        tier=common_pb2.TIER_PAID,
        model="auto",
        messages=[common_pb2.ChatMessage(role="user", content=QUESTION)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
    )
    begin = time.perf_counter()
    first = None
    async for chunk in stub.Generate(request):
        if chunk.delta or chunk.finish_reason:
            first = first or time.perf_counter() - begin
    return first or 0.0, time.perf_counter() - begin


async def run(triton_url: str, router_target: str, variant: str, version_dir: Path, n: int, max_tokens: int) -> None:
    tokenizer = ChatTokenizer.from_model_dir(version_dir)
    input_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}]))
    replica = TritonReplica(triton_url, 60)
    results: dict[str, list[tuple[float, float]]] = {"triton direct": [], "via router": []}
    async with grpc.aio.insecure_channel(router_target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for _ in range(5):  # warm both paths
            await direct(replica, variant, input_ids, max_tokens)
            await routed(stub, max_tokens)
        for _ in range(n):  # interleaved, so machine noise hits both alike
            results["triton direct"].append(await direct(replica, variant, input_ids, max_tokens))
            results["via router"].append(await routed(stub, max_tokens))
    await replica.close()
    print(f"\n{n} sequential requests each, max_tokens={max_tokens}, interleaved (ms)")
    print(f"{'path':<15}{'first p50':>11}{'first p99':>11}{'total p50':>11}{'total p99':>11}")
    summary = {}
    for path, samples in results.items():
        firsts = [f * 1000 for f, _ in samples]
        totals = [t * 1000 for _, t in samples]
        summary[path] = (percentile(firsts, 0.5), percentile(firsts, 0.99), percentile(totals, 0.5))
        print(
            f"{path:<15}{summary[path][0]:>11.2f}{summary[path][1]:>11.2f}"
            f"{statistics.median(totals):>11.2f}{percentile(totals, 0.99):>11.2f}"
        )
    d, r = summary["triton direct"], summary["via router"]
    print(f"router hop overhead: p50 +{r[0] - d[0]:.2f} ms ({r[0] / d[0]:.2f}x), p99 +{r[1] - d[1]:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=1)
    args = parser.parse_args(argv)
    settings = BuildSettings()
    repository = ensure_model_repository(settings)
    with tempfile.TemporaryDirectory() as tmp:
        grpc_port, http_port, metrics_port, router_port = free_ports(4)
        argv_, env = tritonserver_command(
            repository, grpc_port, http_port, metrics_port, prepare_backend_dir(cache_dir())
        )
        triton = ManagedProcess("tritonserver", argv_, Path(tmp) / "triton.log", env=env).start()
        router = None
        try:
            triton.wait_ready(http_ok_probe(f"http://127.0.0.1:{http_port}/v2/health/ready"), timeout=180)
            router = ManagedProcess(
                "router",
                [sys.executable, "-m", "router", "--port", str(router_port), "--triton-url", f"127.0.0.1:{grpc_port}",
                 "--model-repository", str(repository), "--log-level", "warning"],
                Path(tmp) / "router.log",
            ).start()  # fmt: skip
            router.wait_ready(grpc_health_probe(f"127.0.0.1:{router_port}"), timeout=60)
            asyncio.run(
                run(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{router_port}", settings.variant,
                    repository / settings.variant / "1", args.requests, args.max_tokens)
            )  # fmt: skip
        finally:
            if router is not None:
                router.stop()
            triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
