"""The complexity scorer's cues: what they find, and that finding them is linear in the text, whatever the text."""

import ast
import inspect
import time

import pytest

from llmesh.types import ChatMessage
from router import complexity
from router.complexity import HeuristicScorer, text_cues


@pytest.mark.parametrize(
    ("text", "cues"),
    [
        ("hi there", ()),
        ("```python\nprint(1)\n```", ("code",)),
        ("def f(x): return x", ("code",)),
        ("class A: pass", ("code",)),
        ("write a function that adds", ("code",)),
        ("#include <stdio.h>", ("code",)),
        ("SELECT name FROM users", ("code",)),
        ("select a good name", ()),
        ("x => x + 1", ("code",)),
        ("import os", ("code",)),
        ("int x = 1;\nreturn x;  ", ("code",)),
        ("please prove it", ("math",)),
        ("Solve: 2x = 4", ("math",)),
        ("what is 3 * 4", ("math",)),
        ("2^10 and 9/3", ("math",)),
        ("∑ of all", ("math",)),
        ("a*b is not arithmetic", ()),
        ("Explain step by step", ("multi-step",)),
        ("go step-by-step", ("multi-step",)),
        ("First, boil water. Then, add salt.", ("multi-step",)),
        ("compare the two", ("multi-step",)),
        ("Analyse this", ("multi-step",)),
        ("explain why it rains", ("multi-step",)),
        ("the trade-offs", ("multi-step",)),
        ("1. boil\n2) salt", ("multi-step",)),
        ("  12. indented step", ("multi-step",)),
        ("1.5 litres", ()),
        ("planet earth", ()),
        ("Explain step by step and prove it:\n```python\ndef f(x): return x\n```", ("code", "math", "multi-step")),
    ],
)
def test_cues(text: str, cues: tuple[str, ...]) -> None:
    assert text_cues(text) == cues


def test_scorer_uses_the_cues() -> None:
    score = HeuristicScorer().score([ChatMessage("user", "prove 1 * 2 step by step: def f(): pass")], 10)
    assert score.cues == ("code", "math", "multi-step")
    assert score.value >= 0.55


def test_no_regular_expressions_on_user_text() -> None:
    """Structure, not timing: the scorer module neither imports `re` nor calls into a regex engine."""
    tree = ast.parse(inspect.getsource(complexity))
    imported = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names
    }
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {"re", "regex", "re2"} & (imported | modules)


N = 200_000
PATHOLOGICAL = {
    # The former multi-step pattern `^\s*\d+[.)]\s` (MULTILINE) rescanned the blank run from every line start:
    # 20k newlines took 3.4 s, so 200k would take minutes.
    "newlines": "\n" * N,
    "newline-space": "\n " * (N // 2),
    "indented digits": "\n 1" * (N // 3),
    "semicolon blanks": ";" + " " * N + "x",
    "digit blanks": ("1" + " " * 50) * (N // 51),
    "operators": "*" * N,
    "digit operator": "1 *" * (N // 3),
    "words": "a " * (N // 2),
    "imports": " import" * (N // 7),
    "step prefixes": "step-by-" * (N // 8),
    "one line": "x" * N,
    "punctuation": "(:" * (N // 2),
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_text_scores_in_linear_time(name: str) -> None:
    text = PATHOLOGICAL[name]
    started = time.process_time()
    HeuristicScorer().score([ChatMessage("user", text)], 50_000)
    # Linear: ~0.1 s for 200k characters on a slow machine; the quadratic cases took minutes. The bound is loose
    # on purpose (a busy CI box), and still two orders of magnitude below quadratic.
    assert time.process_time() - started < 3.0
