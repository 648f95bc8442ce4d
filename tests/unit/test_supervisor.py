"""The launcher's restart policy and supervision loop, on fake processes and a fake clock; `llmesh status`'s view."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from control.guardian import read_orders
from control.launcher import MeshSettings, process_start_ticks
from control.process import (
    Probe,
    describe_exit,
    free_port,
    grpc_health_probe,
    http_ok_probe,
    redis_probe,
    remove_shared_memory,
)
from control.status import EXIT_NOT_RUNNING, collect, render, run_status
from control.supervisor import PartState, RestartBudget, RestartPolicy, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---- RestartBudget ---------------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_then_the_budget_runs_out() -> None:
    budget = RestartBudget(RestartPolicy(max_restarts=6, window_s=1000, backoff_s=0.5, backoff_max_s=4))
    delays = [budget.on_exit(now=float(t), healthy_for=0) for t in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, None]


def test_restarts_older_than_the_window_no_longer_count() -> None:
    budget = RestartBudget(RestartPolicy(max_restarts=2, window_s=60, backoff_s=1, backoff_max_s=30, reset_after_s=1e9))
    assert budget.on_exit(0, 0) == 1
    assert budget.on_exit(10, 0) == 2
    assert budget.on_exit(59.9, 0) is None  # 2 restarts within 60 s already
    # The first restart (t=0) left the window at t=60: one more is allowed, still with the grown backoff.
    assert budget.on_exit(60, 0) == 4
    assert budget.on_exit(65, 0) is None


def test_backoff_resets_after_the_part_stayed_healthy() -> None:
    budget = RestartBudget(RestartPolicy(max_restarts=10, backoff_s=0.5, backoff_max_s=30, reset_after_s=60))
    assert [budget.on_exit(t, 1) for t in (0, 1, 2)] == [0.5, 1, 2]
    assert budget.on_exit(100, healthy_for=59.9) == 4
    assert budget.on_exit(200, healthy_for=60) == 0.5
    assert budget.on_exit(201, healthy_for=0) == 1


def test_max_restarts_zero_never_restarts() -> None:
    assert RestartBudget(RestartPolicy(max_restarts=0)).on_exit(0, 1e9) is None


@pytest.mark.parametrize(
    "bad",
    [{"max_restarts": -1}, {"backoff_s": -0.1}, {"window_s": float("nan")}, {"backoff_s": 5, "backoff_max_s": 1}],
)
def test_policy_refuses_values_out_of_range(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**bad)  # type: ignore[arg-type]


def test_mesh_settings_carry_the_policy() -> None:
    s = MeshSettings(restart_max=2, restart_window_s=9, restart_backoff_s=0.1, restart_backoff_max_s=1)
    assert s.restart_policy == RestartPolicy(max_restarts=2, window_s=9, backoff_s=0.1, backoff_max_s=1)
    assert MeshSettings().restart_policy == RestartPolicy()
    with pytest.raises(ValueError, match="--restart-backoff-max-s"):
        _ = MeshSettings(restart_backoff_s=10, restart_backoff_max_s=1).restart_policy


# ---- Supervisor ------------------------------------------------------------------------------------------------


@dataclass
class FakeProcess:
    name: str
    starts: int = 0
    running: bool = False
    how: str = ""
    stops: int = 0
    fail_start: bool = False
    pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.pids[-1] if self.pids else None

    def start(self) -> FakeProcess:
        if self.fail_start:
            raise FileNotFoundError(2, "No such file or directory", "tritonserver")
        self.starts += 1
        self.pids.append(100 + self.starts)
        self.running = True
        return self

    def alive(self) -> bool:
        return self.running

    def die(self, how: str = "killed by signal SIGKILL") -> None:
        self.running, self.how = False, how

    def exit_summary(self) -> str:
        return "running" if self.running else self.how

    def exit_description(self) -> str:
        return f"{self.name} {self.exit_summary()}; last lines of its log:\n(log)"

    def stop(self, grace: float = 10.0) -> None:
        self.stops += 1
        self.die("killed by signal SIGTERM")


class Probe_:
    def __init__(self) -> None:
        self.ok = True
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.ok


def supervised(policy: RestartPolicy, startup_timeout_s: float = 30) -> tuple[Supervisor, Clock, FakeProcess, Probe_]:
    clock = Clock()
    sup = Supervisor(policy, startup_timeout_s, clock)
    proc, probe = FakeProcess("tritonserver-1"), Probe_()
    sup.ready(sup.add(proc.start(), probe, {"grpc": 8011}))
    return sup, clock, proc, probe


def test_a_dead_part_is_restarted_after_its_backoff_and_is_ready_once_its_probe_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    sup, clock, proc, probe = supervised(RestartPolicy(backoff_s=0.5))
    part = sup.parts[0]
    assert sup.poll() is None and part.state is PartState.RUNNING

    proc.die()
    clock.advance(0.1)
    assert sup.poll() is None
    assert (part.state, part.last_exit, proc.starts) == (PartState.BACKOFF, "killed by signal SIGKILL", 1)
    assert "tritonserver-1 (pid 101) killed by signal SIGKILL; restarting it in 0.5 s (restart 1 of 5" in caplog.text

    clock.advance(0.4)
    probe.ok = False
    assert sup.poll() is None and proc.starts == 1  # not yet due
    clock.advance(0.1)
    assert sup.poll() is None
    assert (part.state, part.restarts, proc.starts) == (PartState.STARTING, 1, 2)
    assert "restarted tritonserver-1 (pid 102, restart 1)" in caplog.text

    clock.advance(3)
    assert sup.poll() is None and part.state is PartState.STARTING  # probe still false
    probe.ok = True
    assert sup.poll() is None
    assert part.state is PartState.RUNNING and part.ready_at == clock.now
    assert "tritonserver-1 is ready again (pid 102, restart 1, 3.5 s after it died)" in caplog.text


def test_a_part_that_keeps_dying_stops_the_mesh_with_a_clear_message() -> None:
    sup, clock, proc, _ = supervised(RestartPolicy(max_restarts=2, window_s=60, backoff_s=1, backoff_max_s=30))
    part = sup.parts[0]
    for restart in (1, 2):
        proc.die("exited with code 3")
        assert sup.poll() is None
        clock.advance(10)
        assert sup.poll() is None and part.restarts == restart
        assert sup.poll() is None and part.state is PartState.RUNNING
    proc.die("exited with code 3")
    failure = sup.poll()
    assert failure is not None and part.state is PartState.FAILED
    assert failure.splitlines()[-1] == (
        "tritonserver-1 exited with code 3 and it was restarted 2 times within 60 s "
        "(--restart-max 2, --restart-window-s 60): giving up"
    )
    assert "last lines of its log" in failure


def test_restarts_off_stops_at_the_first_exit() -> None:
    sup, _, proc, _ = supervised(RestartPolicy(max_restarts=0))
    proc.die()
    failure = sup.poll()
    assert failure is not None and "restarts are off (--restart-max 0)" in failure


def test_a_restart_that_never_becomes_ready_is_stopped_and_counts_as_a_try() -> None:
    sup, clock, proc, probe = supervised(RestartPolicy(max_restarts=1, backoff_s=0.5), startup_timeout_s=20)
    part = sup.parts[0]
    proc.die()
    sup.poll()
    clock.advance(0.5)
    probe.ok = False
    sup.poll()
    assert part.state is PartState.STARTING
    clock.advance(19.9)
    assert sup.poll() is None and proc.stops == 0
    clock.advance(0.1)
    failure = sup.poll()
    assert proc.stops == 1 and part.state is PartState.FAILED
    assert failure is not None and "tritonserver-1 was not ready within 20 s" in failure


def test_a_restart_that_cannot_exec_counts_as_a_try() -> None:
    sup, clock, proc, _ = supervised(RestartPolicy(max_restarts=1, backoff_s=0.5))
    proc.die()
    sup.poll()
    proc.fail_start = True
    clock.advance(1)
    failure = sup.poll()
    assert failure is not None and "could not be started" in failure and "No such file" in failure


def test_healthy_time_resets_the_backoff_in_the_loop() -> None:
    sup, clock, proc, _ = supervised(RestartPolicy(backoff_s=1, backoff_max_s=30, reset_after_s=60))
    part = sup.parts[0]
    delays = []
    for healthy_for in (1, 1, 61):
        clock.advance(healthy_for)
        proc.die()
        sup.poll()
        assert part.restart_at is not None
        delays.append(part.restart_at - clock.now)
        clock.advance(delays[-1])
        sup.poll()  # restarted
        sup.poll()  # ready
    assert delays == [1, 2, 1]


def test_other_parts_are_watched_while_one_waits_to_restart() -> None:
    clock = Clock()
    sup = Supervisor(RestartPolicy(backoff_s=5), 30, clock)
    a, b = FakeProcess("a").start(), FakeProcess("b").start()
    for p in (a, b):
        sup.ready(sup.add(p, Probe_()))
    a.die()
    sup.poll()
    b.die()
    clock.advance(1)
    sup.poll()
    assert [p.state for p in sup.parts] == [PartState.BACKOFF, PartState.BACKOFF]


def test_stop_all_stops_in_reverse_order() -> None:
    order: list[str] = []

    class Recording(FakeProcess):
        def stop(self, grace: float = 10.0) -> None:
            order.append(self.name)

    sup = Supervisor(RestartPolicy(), 30, Clock())
    for name in ("redis", "tritonserver", "gateway"):
        sup.add(Recording(name).start(), Probe_())
    sup.stop_all()
    assert order == ["gateway", "tritonserver", "redis"]
    assert {p.state for p in sup.parts} == {PartState.STOPPED}


# ---- guardian, probes, exit descriptions -----------------------------------------------------------------------


def test_guardian_keeps_the_groups_still_listed() -> None:
    lines = ["+100\n", "+200\n", "-100\n", "+300\n", "garbage\n", "+1\n", "-\n", "+-5\n", "~llmesh-1-t-\n", "~a/b\n"]
    assert read_orders(lines) == ({200, 300}, {"llmesh-1-t-"})


def test_remove_shared_memory_removes_only_the_prefix(tmp_path: Path) -> None:
    for name in ("llmesh-7-tritonserver-1-a", "llmesh-7-tritonserver-1-b", "llmesh-7-tritonserver-a", "other"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_shared_memory("llmesh-7-tritonserver-1-", tmp_path)
    assert sorted(removed) == ["llmesh-7-tritonserver-1-a", "llmesh-7-tritonserver-1-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llmesh-7-tritonserver-a", "other"]
    with pytest.raises(ValueError):
        remove_shared_memory("../etc/", tmp_path)
    with pytest.raises(ValueError):
        remove_shared_memory("", tmp_path)


def test_probes_survive_a_trip_through_json() -> None:
    from llmesh.tls import TlsFiles

    probes = [
        grpc_health_probe("127.0.0.1:50053", "llmesh.v1.LimiterService"),
        grpc_health_probe("127.0.0.1:50051", tls=TlsFiles(Path("/t/ca.pem"), Path("/t/c.pem"), Path("/t/c.key"))),
        http_ok_probe("http://127.0.0.1:8000/v2/health/ready"),
        redis_probe("redis://127.0.0.1:6379/0"),
    ]
    for probe in probes:
        assert Probe.from_json(json.loads(json.dumps(probe.to_json()))) == probe
    with pytest.raises(ValueError):
        Probe.from_json({"kind": "shell", "target": "rm -rf"})


def test_redis_probe_never_stores_the_password() -> None:
    probe = redis_probe("redis://:s3cret@127.0.0.1:6390/2")
    assert probe.target == "redis://127.0.0.1:6390/2"
    assert "s3cret" not in json.dumps(probe.to_json())
    assert redis_probe("redis://user:pw@[::1]:7000/0").target == "redis://[::1]:7000/0"


def test_probes_of_nothing_listening_say_false_without_raising() -> None:
    port = free_port()
    assert grpc_health_probe(f"127.0.0.1:{port}")() is False
    assert http_ok_probe(f"http://127.0.0.1:{port}/ready")() is False
    assert redis_probe(f"redis://127.0.0.1:{port}/0")() is False


def test_exit_descriptions() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "killed by signal SIGKILL"
    assert describe_exit(-15) == "killed by signal SIGTERM"


# ---- llmesh status ---------------------------------------------------------------------------------------------


def _status(mesh_state: str = "running", message: str = "", **part: object) -> dict[str, object]:
    port = free_port()
    base: dict[str, object] = {
        "name": "gateway",
        "pid": os.getpid(),
        "state": "running",
        "ports": {"grpc": port},
        "probe": grpc_health_probe(f"127.0.0.1:{port}").to_json(),
        "restarts": 1,
        "started_at": 1000.0,
        "last_exit": "killed by signal SIGKILL",
    }
    return {
        "launcher_pid": os.getpid(),
        "launcher_start_ticks": process_start_ticks(os.getpid()),
        "state": mesh_state,
        "message": message,
        "parts": [{**base, **part}],
    }


def test_status_of_an_unhealthy_part() -> None:
    view = collect(_status(), now=1061.0)
    assert view["running"] and not view["healthy"]
    (part,) = view["parts"]
    assert (part["health"], part["uptime_s"], part["restarts"]) == ("unhealthy", 61.0, 1)
    text = render(view)
    assert text.splitlines()[0] == f"mesh: running (launcher pid {os.getpid()})"
    assert "gateway" in text and "unhealthy" in text and "1m01s" in text and "killed by signal SIGKILL" in text


def test_status_of_a_part_waiting_to_restart_and_of_one_without_a_probe() -> None:
    view = collect(_status(state="backoff", pid=None))
    assert view["parts"][0]["health"] == "down (restarting)" and not view["healthy"]
    view = collect(_status(probe=None))
    assert view["parts"][0]["health"] == "running" and view["healthy"]


def test_status_when_the_launcher_is_gone_or_was_another_process() -> None:
    gone = {**_status(), "launcher_start_ticks": -1}  # same pid number, another process
    view = collect(gone)
    assert not view["running"] and view["parts"][0]["health"] == "-"
    failed = collect(_status(mesh_state="failed", message="gateway exited with code 1 and ...: giving up"))
    assert not failed["running"]
    assert render(failed).startswith("mesh: not running (last state: failed: gateway exited with code 1")


def test_status_command_without_a_mesh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = MeshSettings(state_dir=tmp_path)
    assert run_status(settings) == EXIT_NOT_RUNNING
    assert "no mesh has run" in capsys.readouterr().err
    (tmp_path / "status.json").write_text(json.dumps(_status(probe=None)))
    assert run_status(settings, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["healthy"] and out["parts"][0]["name"] == "gateway"
