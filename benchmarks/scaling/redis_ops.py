"""Redis commands per request, by request kind and by the part of the mesh that sent them.

    .venv/bin/python -m benchmarks.scaling.redis_ops [--repeat 10] [--max-tokens 16]

Starts a mesh of its own (benchmarks/scaling/harness.py: one Redis for API keys and quotas, another for the
response cache) and sends each kind of request `--repeat` times through Envoy (OpenAI JSON), one at a time, with a
pause after each so the gateway's background Settle and Store land inside the request's window. Redis MONITOR on
both servers records every command; each is attributed by its server and key:

  auth      llmesh:apikey:*          (the gateway's key lookups; keys are cached per gateway for 10 s)
  edge      llmesh:quota:{edge:*}    (Envoy's rate-limit call: per-IP and per-key windows)
  quota     llmesh:quota:{other}     (the gateway's Reserve / Settle)
  cache     anything on the cache's Redis
  other     commands without a llmesh key (PING, INFO, ...: health checks and probes, not per request)

"calls" are the commands clients send (round trips); "in Lua" are the commands the scripts run inside Redis.
A cross-check from INFO commandstats (which counts both) is printed per kind.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import redis

from benchmarks.scaling.harness import Answer, ScalingMesh, chat, client, commandstats, embed, scaling_mesh
from llmesh.types import Tier

PARTS = ("auth", "edge", "quota", "cache", "other")


def script_names() -> dict[str, str]:
    """SHA1 -> name of every Lua script the mesh's Redis clients send (module-level strings that call Redis)."""
    import cache_service.store
    import gateway.auth
    import limiter_service.redis_store

    names = {}
    for module in (gateway.auth, cache_service.store, limiter_service.redis_store):
        for attr, value in vars(module).items():
            if isinstance(value, str) and "redis.call" in value:
                short = module.__name__.split(".")[0].removesuffix("_service")
                names[hashlib.sha1(value.encode()).hexdigest()] = (
                    f"{short}.{attr.strip('_').removesuffix('_LUA').lower()}"
                )
    return names


SCRIPTS = script_names()
_LINE = re.compile(r"^\+?[\d.]+ \[\d+ ([^\]]+)\] (.*)$")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass
class Command:
    server: str  # "main" or "cache"
    lua: bool
    name: str
    args: list[str]

    @property
    def label(self) -> str:
        """COMMAND, or the script's name for EVALSHA."""
        if self.name == "EVALSHA" and self.args:
            return SCRIPTS.get(self.args[0], "EVALSHA")
        return self.name

    @property
    def part(self) -> str:
        key = next((a for a in self.args if a.startswith("llmesh:")), "")
        if self.server == "cache":
            return "cache" if key or self.name in ("EVALSHA", "EVAL", "PUBLISH") else "other"
        if key.startswith("llmesh:apikey:"):
            return "auth"
        if key.startswith("llmesh:quota:{edge:"):
            return "edge"
        if key.startswith("llmesh:quota:"):
            return "quota"
        return "other"


def parse(server: str, line: str) -> Command | None:
    match = _LINE.match(line)
    if match is None:
        return None
    args = _ARG.findall(match.group(2))
    if not args:
        return None
    return Command(server, match.group(1) == "lua", args[0].upper(), args[1:])


@dataclass
class Monitor:
    """MONITOR on one Redis, in a thread, over a raw socket (redis-py's monitor blocks without a way out)."""

    server: str
    url: str
    commands: list[Command] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        url = urlparse(self.url)
        sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
        sock.sendall(b"MONITOR\r\n")
        sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self._thread.start()

    def _run(self, sock: socket.socket) -> None:
        buffer = b""
        with sock:
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                buffer += data
                *lines, buffer = buffer.split(b"\r\n")
                for raw in lines:
                    command = parse(self.server, raw.decode(errors="replace"))
                    if command is not None:
                        self.commands.append(command)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@dataclass
class Tally:
    calls: Counter[str] = field(default_factory=Counter)  # part -> client commands
    lua: Counter[str] = field(default_factory=Counter)  # part -> commands inside scripts
    names: Counter[str] = field(default_factory=Counter)  # "part:COMMAND" of client commands
    stats: int = 0  # commandstats delta, both servers


def tally(commands: list[Command]) -> Tally:
    t = Tally()
    for c in commands:
        (t.lua if c.lua else t.calls)[c.part] += 1
        if not c.lua:
            t.names[f"{c.part}:{c.label}"] += 1
    return t


class Recorder:
    def __init__(self, mesh: ScalingMesh) -> None:
        self.monitors = [Monitor("main", mesh.redis_url), Monitor("cache", mesh.cache_redis_url)]
        self.clients = [redis.Redis.from_url(mesh.redis_url), redis.Redis.from_url(mesh.cache_redis_url)]

    def __enter__(self) -> Recorder:
        for m in self.monitors:
            m.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.monitors:
            m.stop()
        for c in self.clients:
            c.close()

    def mark(self) -> tuple[list[int], int]:
        stats = sum(sum(commandstats(c).values()) for c in self.clients)
        return [len(m.commands) for m in self.monitors], stats

    def since(self, mark: tuple[list[int], int]) -> Tally:
        # INFO itself is one command per server, counted by commandstats on the next read: subtract ours.
        stats = sum(sum(commandstats(c).values()) for c in self.clients) - mark[1] - len(self.clients)
        commands = [c for m, n in zip(self.monitors, mark[0], strict=True) for c in m.commands[n:]]
        t = tally([c for c in commands if c.name not in ("INFO", "MONITOR", "HELLO", "CLIENT")])
        t.stats = stats
        return t


