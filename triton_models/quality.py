"""Quality beside speed: perplexity of a variant on the text sample in triton_models/data, and top-1 agreement
between two variants' next-token predictions on the same text (teacher forcing, one prefill of the text)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from llmesh.model_artifact import ChatTokenizer
from triton_models.engine import Engine

SAMPLE = Path(__file__).resolve().parent / "data" / "pride_and_prejudice_ch1.txt"


def sample_ids(tokenizer: ChatTokenizer, max_tokens: int = 1024) -> list[int]:
    """BOS (if the model has one) + the sample's tokens, cut to `max_tokens`."""
    ids = tokenizer.encode(SAMPLE.read_text())
    token = tokenizer.metadata.bos_token
    bos = tokenizer.hf_tokenizer.token_to_id(token) if token else None
    return ([bos] if bos is not None else []) + ids[: max_tokens - (bos is not None)]


def log_probs(logits: npt.NDArray[np.float32], targets: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    peak = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - peak).sum(axis=1)) + peak[:, 0]
    return x[np.arange(targets.size), targets] - lse  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Quality:
    tokens: int
    perplexity: float
    top1: npt.NDArray[np.int64]  # predicted next token at every position


def evaluate(engine: Engine, ids: list[int]) -> Quality:
    logits = engine.score(ids, all_positions=True)[:-1]
    targets = np.asarray(ids[1:], dtype=np.int64)
    ppl = float(np.exp(-log_probs(logits, targets).mean()))
    return Quality(tokens=len(ids), perplexity=ppl, top1=logits.argmax(axis=1))


def top1_agreement(a: Quality, b: Quality) -> float:
    return float(np.mean(a.top1 == b.top1))


def chunked_perplexity(engine: Engine, ids: list[int], n_ctx: int = 512) -> tuple[float, int]:
    """Perplexity as llama.cpp's `llama-perplexity -c n_ctx` computes it: the tokens (no BOS added) cut into whole
    chunks of n_ctx, each run on its own from position 0, only the second half of each chunk scored (logits at
    n_ctx/2 .. n_ctx-2 against the next tokens). Returns (perplexity, tokens scored)."""
    half = n_ctx // 2
    nll: list[float] = []
    for start in range(0, len(ids) - n_ctx + 1, n_ctx):
        chunk = ids[start : start + n_ctx]
        logits = engine.score(chunk, all_positions=True)
        targets = np.asarray(chunk[half + 1 :], dtype=np.int64)
        nll.extend((-log_probs(logits[half : n_ctx - 1], targets)).tolist())
    if not nll:
        raise ValueError(f"need at least {n_ctx} tokens, got {len(ids)}")
    return float(np.exp(np.mean(nll))), len(nll)
