"""Router against real Triton replicas: a replica SIGKILLed under load loses no request that had not started
streaming, is ejected, and is re-admitted once restarted; a flooded large pool sheds `auto` requests to a smaller
variant whose first token stays inside the latency budget."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest

from control.process import ManagedProcess, free_port, grpc_health_probe
from llmesh.types import Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc
from tests.fixtures.mesh import RunningMesh
from tests.fixtures.router import RouterProcess, start_router, triton_replica, variant_repository

VARIANT = "smollm2-135m"
QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 2 plus 2?", "Say hello."]


def generate_request(
    question: str, max_tokens: int, tier: common_pb2.Tier = common_pb2.TIER_PAID, model: str = "auto"
) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(
        request_id=f"t-{time.monotonic_ns()}",
        tier=tier,
        model=model,
        messages=[common_pb2.ChatMessage(role="user", content=question)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
    )


async def one_request(
    stub: router_pb2_grpc.RouterServiceStub, request: router_pb2.GenerateRequest
) -> tuple[str, bool, float | None, str]:
    """(outcome, streamed before the outcome, seconds to first token, variant)."""
    started, first, variant = False, None, ""
    begin = time.monotonic()
    try:
        async for chunk in stub.Generate(request, timeout=90):
            if chunk.HasField("route"):
                variant = chunk.route.variant
            if chunk.delta and not started:
                started, first = True, time.monotonic() - begin
        return "ok", started, first, variant
    except grpc.aio.AioRpcError as err:
        return err.code().name, started, first, variant


def wait_for_metric(router: RouterProcess, name: str, value: float, timeout: float, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if router.metric(name, **labels) == value:
            return
        time.sleep(0.25)
    raise AssertionError(f"{name}{labels} never became {value} (last {router.metric(name, **labels)})")


def test_sigkilled_replica_loses_no_unstarted_request_and_is_readmitted(model_repository: Path, tmp_path: Path) -> None:
    a = triton_replica(model_repository, tmp_path, "triton-a").start([VARIANT])
    b = triton_replica(model_repository, tmp_path, "triton-b").start([VARIANT])
    router = start_router([a.grpc_url, b.grpc_url], model_repository, tmp_path)
    try:
        outcomes = asyncio.run(_load_with_kill(router.target, b, kill_after_s=3.0, total_s=8.0))
        assert len(outcomes) >= 8, outcomes
        lost = [o for o in outcomes if o[0] != "ok" and not o[1]]
        assert not lost, f"requests failed before streaming anything: {lost}"
        broken = [o for o in outcomes if o[0] != "ok"]
        assert all(o[0] == "UNAVAILABLE" for o in broken), broken
        wait_for_metric(router, "llmesh_router_replica_healthy", 0.0, 10, replica=b.grpc_url)
        assert router.metric("llmesh_router_replica_healthy", replica=a.grpc_url) == 1.0

        b.start([VARIANT])
        wait_for_metric(router, "llmesh_router_replica_healthy", 1.0, 30, replica=b.grpc_url)
        label = {"variant": VARIANT, "replica": b.grpc_url}
        before = router.metric("llmesh_router_ttft_seconds_count", **label) or 0.0
        after_restart = asyncio.run(_burst(router.target, 6))
        assert all(o[0] == "ok" for o in after_restart), after_restart
        assert (router.metric("llmesh_router_ttft_seconds_count", **label) or 0.0) > before, "b got no work back"
    finally:
        router.process.stop()
        a.process.stop()
        b.process.stop()


async def _burst(target: str, n: int) -> list[tuple[str, bool, float | None, str]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        requests = [generate_request(QUESTIONS[i % 4], 8, model=VARIANT) for i in range(n)]
        return list(await asyncio.gather(*(one_request(stub, request) for request in requests)))


async def _load_with_kill(
    target: str, victim, kill_after_s: float, total_s: float
) -> list[tuple[str, bool, float | None, str]]:  # type: ignore[no-untyped-def]
    outcomes: list[tuple[str, bool, float | None, str]] = []
    stop = time.monotonic() + total_s

    async with grpc.aio.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def worker(index: int) -> None:
            while time.monotonic() < stop:
                # Pinned, so every request stays on VARIANT and only replica failover is exercised.
                outcomes.append(await one_request(stub, generate_request(QUESTIONS[index % 4], 24, model=VARIANT)))

        async def killer() -> None:
            await asyncio.sleep(kill_after_s)
            os.killpg(victim.process.pid, signal.SIGKILL)

        # No request may hang: the whole run is bounded.
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(4)), killer()), timeout=total_s + 120)
    return outcomes


def test_flooded_large_pool_degrades_auto_requests(model_repository: Path, tmp_path: Path) -> None:
    repository = variant_repository(model_repository, tmp_path / "repo", ["small", "large"])
    policy = tmp_path / "policy.toml"
    # Paid goes to "large" by default; shed load once large's first-token p95 reaches 0.5 s of the 2 s budget.
    policy.write_text(
        '[variants]\norder = ["small", "large"]\n[tiers.paid]\ndefault = "large"\n'
        "[complexity]\nup = 2.0\ndown = -1.0\n[load]\nttft_budget_s = 2.0\ndegrade_at = 0.25\n"
    )
    triton = triton_replica(repository, tmp_path, "triton").start(["small", "large"])
    router = start_router([triton.grpc_url], repository, tmp_path, policy_file=policy)
    try:
        flood, probes = asyncio.run(_flood_then_probe(router))
        degraded = [p for p in probes if p[3] == "small"]
        assert probes and all(p[0] == "ok" for p in probes), probes
        assert len(degraded) >= len(probes) * 0.8, f"auto requests were not shed to the small pool: {probes}"
        first_tokens = sorted(p[2] for p in degraded if p[2] is not None)
        p95 = first_tokens[max(0, int(0.95 * len(first_tokens)) - 1)]
        assert p95 < 2.0, f"degraded requests' first-token p95 {p95:.2f}s broke the 2 s budget"
        assert all(f[0] == "ok" for f in flood), f"the pinned flood itself must still be served: {flood}"
        assert (router.metric("llmesh_router_decisions_total", tier="paid", variant="small", reason="load") or 0) > 0
    finally:
        router.process.stop()
        triton.process.stop()


async def _flood_then_probe(router: RouterProcess) -> tuple[list, list]:  # type: ignore[type-arg]
    async with grpc.aio.insecure_channel(router.target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        # Pinned requests never degrade: they pile up on "large".
        flood = [
            asyncio.create_task(one_request(stub, generate_request(QUESTIONS[i % 4] * 20, 48, model="large")))
            for i in range(16)
        ]
        deadline = time.monotonic() + 60
        while (router.metric("llmesh_router_ttft_p95_seconds", variant="large") or 0.0) < 0.5:
            assert time.monotonic() < deadline, "the flood never loaded the large pool"
            await asyncio.sleep(0.2)
        probes = []
        for i in range(5):
            probes.append(await one_request(stub, generate_request(QUESTIONS[i % 4], 8)))
        return list(await asyncio.gather(*flood)), probes


pytestmark = pytest.mark.slow


QWEN = "qwen2.5-coder-0.5b"
WEATHER_TOOL = common_pb2.Tool(
    name="get_weather",
    description="Current weather in a city",
    parameters_json=json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        }
    ),
)


async def _generate(target: str, request: router_pb2.GenerateRequest) -> list[router_pb2.GenerateChunk]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return [chunk async for chunk in stub.Generate(request, timeout=300)]


def test_qwen_tool_calls_choices_logprobs_formats_and_raw_prompts(tmp_path: Path) -> None:
    """The router's new surface against the real engine on Triton: what it sends is what python_model.py reads."""
    from triton_models.config import BuildSettings
    from triton_models.repository import ensure_model_repository

    repository = ensure_model_repository(BuildSettings(variants=(QWEN,)))
    triton = triton_replica(repository, tmp_path, "triton-qwen").start([QWEN], timeout=300)
    router = start_router([triton.grpc_url], repository, tmp_path)

    def request(max_tokens: int, **fields: object) -> router_pb2.GenerateRequest:
        sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0)
        for name, value in dict(fields.pop("sampling", {})).items():  # type: ignore[call-overload]
            setattr(sampling, name, value)
        fields.setdefault("messages", [common_pb2.ChatMessage(role="user", content="What is the weather in Paris?")])
        return router_pb2.GenerateRequest(
            request_id=f"q-{time.monotonic_ns()}", tier=common_pb2.TIER_PAID, model=QWEN, sampling=sampling,
            **fields,  # type: ignore[arg-type]
        )  # fmt: skip

    try:
        # tool_choice "required": the grammar forces calls; the router turns them into ToolCalls.
        def forced(parallel: bool) -> list[router_pb2.GenerateChunk]:
            output = common_pb2.OutputSpec(tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=parallel)
            return asyncio.run(_generate(router.target, request(48, output=output)))

        one = forced(False)
        calls = [call for chunk in one for call in chunk.tool_calls]
        assert [c.name for c in calls] == ["get_weather"], one
        assert set(json.loads(calls[0].arguments)) == {"city"}
        assert "".join(c.delta for c in one) == "" and one[-1].finish_reason == "tool_calls"
        # In parallel a greedy small model may call again and again up to max_tokens: complete calls come through,
        # a call cut short is withheld (never text), and the end says "length".
        many = forced(True)
        calls = [call for chunk in many for call in chunk.tool_calls]
        assert calls and all(c.name == "get_weather" for c in calls), many
        assert "".join(c.delta for c in many) == ""
        assert many[-1].finish_reason in ("tool_calls", "length")

        # n = 2 with logprobs: each choice ends on its own; usage counts both.
        sampled = request(6, sampling={"n": 2, "logprobs": True, "top_logprobs": 2, "temperature": 1.0, "seed": 7})
        chunks = asyncio.run(_generate(router.target, sampled))
        ends = sorted(c.index for c in chunks if c.finish_reason)
        assert ends == [0, 1], chunks
        shown = [lp for c in chunks for lp in c.logprobs]
        assert shown and all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in shown)
        for index in (0, 1):
            text = "".join(c.delta for c in chunks if c.index == index)
            logprob_bytes = b"".join(lp.bytes for c in chunks if c.index == index for lp in c.logprobs)
            assert logprob_bytes.decode("utf-8", errors="replace") == text
        assert chunks[-1].usage.completion_tokens == len(shown)  # every token shows, with its logprob

        # response_format json_object: the answer is a JSON object.
        as_json = asyncio.run(
            _generate(router.target, request(48, output=common_pb2.OutputSpec(response_format="json_object")))
        )
        if as_json[-1].finish_reason == "stop":
            assert isinstance(json.loads("".join(c.delta for c in as_json)), dict)

        # A raw completion prompt is continued as it is.
        raw = asyncio.run(_generate(router.target, request(8, messages=[], prompt="def add(a, b):\n    return")))
        assert raw[-1].finish_reason in ("stop", "length") and "".join(c.delta for c in raw)
        assert raw[-1].usage.prompt_tokens < 16  # no chat template around it
    finally:
        router.process.stop()
        triton.process.stop()


