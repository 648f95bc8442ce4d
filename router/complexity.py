"""How demanding a request looks, as a score in [0, 1]; the policy moves requests up or down a size with it.

The scorer is an interface so a learned classifier can replace the heuristic without touching the policy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llmesh.types import ChatMessage


@dataclass(frozen=True)
class ComplexityScore:
    value: float
    # The cues that contributed, for the route's explanation.
    cues: tuple[str, ...]


class ComplexityScorer(Protocol):
    def score(self, messages: Sequence[ChatMessage], prompt_tokens: int) -> ComplexityScore: ...


_CODE = re.compile(r"```|\bdef |\bclass |\bfunction\b|#include|\bSELECT\b|=>|\bimport \w|;\s*$", re.MULTILINE)
_MATH = re.compile(r"\b(prove|derive|integral|equation|theorem|solve)\b|[∑∫√≤≥]|\d\s*[*/^]\s*\d", re.IGNORECASE)
_STEPS = re.compile(
    r"\b(step[- ]by[- ]step|first,|then,|finally,|compare|analy[sz]e|explain why|trade-?offs?|plan)\b"
    r"|^\s*\d+[.)]\s",
    re.IGNORECASE | re.MULTILINE,
)


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
        for name, pattern, weight in (("code", _CODE, 0.25), ("math", _MATH, 0.15), ("multi-step", _STEPS, 0.15)):
            if pattern.search(last_user):
                cues.append(name)
                value += weight
        return ComplexityScore(round(min(value, 1.0), 3), tuple(cues))
