"""llmesh bench reports (JSON, Markdown, PNG, terminal table) and command-line parsing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from rich.console import Console

from control.bench import command
from control.bench.client import Target
from control.bench.load import LoadPlan, RunOutcome
from control.bench.report import TargetRun, build_report, format_value, markdown, terminal_table, write_reports
from control.bench.stats import summarize
from control.bench.stream import OK, RequestResult
from control.bench.workload import Price, WorkloadSpec

SPEC = WorkloadSpec(seed=3, prices={"small": Price(0.5, 1.0)})
PLAN = LoadPlan(concurrency=2, requests=4)


def run_of(name: str, ttft: float, cache: str | None) -> TargetRun:
    results = [
        RequestResult(i, "short", "paid", 100.0 + i, 101.0 + i, OK, ttft, (0.01, 0.02), 10, 4, True, "small", cache)
        for i in range(3)
    ]
    results.append(RequestResult(3, "long", "free", 100.0, 100.1, "429", error="slow down"))
    outcome = RunOutcome(results, started=100.0, finished=104.0)
    return TargetRun(Target(name, f"http://{name}/v1"), outcome, summarize(name, results, outcome.wall_s, SPEC.prices))


RUNS = [run_of("llmesh", 0.1, ""), run_of("llama.cpp", 0.2, None)]


def test_markdown_has_the_side_by_side_table_with_ratios_and_breakdowns() -> None:
    text = markdown([r.summary for r in RUNS], SPEC, PLAN, stream=True)
    assert "| metric | llmesh | llama.cpp | llama.cpp / llmesh |" in text
    assert "| TTFT p50 | 100.0 ms | 200.0 ms | 2.00x |" in text
    assert "| cache hit rate | 0.0% | n/a | n/a |" in text
    assert "Errors by status: 429: 1." in text
    assert "| tier | requests | succeeded |" in text and "| variant |" in text
    assert "concurrency 2, at most 4 requests" in text


def test_terminal_table_renders_every_target() -> None:
    console = Console(record=True, width=200)
    console.print(terminal_table([r.summary for r in RUNS]))
    text = console.export_text()
    assert "llama.cpp / llmesh" in text and "TTFT p99" in text and "2.00x" in text


def test_json_report_holds_the_summary_and_every_request() -> None:
    report = json.loads(json.dumps(build_report(RUNS, SPEC, PLAN, stream=True)))
    assert report["format_version"] == 1
    assert report["workload"]["seed"] == 3 and report["load"]["concurrency"] == 2
    first = report["targets"][0]
    assert first["name"] == "llmesh" and first["summary"]["ok"] == 3
    assert first["summary"]["errors"] == {"429": 1}
    assert [r["index"] for r in first["requests"]] == [0, 1, 2, 3]
    assert first["requests"][0]["start"] == pytest.approx(0.0)  # relative to the run's start
    assert first["requests"][0]["itl_mean"] == pytest.approx(0.015)
    assert first["summary"]["cost"] == pytest.approx(3 * (10 * 0.5 + 4 * 1.0) / 1000)


def test_write_reports_writes_json_markdown_and_a_png(tmp_path: Path) -> None:
    paths = write_reports(RUNS, SPEC, PLAN, True, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["targets"][1]["name"] == "llama.cpp"
    assert paths["markdown"].read_text().startswith("# llmesh bench")
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_targets_keys_and_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMESH_KEY", raising=False)
    [default] = command.build_targets(parse())
    assert (default.name, default.base_url, default.api_key) == ("llmesh", command.DEFAULT_TARGET, "")

    two = command.build_targets(
        parse("--target", "mesh=http://a:8080/v1", "--target", "http://b:9000/v1", "--api-key", "k1", "--api-key", "k2")
    )
    assert [(t.name, t.base_url, t.api_key) for t in two] == [
        ("mesh", "http://a:8080/v1", "k1"),
        ("b:9000", "http://b:9000/v1", "k2"),
    ]
    tiers = command.build_targets(parse("--key", "free=lm-a=b", "--key", "paid=lm-c"))
    assert tiers[0].tier_keys == {"free": "lm-a=b", "paid": "lm-c"}

    monkeypatch.setenv("LLMESH_KEY", "from-env")
    assert command.build_targets(parse())[0].api_key == "from-env"
    assert command.build_targets(parse("--key", "free=x"))[0].api_key == ""  # tier keys win over the env default

    with pytest.raises(ValueError, match="one per target"):
        command.build_targets(parse("--target", "http://a/v1", "--api-key", "1", "--api-key", "2", "--api-key", "3"))
    with pytest.raises(ValueError, match="names must differ"):
        command.build_targets(parse("--target", "x=http://a/v1", "--target", "x=http://b/v1"))
    with pytest.raises(SystemExit):
        parse("--target", "not-a-url")


def test_plan_and_spec_from_flags(tmp_path: Path) -> None:
    assert command.build_plan(parse()) == LoadPlan(concurrency=1, requests=command.DEFAULT_REQUESTS)
    assert command.build_plan(parse("--rate", "3", "--duration", "10")) == LoadPlan(rate=3.0, duration_s=10.0)
    with pytest.raises(SystemExit):
        parse("--rate", "3", "--concurrency", "2")

    workload = tmp_path / "w.json"
    workload.write_text(json.dumps({"seed": 5, "max_tokens": 16, "tiers": {"paid": 2}, "prices": {"a": 1}}))
    spec = command.build_spec(
        parse("--workload", str(workload), "--seed", "6", "--mix", "repeat=1", "--price", "b=0.1,0.3",
              "--tier-weight", "free=0.5")
    )  # fmt: skip
    assert (spec.seed, spec.max_tokens, spec.mix) == (6, 16, {"repeat": 1.0})
    assert spec.prices == {**command.mesh_prices(), "a": Price(1.0, 1.0), "b": Price(0.1, 0.3)}
    assert spec.prices["smollm2-135m"] == Price(0.0001345, 0.0001345)  # the gateway's default price
    assert spec.tier_weights == {"paid": 2.0, "free": 0.5}


def test_bad_configuration_exits_2_before_any_traffic(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mix]\nhuge = 1\n")
    console = Console(record=True, width=200)
    assert command.run(parse("--workload", str(bad), "--out", str(tmp_path / "o")), console) == 2
    assert "unknown request kind" in console.export_text()
    assert not (tmp_path / "o").exists()


def test_values_are_formatted_for_people() -> None:
    assert format_value(None, "ms") == "n/a"
    assert format_value(0.01234, "ms") == "0.0 ms" and format_value(12.34, "ms") == "12.3 ms"
    assert format_value(9.04e-05, "$") == "$0.0000904"  # no exponent for fractions of a cent
    assert format_value(0.0, "$") == "$0" and format_value(1234.5, "$") == "$1,234.50"
    assert format_value(87.5, "%") == "87.5%" and format_value(3.0, "") == "3"
