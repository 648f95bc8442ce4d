"""The Grafana dashboard is well-formed and only charts metrics that something in llmesh exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Exported by Triton itself, not by llmesh code.
EXTERNAL = {"nv_inference_queue_duration_us", "nv_inference_request_success", "nv_gpu_utilization"}


def test_dashboard_panels_use_existing_metrics() -> None:
    dashboard = json.loads((ROOT / "observability" / "grafana" / "llmesh.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    source = "\n".join(
        p.read_text()
        for d in ("gateway", "router", "cache_service", "limiter_service")
        for p in (ROOT / d).rglob("*.py")
    )
    exported = set(re.findall(r'"(llmesh_[a-z0-9_]+)"', source))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(
                re.findall(r"\b((?:llmesh|nv)_[a-z0-9_]+?)(?:_bucket|_count|_sum)?\b(?=[\[{(\s)]|$)", target["expr"])
            )
            unknown = {n for n in names if n not in exported and n not in EXTERNAL}
            assert not unknown, f"{panel['title']}: {unknown}"
