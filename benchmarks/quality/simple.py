"""The simple side: short questions with checkable answers (simple_questions.jsonl, written for this benchmark).

Each line: {"id", "question", "check"} where check is
  {"kind": "number", "value": V}                  the answer's number equals V (exactly, or within "rel_tol")
  {"kind": "text", "answers": [A, ...]}           one of the accepted answers, compared normalized
Only the first line of an answer that has content is judged (the prompt asks for the bare answer; small models
often wrap it in a sentence, "The capital of France is Paris.", which counts). A text answer is right when an
accepted answer equals that line or appears in it as whole words; a number answer when the last number in the
first line that has one is V (so "12 x 7 = 84" reads as 84).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUESTIONS_FILE = Path(__file__).with_name("simple_questions.jsonl")
INSTRUCTION = "Give just the answer, no explanation."
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?|(?<=[^\w.-])\.\d+")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    check: dict[str, Any]

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.question} {INSTRUCTION}"}]

    def is_right(self, answer: str) -> bool:
        kind = self.check["kind"]
        if kind == "number":
            return number_matches(answer, float(self.check["value"]), float(self.check.get("rel_tol", 0.0)))
        if kind == "text":
            return text_matches(answer, [str(a) for a in self.check["answers"]])
        raise ValueError(f"{self.id}: unknown check kind {kind!r}")


def load_questions(path: Path = QUESTIONS_FILE) -> list[Question]:
    questions = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            questions.append(Question(row["id"], row["question"], row["check"]))
    return questions


def first_line(answer: str, having: re.Pattern[str] | None = None) -> str:
    """The first non-blank line (that matches `having`, when given); "" when none."""
    for line in answer.splitlines():
        if line.strip() and (having is None or having.search(line)):
            return line
    return ""


def normalize(text: str) -> str:
    """Lower case, accents and punctuation dropped, articles removed, single spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    words = re.sub(r"[^a-z0-9]+", " ", text).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def text_matches(answer: str, accepted: list[str]) -> bool:
    line = f" {normalize(first_line(answer))} "
    return any(f" {normalize(a)} " in line for a in accepted if normalize(a))


def numbers_in(text: str) -> list[float]:
    return [float(m.group().replace(",", "")) for m in NUMBER.finditer(text)]


def number_matches(answer: str, value: float, rel_tol: float = 0.0) -> bool:
    found = numbers_in(first_line(answer, NUMBER))
    if not found:
        return False
    return math.isclose(found[-1], value, rel_tol=rel_tol, abs_tol=1e-9)
