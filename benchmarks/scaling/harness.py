"""A mesh of the scaling benchmarks' own: temp state dir, free ports, its own redis-servers (one for keys and quotas,
one for the response cache, so each part's Redis work is counted apart), the smallest variant; plus the counters
the benchmarks read (process CPU from /proc, Redis INFO) and an OpenAI-JSON client through Envoy."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from control.launcher import Mesh, MeshSettings, redis_answers
from control.process import ManagedProcess, free_port
from llmesh.apikeys import CREATED, KEY_PREFIX, NOTE, REDIS_KEY, TIER, hash_key
from llmesh.minilm import EMBEDDING_MODEL
from llmesh.types import Tier

VARIANT = "smollm2-135m-int8"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_SHIPPED_POLICY = Path(__file__).resolve().parents[2] / "limiter_service" / "policy.toml"
# Free keys: one request an hour, so the second is refused by quota. Paid keys and the edge: limits far above what a
# benchmark sends, but still limits, so every request still runs the limiter's Redis scripts as in production.
_POLICY_EDITS = {
    "[tiers.free]\nrequests_per_hour = 20\n": "[tiers.free]\nrequests_per_hour = 1\n",
    "requests_per_hour = 2000\n": "requests_per_hour = 100000000\n",
    "burst_per_minute = 200\n": "burst_per_minute = 10000000\n",
    "tokens_per_hour = 2000000\n": "tokens_per_hour = 100000000000\n",
    "per_ip_per_minute = 1200": "per_ip_per_minute = 10000000",
    "per_key_per_minute = 600": "per_key_per_minute = 10000000",
}


def write_policy(path: Path) -> Path:
    text = _SHIPPED_POLICY.read_text()
    for old, new in _POLICY_EDITS.items():
        if old not in text:
            raise RuntimeError(f"limiter_service/policy.toml changed: {old!r} not found; update _POLICY_EDITS")
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def start_redis(state: Path, name: str) -> tuple[ManagedProcess, str]:
    """A redis-server of our own on a free loopback port, no persistence; waits until it answers."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = ManagedProcess(name, [*argv, "--dir", str(state)], state / f"{name}.log").start()
    deadline = time.monotonic() + 20
    while not redis_answers(url):
        if time.monotonic() > deadline or not proc.alive():
            proc.stop()
            raise RuntimeError(f"{name} did not start; see {state / (name + '.log')}")
        time.sleep(0.05)
    return proc, url


@dataclass
class ScalingMesh:
    mesh: Mesh
    redis_url: str
    cache_redis_url: str
    redis_procs: list[ManagedProcess] = field(default_factory=list)

    @property
    def settings(self) -> MeshSettings:
        return self.mesh.settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    def pids(self) -> dict[str, int]:
        """Mesh part -> pid, from <state dir>/services.json (what `llmesh top` reads), plus our redis-servers."""
        services = json.loads((self.mesh.state_dir / "services.json").read_text())
        pids = {name: int(info["pid"]) for name, info in services.items() if info.get("pid")}
        for proc in self.redis_procs:
            if proc.pid is not None:
                pids[proc.name] = proc.pid
        return pids

    def create_key(self, tier: Tier, note: str) -> str:
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        client = redis.Redis.from_url(self.redis_url)
        try:
            client.hset(
                REDIS_KEY.format(digest=hash_key(api_key)),
                mapping={TIER: tier.value, CREATED: str(int(time.time())), NOTE: note},
            )
        finally:
            client.close()
        return api_key


@contextlib.contextmanager
def scaling_mesh(cache_enabled: bool = True, log_level: str = "warning") -> Iterator[ScalingMesh]:
    """The whole mesh (Envoy, gateway, router, limiter, cache, one tritonserver) with the smallest variant; stopped
    and its redis-servers killed on exit."""
    with tempfile.TemporaryDirectory(prefix="llmesh-scaling-") as tmp:
        state = Path(tmp)
        procs: list[ManagedProcess] = []
        mesh: Mesh | None = None
        try:
            main_proc, main_url = start_redis(state, "redis-main")
            procs.append(main_proc)
            cache_proc, cache_url = start_redis(state, "redis-cache")
            procs.append(cache_proc)
            settings = MeshSettings.on_free_ports(
                limiter_policy_file=write_policy(state / "policy.toml"),
                redis_url=main_url,
                cache_redis_url=cache_url,
                cache_enabled=cache_enabled,
                variants=(VARIANT,),
                state_dir=state,
                startup_timeout_s=600,
                log_level=log_level,
            )
            mesh = Mesh(settings)
            mesh.start()
            yield ScalingMesh(mesh, main_url, cache_url, procs)
        finally:
            if mesh is not None:
                mesh.stop()
            for proc in procs:
                proc.stop()


# ---- counters ---------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def process_tree_cpu_s(pid: int) -> float:
    """utime + stime of `pid` and its live descendants (Triton's python-backend stubs are children), in seconds."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        total += int(fields[11]) + int(fields[12])
        stack += _children(p)
    return total / _CLK_TCK


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    return {name: process_tree_cpu_s(pid) for name, pid in pids.items()}


def redis_server_cpu_s(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Command -> calls since start (Redis counts commands run inside scripts too)."""
    info: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


# ---- client -----------------------------------------------------------------------------------------------------


def chat_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": VARIANT,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


@dataclass(frozen=True)
class Answer:
    status: int
    cache: str
    completion_tokens: int


async def chat(http: httpx.AsyncClient, key: str, prompt: str, max_tokens: int, stream: bool) -> Answer:
    """POST /v1/chat/completions through Envoy; streaming reads the whole SSE stream."""
    headers = {"authorization": f"Bearer {key}"}
    body = chat_body(prompt, max_tokens, stream)
    if not stream:
        reply = await http.post("/v1/chat/completions", json=body, headers=headers)
        if reply.status_code != 200:
            return Answer(reply.status_code, "", 0)
        data = reply.json()
        return Answer(200, str(data.get("llmesh_cache") or ""), int(data.get("usage", {}).get("completion_tokens", 0)))
    cache, tokens = "", 0
    body["stream_options"] = {"include_usage": True}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return Answer(reply.status_code, "", 0)
        async for line in reply.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            cache = str(event.get("llmesh_cache") or cache)
            usage = event.get("usage")
            if isinstance(usage, dict):
                tokens = int(usage.get("completion_tokens", 0))
    return Answer(200, cache, tokens)


async def embed(http: httpx.AsyncClient, key: str, text: str) -> Answer:
    reply = await http.post(
        "/v1/embeddings",
        json={"model": EMBEDDING_MODEL, "input": text},
        headers={"authorization": f"Bearer {key}"},
    )
    return Answer(reply.status_code, "", 0)


def client(base_url: str, concurrency: int = 8) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=300,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
