"""Precision and false-hit rate of the semantic layer per threshold, on the labelled pairs in data/.

A pair (a, b) is a hit at threshold t when cos(embed(a), embed(b)) >= t (and, as served, the lexical guard passes):
`b` would be answered with `a`'s cached answer. For "same" pairs that is right (recall counts them); for "different"
pairs it is a false hit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_service.semantic import lexically_compatible

DATA = Path(__file__).resolve().parent / "data" / "question_pairs.jsonl"
# Ship a threshold only if its false-hit rate is below this.
MAX_FALSE_HIT_RATE = 0.01


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    same: bool
    split: str


@dataclass(frozen=True)
class Row:
    threshold: float
    precision: float  # of the hits, the share that were right (1.0 when there are no hits)
    recall: float  # of the paraphrase pairs, the share that hit
    false_hit_rate: float  # of the look-alike pairs, the share that hit
    hits: int
    false_hits: int


def load_pairs(path: Path = DATA) -> list[Pair]:
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            pairs.append(Pair(row["a"], row["b"], row["label"] == "same", row["split"]))
    return pairs


def similarities(pairs: Sequence[Pair], encode: Callable[[Sequence[str]], np.ndarray], batch: int = 64) -> np.ndarray:
    texts = sorted({t for p in pairs for t in (p.a, p.b)})
    vectors = np.concatenate([encode(texts[i : i + batch]) for i in range(0, len(texts), batch)])
    index = {t: i for i, t in enumerate(texts)}
    return np.array([float(vectors[index[p.a]] @ vectors[index[p.b]]) for p in pairs])


def guarded(pairs: Sequence[Pair], sims: np.ndarray) -> np.ndarray:
    """Similarities as the cache uses them: a pair the lexical guard refuses can never hit."""
    allowed = np.array([lexically_compatible(p.a, p.b) for p in pairs])
    return np.where(allowed, sims, -1.0)


def table(pairs: Sequence[Pair], sims: np.ndarray, thresholds: Sequence[float]) -> list[Row]:
    same = np.array([p.same for p in pairs])
    rows = []
    for t in thresholds:
        hit = sims >= t
        true_hits, false_hits = int((hit & same).sum()), int((hit & ~same).sum())
        hits = true_hits + false_hits
        rows.append(
            Row(
                threshold=t,
                precision=true_hits / hits if hits else 1.0,
                recall=true_hits / max(int(same.sum()), 1),
                false_hit_rate=false_hits / max(int((~same).sum()), 1),
                hits=hits,
                false_hits=false_hits,
            )
        )
    return rows


def choose_threshold(rows: Sequence[Row]) -> float | None:
    """The lowest threshold (most hits) whose false-hit rate is under MAX_FALSE_HIT_RATE; None if there is none."""
    ok = [r for r in rows if r.false_hit_rate < MAX_FALSE_HIT_RATE and r.hits > 0]
    return min(r.threshold for r in ok) if ok else None


THRESHOLDS = tuple(round(0.70 + 0.01 * i, 2) for i in range(30))
