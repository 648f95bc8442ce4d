"""Supervision in `llmesh up`: a SIGKILLed Triton replica is restarted while the router fails over and the mesh stays
up; `llmesh status` shows it; nothing the launcher started (tritonserver's python-backend stubs included) outlives a
SIGKILLed launcher."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from control.launcher import MeshSettings
from llmesh.settings import to_argv
from llmesh.types import Tier
from tests.fixtures.processes import Proc, descendants, kill_leftovers, wait_all_gone, wait_for_line

VARIANT = "smollm2-135m"


# ---- children die with their parent ----------------------------------------------------------------------------

PARENT = """
import sys, time
from pathlib import Path
from control.process import Guardian, ManagedProcess
logs = Path(sys.argv[1])
guardian = Guardian(logs / "guardian.log").start()
# A child with children of its own (as tritonserver has its stubs), watched by the guardian.
ManagedProcess("tree", ["bash", "-c", "sleep 300 & sleep 300 & wait"], logs / "tree.log", guardian=guardian).start()
# A child with only the parent-death signal.
ManagedProcess("plain", ["sleep", "300"], logs / "plain.log").start()
print("started", flush=True)
time.sleep(300)
"""


def test_children_and_their_children_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    out = tmp_path / "parent.out"
    with out.open("wb") as sink:
        parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=sink, stderr=subprocess.STDOUT)
    tree: dict[int, Proc] = {}
    try:
        wait_for_line(out, "started", parent, timeout=60)
        # guardian (python), bash, its two sleeps, the plain sleep.
        deadline = time.monotonic() + 30
        while len(tree := descendants(parent.pid)) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        # "python" or "python3": children are started through setpriv, which execs the interpreter by its own path.
        names = sorted(p.name.rstrip("0123456789.") for p in tree.values())
        assert names == ["bash", "python", "sleep", "sleep", "sleep"], tree
        parent.kill()
        parent.wait()
        left = wait_all_gone(tree, timeout=15)
        assert not left, f"outlived their SIGKILLed parent: {[(p, tree[p].name) for p in left]}"
        assert "killed process group" in (tmp_path / "guardian.log").read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
        kill_leftovers(tree)


# ---- a replica killed under load -------------------------------------------------------------------------------


@dataclass
class Outcome:
    start: float
    end: float
    status: int  # HTTP status; 0 for a transport error


def launch(argv: list[str], out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "control.cli", *argv], stdout=sink, stderr=subprocess.STDOUT, env={**os.environ}
        )


def llmesh_status(state: Path) -> tuple[int, dict]:  # type: ignore[type-arg]
    done = subprocess.run(
        [sys.executable, "-m", "control.cli", "status", "--json", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)


def part(view: dict, name: str) -> dict:  # type: ignore[type-arg]
    return next(p for p in view["parts"] if p["name"] == name)


def shared_memory(prefix: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(prefix + "*")}


def create_key(redis_url: str) -> str:
    import redis.asyncio as aioredis

    from gateway.auth import RedisApiKeyStore

    async def create() -> str:
        client = aioredis.from_url(redis_url)
        try:
            return await RedisApiKeyStore(client).create(Tier.PAID, "test_supervision")
        finally:
            await client.aclose()

    return asyncio.run(create())


async def load(base: str, key: str, stop: asyncio.Event, workers: int, outcomes: list[Outcome]) -> None:
    """`workers` clients sending chat requests back to back until `stop`; every prompt differs (no cache hits)."""
    counter = iter(range(1_000_000))

    async def worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            body = {
                "model": VARIANT,
                "messages": [{"role": "user", "content": f"Count from {next(counter)} to three."}],
                "max_tokens": 12,
            }
            begin = time.monotonic()
            try:
                status = (await client.post("/v1/chat/completions", json=body)).status_code
            except httpx.HTTPError:
                status = 0
            outcomes.append(Outcome(begin, time.monotonic(), status))

    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(workers)))


@pytest.mark.slow
def test_killed_replica_is_restarted_while_the_router_fails_over(
    model_repository: Path, redis_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = MeshSettings.on_free_ports(
        replicas=2,
        redis_url=redis_url,
        model_repository=model_repository,
        state_dir=state,
        startup_timeout_s=300,
        # Long enough to see the router serve from one replica while the other is down; short enough for a test.
        restart_backoff_s=3.0,
    )
    out = tmp_path / "launcher.out"
    launcher = launch(["up", *to_argv(settings, only_changed=True)], out)
    tree: dict[int, Proc] = {}
    try:
        wait_for_line(out, "llmesh is up", launcher, timeout=300)
        code, view = llmesh_status(state)
        assert code == 0 and view["healthy"], view
        assert [p["name"] for p in view["parts"]][:3] == ["tritonserver", "tritonserver-1", "cache"]
        victim = part(view, "tritonserver-1")
        assert victim["ports"]["grpc"] == settings.triton_grpc_port + 10

        # The python backend's shared memory of each replica carries the launcher's pid and the replica's name.
        shm_before = shared_memory(f"llmesh-{launcher.pid}-tritonserver-1-")
        assert shm_before, "tritonserver-1 has no shared memory under the launcher's prefix"
        key = create_key(redis_url)
        outcomes: list[Outcome] = []

        async def scenario() -> float:
            stop = asyncio.Event()
            traffic = asyncio.create_task(load(f"http://127.0.0.1:{settings.http_port}", key, stop, 4, outcomes))
            await asyncio.sleep(4)
            killed_at = time.monotonic()
            # The leader only, as a crash would: its stubs are the launcher's to clean up.
            os.kill(victim["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 120
            while True:
                await asyncio.sleep(0.5)
                _, now = await asyncio.to_thread(llmesh_status, state)
                if part(now, "tritonserver-1")["health"] == "healthy" and part(now, "tritonserver-1")["restarts"]:
                    break
                assert time.monotonic() < deadline, now
            await asyncio.sleep(3)
            stop.set()
            await asyncio.wait_for(traffic, timeout=120)
            return killed_at

        killed_at = asyncio.run(scenario())

        code, view = llmesh_status(state)
        restarted = part(view, "tritonserver-1")
        assert code == 0 and view["healthy"], view
        assert (restarted["restarts"], restarted["last_exit"]) == (1, "killed by signal SIGKILL")
        assert restarted["pid"] != victim["pid"]
        assert all(p["restarts"] == 0 for p in view["parts"] if p["name"] != "tritonserver-1"), view
        assert launcher.poll() is None, "the mesh must stay up"
        # What the killed replica left in /dev/shm was removed (Triton itself removes it only on a clean exit).
        assert not shm_before & shared_memory(f"llmesh-{launcher.pid}-tritonserver-1-")
        down_for = restarted["ready_at"] - restarted["last_exit_at"]

        failed = [o for o in outcomes if o.status != 200]
        during = [o for o in outcomes if o.start > killed_at and o.end < killed_at + down_for and o.status == 200]
        print(
            f"\nrequests: {len(outcomes)}, failed: {len(failed)} {[o.status for o in failed]}; "
            f"replica down {down_for:.1f} s (backoff 3.0 s); answered while it was down: {len(during)}"
        )
        assert len([o for o in outcomes if o.start < killed_at]) >= 4, outcomes
        # Only requests already generating on the killed replica may fail (the router fails over before the first
        # token only), and they fail as "unavailable", never as a server error.
        assert all(o.start <= killed_at for o in failed), failed
        assert len(failed) <= 4 and all(o.status == 503 for o in failed), failed
        assert during, "no request was answered while the replica was down"
        text = out.read_text()
        assert "tritonserver-1 (pid" in text and "killed by signal SIGKILL; restarting it in 3.0 s" in text, text
        assert "tritonserver-1 is ready again" in text, text

        # A SIGKILLed launcher takes everything with it: both tritonservers and their stubs, services, Envoy.
        tree = descendants(launcher.pid)
        names = sorted(p.name for p in tree.values())
        assert names.count("tritonserver") == 2 and any(n.startswith("triton_python") for n in names), names
        launcher.kill()
        launcher.wait()
        left = wait_all_gone(tree, timeout=20)
        assert not left, f"outlived the SIGKILLed launcher: {[(p, tree[p].name) for p in left]}"
        assert not shared_memory(f"llmesh-{launcher.pid}-"), "the guardian should have removed the shared memory"
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=60)
        kill_leftovers(tree)