def test_router_drains_on_sigterm(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM mid-stream: new work is refused at once, the stream in flight runs to its end, the process exits 0."""
    router = start_router([triton_server.grpc_url], triton_server.model_repository, tmp_path)
    try:

        async def scenario() -> tuple[list[router_pb2.GenerateChunk], str]:
            async with grpc.aio.insecure_channel(router.target) as channel:
                stub = router_pb2_grpc.RouterServiceStub(channel)
                stream = stub.Generate(generate_request("Count from one to fifty in words.", 96), timeout=90)
                chunks = [await stream.read()]
                assert router.process.popen is not None
                router.process.popen.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                refused = await one_request(stub, generate_request("Say hello.", 4))
                while (chunk := await stream.read()) is not grpc.aio.EOF:
                    chunks.append(chunk)
                return chunks, refused[0]

        chunks, refused = asyncio.run(scenario())
        assert refused == "UNAVAILABLE", "a draining router took new work"
        assert chunks[-1].finish_reason in ("stop", "length"), "the stream in flight was cut"
        assert sum(len(c.delta) for c in chunks) > 0
        assert router.process.popen is not None and router.process.popen.wait(timeout=30) == 0
    finally:
        router.process.stop()


HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def test_a_gateway_spreads_its_calls_over_every_router_its_target_names(  # type: ignore[no-untyped-def]
    triton_server, mesh: RunningMesh, tmp_path: Path
) -> None:
    """Three routers on one port of three addresses, one gateway whose router target names them all (as a headless
    Service's DNS name does in Kubernetes): calls go to all, not to the first it connected to. Three, because each
    request is two calls (Prepare, Generate): over two routers, strict alternation would send every Generate (where
    decisions are counted) to the same one."""
    port = free_port()
    routers = [
        start_router([triton_server.grpc_url], triton_server.model_repository, tmp_path, host=host, port=port)
        for host in HOSTS
    ]
    gateway_port = free_port()
    argv = [
        sys.executable, "-m", "gateway", "--port", str(gateway_port),
        "--router-url", "ipv4:" + ",".join(f"{host}:{port}" for host in HOSTS),
        "--redis-url", mesh.redis_url, "--limiter-url", "", "--cache-url", "", "--metrics-port", "0",
    ]  # fmt: skip
    gateway = ManagedProcess("gateway-rr", argv, tmp_path / "gateway.log").start()
    try:
        gateway.wait_ready(grpc_health_probe(f"127.0.0.1:{gateway_port}"), timeout=60)
        metadata = [("authorization", f"Bearer {mesh.create_key(Tier.PAID)}")]
        with grpc.insecure_channel(f"127.0.0.1:{gateway_port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            for i in range(9):
                request = chat_pb2.ChatCompletionRequest(
                    messages=[common_pb2.ChatMessage(role="user", content=f"Say {i}.")], max_tokens=2
                )
                stub.CreateChatCompletion(request, metadata=metadata, timeout=60)
        routed = [
            sum(
                router.metric("llmesh_router_decisions_total", tier="paid", variant=v, reason=r) or 0.0
                for v in ("smollm2-135m", "smollm2-135m-int8")
                for r in ("default", "complexity", "load", "fallback", "pinned")
            )
            for router in routers
        ]
        assert sum(routed) == 9 and min(routed) >= 1, f"generations per router: {routed}"
    finally:
        gateway.stop()
        for router in routers:
            router.process.stop()
