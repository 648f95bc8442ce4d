"""How demanding a request looks, as a score in [0, 1]; the policy moves requests up or down a size with it.

The scorer is an interface so a learned classifier can replace the heuristic without touching the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Protocol

from llmesh.types import ChatMessage


@dataclass(frozen=True)
class ComplexityScore:
    value: float
    # The cues that contributed, for the route's explanation.
    cues: tuple[str, ...]


class ComplexityScorer(Protocol):
    def score(self, messages: Sequence[ChatMessage], prompt_tokens: int) -> ComplexityScore: ...


# The cues, found without regular expressions: a backtracking regex on user text can take time quadratic (or
# worse) in its length (the former `^\s*\d+[.)]\s` took 3.4 s on 20k newlines), and this runs on every routed
# request before any quota is charged. `text_cues` splits the text into lines and whitespace-separated tokens once
# and then only does set lookups and substring searches over them: time linear in len(text), whatever the text.
_CODE_SUBSTRINGS = ("```", "#include", "=>")
_CODE_KEYWORDS = frozenset({"def", "class"})  # then a blank, as in "def f(x):"
_MATH_WORDS = frozenset({"prove", "derive", "integral", "equation", "theorem", "solve"})
_MATH_SYMBOLS = "∑∫√≤≥"
_MATH_OPERATORS = "*/^"
_STEP_WORDS = frozenset(
    {"step-by-step", "compare", "analyze", "analyse", "plan", "tradeoff", "tradeoffs", "trade-off", "trade-offs"}
)
_STEP_PHRASES = (" step by step ", " step-by step ", " step by-step ", " explain why ")
_STEP_OPENERS = frozenset({"first,", "then,", "finally,"})
# Characters that may surround a word in a token ("(prove", "theorem:", "compare,").
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~"


def _operator_between_digits(text: str) -> bool:
    """A digit, blanks, one of * / ^, blanks, a digit ("3 * 4", "2^10"). Without the blanks that is three adjacent
    characters, so one left-to-right search per operator character finds it."""
    packed = "".join(text.split())
    for operator in _MATH_OPERATORS:
        at = packed.find(operator, 1)
        while 0 < at < len(packed) - 1:
            if packed[at - 1].isdecimal() and packed[at + 1].isdecimal():
                return True
            at = packed.find(operator, at + 1)
    return False


def _is_list_number(token: str) -> bool:
    """ "1." or "12)" first on a line: a numbered step."""
    return len(token) > 1 and token[-1] in ".)" and token[:-1].isdecimal()


def _imports_a_name(words: str) -> bool:
    """ "import x": the word import, a blank, then a word character."""
    at = words.find(" import ")
    while at >= 0:
        following = words[at + 8 : at + 9]
        if following and (following.isalnum() or following == "_"):
            return True
        at = words.find(" import ", at + 1)
    return False


def text_cues(text: str) -> tuple[str, ...]:
    """The content cues of `text`, in the order code, math, multi-step. Linear time in len(text)."""
    tokens = text.split()
    lowered = text.lower().split()
    words = set(map(str.strip, lowered, repeat(_PUNCTUATION)))
    # Lowercased words, punctuation trimmed, between single blanks: phrases are substring searches.
    spaced = " " + " ".join(map(str.strip, lowered, repeat(_PUNCTUATION))) + " "
    lines = [line for line in map(str.split, text.splitlines()) if line]

    code = (
        any(s in text for s in _CODE_SUBSTRINGS)
        or "function" in words
        or "SELECT" in set(map(str.strip, tokens, repeat(_PUNCTUATION)))
        or not _CODE_KEYWORDS.isdisjoint(map(str.lstrip, lowered, repeat(_PUNCTUATION)))
        or _imports_a_name(" " + " ".join(lowered) + " ")
        or any(line[-1].endswith(";") for line in lines)
    )
    math = not _MATH_WORDS.isdisjoint(words) or any(c in text for c in _MATH_SYMBOLS) or _operator_between_digits(text)
    steps = (
        not _STEP_WORDS.isdisjoint(words)
        or not _STEP_OPENERS.isdisjoint(lowered)
        or any(phrase in spaced for phrase in _STEP_PHRASES)
        or any(_is_list_number(line[0]) for line in lines)
    )
    return tuple(name for name, found in (("code", code), ("math", math), ("multi-step", steps)) if found)


@dataclass(frozen=True)
class HeuristicScorer:
    """Length, depth and content cues. Weights sum to 1; each part saturates."""

    long_prompt_tokens: int = 600
    deep_conversation_turns: int = 8

    def score(self, messages: Sequence[ChatMessage], prompt_tokens: int) -> ComplexityScore:
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        cues: list[str] = []
        value = 0.0
        length = min(prompt_tokens / self.long_prompt_tokens, 1.0)
        if length >= 0.5:
            cues.append("long prompt")
        value += 0.3 * length
        turns = sum(1 for m in messages if m.role != "system")
        depth = min(turns / self.deep_conversation_turns, 1.0)
        if depth >= 0.5:
            cues.append("deep conversation")
        value += 0.15 * depth
        found = text_cues(last_user)
        for name, weight in (("code", 0.25), ("math", 0.15), ("multi-step", 0.15)):
            if name in found:
                cues.append(name)
                value += weight
        return ComplexityScore(round(min(value, 1.0), 3), tuple(cues))
