"""`llmesh status`: each part of the running mesh, its pid, ports, health (probed now), restarts, uptime and last exit.

Reads <state dir>/status.json, which the launcher rewrites atomically whenever a part changes, and asks each part's
health probe again. Exit status: 0 when the mesh runs and every part is healthy, 1 when a part is not, 3 when no
mesh runs (never started, stopped, given up, or its launcher is gone).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from control.launcher import MeshSettings, pid_running, process_start_ticks, status_file
from control.process import Probe, run_probe

PROBE_TIMEOUT_S = 3.0
EXIT_UNHEALTHY = 1
EXIT_NOT_RUNNING = 3


def _launcher_running(status: dict[str, Any]) -> bool:
    pid = status.get("launcher_pid")
    if not isinstance(pid, int) or not pid_running(pid):
        return False
    # The same process, not a later one that got its number.
    started = status.get("launcher_start_ticks")
    return started is None or process_start_ticks(pid) == started


def _health(part: dict[str, Any]) -> str:
    state = part.get("state")
    if state not in ("starting", "running"):
        return {"backoff": "down (restarting)", "failed": "failed", "stopped": "stopped"}.get(str(state), str(state))
    pid = part.get("pid")
    if not isinstance(pid, int) or not pid_running(pid):
        return "down"
    if part.get("probe") is None:
        return "running"
    try:
        # More time than the launcher's own polls allow: one answer decides here, on a host that may be busy.
        probe = dataclasses.replace(Probe.from_json(part["probe"]), timeout_s=PROBE_TIMEOUT_S)
    except (ValueError, KeyError, TypeError):
        return "unknown"
    if run_probe(probe):
        return "healthy"
    return "starting" if state == "starting" else "unhealthy"


def collect(status: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """`status` (status.json's content) with what is true now: whether the launcher runs, each part's health
    (probed, in parallel) and uptime, and whether the whole mesh is healthy."""
    now = time.time() if now is None else now
    running = _launcher_running(status) and status.get("state") in ("starting", "running")
    parts: list[dict[str, Any]] = [dict(p) for p in status.get("parts", []) if isinstance(p, dict)]
    if running and parts:
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            healths = list(pool.map(_health, parts))
    else:
        healths = [str(p.get("state")) if p.get("state") in ("stopped", "failed") else "-" for p in parts]
    for part, health in zip(parts, healths, strict=True):
        part["health"] = health
        started = part.get("started_at")
        alive = part.get("state") in ("starting", "running") and running
        part["uptime_s"] = round(now - started, 1) if alive and isinstance(started, (int, float)) else None
    return {
        **status,
        "running": running,
        "healthy": running and bool(parts) and all(p["health"] in ("healthy", "running") for p in parts),
        "parts": parts,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render(view: dict[str, Any]) -> str:
    if view["running"]:
        head = f"mesh: {view.get('state')} (launcher pid {view.get('launcher_pid')})"
    else:
        last = f"{view.get('state')}" + (f": {view['message']}" if view.get("message") else "")
        head = f"mesh: not running (last state: {last})"
    rows = [("PART", "PID", "PORTS", "HEALTH", "RESTARTS", "UPTIME", "LAST EXIT")]
    for p in view["parts"]:
        ports = " ".join(f"{k} {v}" for k, v in (p.get("ports") or {}).items())
        rows.append(
            (
                str(p.get("name")),
                str(p.get("pid") or "-"),
                ports or "-",
                str(p.get("health")),
                str(p.get("restarts", 0)),
                _duration(p.get("uptime_s")),
                str(p.get("last_exit") or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    return "\n".join([head, *lines])


def run_status(settings: MeshSettings, as_json: bool = False) -> int:
    path: Path = status_file(settings)
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        status = None
    except ValueError as exc:
        print(f"llmesh: {path} is not valid JSON ({exc})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if not isinstance(status, dict):
        if as_json:
            print(json.dumps({"running": False, "healthy": False, "parts": []}))
        else:
            print(f"llmesh: no mesh has run with state dir {path.parent}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    view = collect(status)
    print(json.dumps(view, indent=2) if as_json else render(view))
    if not view["running"]:
        return EXIT_NOT_RUNNING
    return 0 if view["healthy"] else EXIT_UNHEALTHY