async def measure(
    recorder: Recorder,
    name: str,
    send: object,
    repeat: int,
    settle_s: float,
    results: dict[str, tuple[Tally, int, list[Answer]]],
) -> None:
    assert callable(send)
    mark = recorder.mark()
    answers = []
    for i in range(repeat):
        answers.append(await send(i))
        await asyncio.sleep(settle_s)
    results[name] = (recorder.since(mark), repeat, answers)


async def run(
    mesh: ScalingMesh, repeat: int, max_tokens: int, settle_s: float
) -> dict[str, tuple[Tally, int, list[Answer]]]:
    paid = mesh.create_key(Tier.PAID, "scaling redis_ops")
    http = client(mesh.base_url)
    tag = uuid.uuid4().hex[:8]

    def prompt(kind: str, i: int) -> str:
        return f"[{tag}-{kind}-{i}] Name one colour of the rainbow and say why you like it."

    # Warm: the key is in the gateway's key cache, connections and scripts are loaded.
    for i in range(3):
        await chat(http, paid, prompt("warm", i), max_tokens, stream=False)
    hit_prompt = prompt("hit", 0)
    first = await chat(http, paid, hit_prompt, max_tokens, stream=False)
    assert first.status == 200, first
    results: dict[str, tuple[Tally, int, list[Answer]]] = {}
    with Recorder(mesh) as rec:
        await measure(rec, "idle (no requests)", lambda i: asyncio.sleep(0), repeat, settle_s, results)
        await measure(
            rec, "miss, non-streaming", lambda i: chat(http, paid, prompt("miss", i), max_tokens, False),
            repeat, settle_s, results,
        )  # fmt: skip
        await measure(
            rec, "miss, streaming", lambda i: chat(http, paid, prompt("stream", i), max_tokens, True),
            repeat, settle_s, results,
        )  # fmt: skip
        await measure(
            rec, "hit (exact), non-streaming", lambda i: chat(http, paid, hit_prompt, max_tokens, False),
            repeat, settle_s, results,
        )  # fmt: skip
        await measure(
            rec, "hit (exact), streaming", lambda i: chat(http, paid, hit_prompt, max_tokens, True),
            repeat, settle_s, results,
        )  # fmt: skip
        await measure(
            rec, "embeddings (1 input)", lambda i: embed(http, paid, prompt("embed", i)), repeat, settle_s, results
        )

        # A new key per request: the gateway's key cache is cold (first request of a key in 10 s on this gateway).
        # Created before the window, so the benchmark's own HSETs are not counted.
        cold = [mesh.create_key(Tier.PAID, f"cold {i}") for i in range(repeat)]
        await asyncio.sleep(0.5)

        async def cold_key_miss(i: int) -> Answer:
            return await chat(http, cold[i], prompt("cold", i), max_tokens, False)

        await measure(rec, "miss, key not in gateway cache", cold_key_miss, repeat, settle_s, results)

        # Free keys may send one request an hour (harness policy): the second is refused by the limiter.
        free = [mesh.create_key(Tier.FREE, f"refused {i}") for i in range(repeat)]
        for i, key in enumerate(free):
            await chat(http, key, prompt("free", i), max_tokens, False)
        await asyncio.sleep(1.2)  # past the gateway's refusal memory (1 s)

        async def refused(i: int) -> Answer:
            return await chat(http, free[i], prompt("refused", i), max_tokens, False)

        await measure(rec, "refused by quota (limiter asked)", refused, repeat, max(settle_s, 1.2), results)

        async def refused_again(i: int) -> Answer:
            return await chat(http, free[0], prompt("again", i), max_tokens, False)

        await refused_again(0)
        await measure(rec, "refused again within 1 s (gateway memory)", refused_again, repeat, 0.05, results)
    await http.aclose()
    return results


def report(results: dict[str, tuple[Tally, int, list[Answer]]]) -> None:
    print("\nRedis commands per request (client calls + commands inside Lua scripts), by part")
    head = f"{'request kind':<44}{'status':>8}" + "".join(f"{p:>12}" for p in PARTS) + f"{'total':>12}{'INFO':>8}"
    print(head)
    for name, (t, n, answers) in results.items():
        statuses = Counter(a.status for a in answers if isinstance(a, Answer))
        status = ",".join(str(s) for s in sorted(statuses)) if answers and statuses else "-"
        cells = "".join(f"{t.calls[p] / n:>6.1f} +{t.lua[p] / n:>4.1f}" for p in PARTS)
        total_calls = sum(t.calls[p] for p in PARTS if p != "other") / n
        total_lua = sum(t.lua[p] for p in PARTS if p != "other") / n
        print(f"{name:<44}{status:>8}{cells}{total_calls:>6.1f} +{total_lua:>4.1f}{t.stats / n:>8.1f}")
    print("\ncolumns: calls + in-Lua per request; total excludes 'other'; INFO = commandstats delta per request "
          "(both servers, all commands incl. 'other' and in-Lua)")  # fmt: skip
    print("\nclient calls per request, by part and command:")
    for name, (t, n, _) in results.items():
        calls = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(t.names.items()))
        print(f"  {name}: {calls or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--settle-s", type=float, default=0.5, help="pause after each request")
    args = parser.parse_args()
    with scaling_mesh() as mesh:
        results = asyncio.run(run(mesh, args.repeat, args.max_tokens, args.settle_s))
    report(results)


if __name__ == "__main__":
    main()
