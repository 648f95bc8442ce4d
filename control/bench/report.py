"""Benchmark reports: JSON (everything, per request too), a Markdown table, a PNG plot and the terminal table.

`build_report`, `markdown` and `terminal_table` are pure; `write_reports` does the file I/O.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from control.bench.client import Target
from control.bench.load import LoadPlan, RunOutcome
from control.bench.stats import GroupCounts, Row, Summary, ratio, table_rows
from control.bench.workload import WorkloadSpec

FORMAT_VERSION = 1
JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "bench.json", "bench.md", "bench.png"


@dataclass(frozen=True)
class TargetRun:
    target: Target
    outcome: RunOutcome
    summary: Summary


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "/s":
        return f"{value:.2f}"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "$":
        # Fractions of a cent are the norm here: plain decimals, no exponent.
        return f"${value:,.2f}" if value >= 1 else "$" + (f"{value:.8f}".rstrip("0").rstrip(".") or "0")
    return f"{value:.0f}"


def format_ratio(row: Row, index: int) -> str:
    value = ratio(row.values, index)
    return "n/a" if value is None else f"{value:.2f}x"


def _headers(summaries: Sequence[Summary]) -> list[str]:
    names = [s.target for s in summaries]
    return ["metric", *names, *(f"{name} / {names[0]}" for name in names[1:])]


def _cells(row: Row) -> list[str]:
    return [
        row.label,
        *(format_value(v, row.unit) for v in row.values),
        *(format_ratio(row, i) for i in range(1, len(row.values))),
    ]


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _group_rows(groups: dict[str, GroupCounts]) -> list[list[str]]:
    return [
        [
            name,
            str(g.requests),
            str(g.ok),
            str(g.prompt_tokens),
            str(g.completion_tokens),
            format_value(g.cost, "$"),
        ]
        for name, g in groups.items()
    ]


def markdown(summaries: Sequence[Summary], spec: WorkloadSpec, plan: LoadPlan, stream: bool) -> str:
    lines = [
        "# llmesh bench",
        "",
        f"Load: {plan.describe()}; {'streaming' if stream else 'non-streaming'}; workload seed {spec.seed}, "
        f"model `{spec.model}`, max_tokens {spec.max_tokens}, temperature {spec.temperature:g}.",
        "",
        *_md_table(_headers(summaries), [_cells(row) for row in table_rows(summaries)]),
    ]
    if len(summaries) > 1:
        lines += ["", "Ratios are each target's value divided by the first target's."]
    for s in summaries:
        lines += ["", f"## {s.target}", ""]
        errors = ", ".join(f"{kind}: {n}" for kind, n in s.errors.items()) or "none"
        lines.append(f"Errors by status: {errors}.")
        if not s.usage_reported:
            lines.append("The server did not report usage for every answer: tokens were counted from content chunks.")
        if s.unpriced_variants:
            lines.append(f"No price for: {', '.join(s.unpriced_variants)} (left out of the cost).")
        if s.delayed_arrivals:
            lines.append(f"{s.delayed_arrivals} arrivals waited for a free slot: the offered rate was not met.")
        headers = ["requests", "succeeded", "prompt tokens", "completion tokens", "cost"]
        for title, groups in (("tier", s.by_tier), ("kind", s.by_kind), ("variant", s.by_variant)):
            lines += ["", *_md_table([title, *headers], _group_rows(groups))]
    return "\n".join(lines) + "\n"


def terminal_table(summaries: Sequence[Summary], title: str = "llmesh bench") -> Table:
    table = Table(title=title)
    for i, header in enumerate(_headers(summaries)):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in table_rows(summaries):
        table.add_row(*_cells(row))
    return table


def _request_record(r: Any) -> dict[str, Any]:
    record = asdict(r)
    record["e2e"] = r.e2e
    record["itl_mean"] = sum(r.itl) / len(r.itl) if r.itl else None
    del record["itl"]  # every gap of every request would dwarf the rest; the summary pools them
    return record


def build_report(runs: Sequence[TargetRun], spec: WorkloadSpec, plan: LoadPlan, stream: bool) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "workload": asdict(spec),
        "load": asdict(plan),
        "stream": stream,
        "targets": [
            {
                "name": run.target.name,
                "base_url": run.target.base_url,
                "summary": run.summary.to_dict(),
                # Times relative to the target's run start, so files from different runs compare.
                "requests": [
                    {**_request_record(r), "start": r.start - run.outcome.started, "end": r.end - run.outcome.started}
                    for r in sorted(run.outcome.results, key=lambda r: r.index)
                ],
            }
            for run in runs
        ],
    }


def write_plot(runs: Sequence[TargetRun], path: Path) -> None:
    """Latency CDFs (TTFT, ITL, end to end) and a TTFT histogram, one line per target."""
    # Figure + the Agg canvas directly: no pyplot, no GUI backend, no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    panels = (
        (axes[0][0], "TTFT", lambda r: [r.ttft] if r.ttft is not None else []),
        (axes[0][1], "inter-token latency", lambda r: list(r.itl)),
        (axes[1][0], "end-to-end latency", lambda r: [r.e2e]),
    )
    for ax, title, values_of in panels:
        for run in runs:
            values = sorted(v * 1000.0 for r in run.outcome.results if r.ok for v in values_of(r))
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, fractions, where="post", label=run.target.name)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if title != "inter-token latency" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    hist = axes[1][1]
    ttfts = {
        run.target.name: [r.ttft * 1000.0 for r in run.outcome.results if r.ok and r.ttft is not None] for run in runs
    }
    every = [v for values in ttfts.values() for v in values]
    if every:
        # The same bins for every target, so bar heights compare.
        count = min(30, max(5, len(every) // (2 * len(runs))))
        low, high = min(every), max(every)
        edges = [low + (high - low) * i / count for i in range(count + 1)] if high > low else count
        for name, values in ttfts.items():
            if values:
                hist.hist(values, bins=edges, alpha=0.5, label=name)
    hist.set_title("TTFT histogram")
    hist.set_xlabel("ms")
    hist.set_ylabel("requests")
    if hist.get_legend_handles_labels()[0]:
        hist.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_reports(
    runs: Sequence[TargetRun], spec: WorkloadSpec, plan: LoadPlan, stream: bool, out_dir: Path
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME, "markdown": out_dir / MARKDOWN_NAME, "plot": out_dir / PLOT_NAME}
    paths["json"].write_text(json.dumps(build_report(runs, spec, plan, stream), indent=2) + "\n")
    paths["markdown"].write_text(markdown([run.summary for run in runs], spec, plan, stream))
    write_plot(runs, paths["plot"])
    return paths
