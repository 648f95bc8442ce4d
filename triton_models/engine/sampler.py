"""Next-token sampling from one row of logits: greedy, temperature, top-k and top-p (nucleus); the per-request
controls applied before it (logit bias, penalties) and the logprobs of the raw row."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from triton_models.engine.requests import EngineSampling, TokenHistory, TokenLogprob

Float32Array = npt.NDArray[np.float32]


class Sampler:
    """Turns one row of logits into a token id; stateless apart from the row's own RNG."""

    @staticmethod
    def sample(logits: Float32Array, params: EngineSampling, rng: np.random.Generator) -> int:
        if params.temperature == 0.0:
            return int(np.argmax(logits))
        if 0 < params.top_k < logits.size:
            candidates = np.argpartition(-logits, params.top_k - 1)[: params.top_k]
        else:
            candidates = np.arange(logits.size)
        scaled = logits[candidates].astype(np.float64) / params.temperature
        scaled -= scaled.max()
        probs = np.exp(scaled)
        probs /= probs.sum()
        if params.top_p < 1.0:
            # Only the most probable tokens can be in the nucleus: sort a top slice whose mass already reaches
            # top_p, not the whole vocabulary (a full sort of Gemma's 262k costs ~30 ms per token and row).
            top = np.arange(probs.size)
            for size in (64, 1024, 16384):
                if size >= probs.size:
                    break
                slice_ = np.argpartition(-probs, size - 1)[:size]
                if probs[slice_].sum() >= params.top_p:
                    top = slice_
                    break
            # Descending probability, ties by token id: the same logits always give the same order.
            order = top[np.lexsort((candidates[top], -probs[top]))]
            probs, candidates = probs[order], candidates[order]
            # Smallest prefix whose mass reaches top_p (the token that crosses the threshold is kept).
            keep = min(int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1, probs.size)
            probs, candidates = probs[:keep] / probs[:keep].sum(), candidates[:keep]
        index = min(int(np.searchsorted(np.cumsum(probs), rng.random())), probs.size - 1)
        return int(candidates[index])


def controlled_logits(logits: Float32Array, params: EngineSampling, history: TokenHistory | None) -> Float32Array:
    """A copy of the row with logit_bias, repetition_penalty, presence and frequency penalties applied, in that
    order (the grammar mask follows, on the same copy)."""
    row = logits.copy()
    if params.logit_bias:
        ids = np.fromiter((i for i, _ in params.logit_bias), dtype=np.int64, count=len(params.logit_bias))
        bias = np.fromiter((b for _, b in params.logit_bias), dtype=np.float32, count=len(params.logit_bias))
        np.add.at(row, ids, bias)
    if history is not None:
        if params.repetition_penalty != 1.0:
            seen = history.seen_ids()
            values = row[seen]
            row[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            ids, counts = history.generated()
            row[ids] -= params.presence_penalty + params.frequency_penalty * counts
    return row


def token_logprob(logits: Float32Array, token: int, top: int) -> TokenLogprob:
    """log-softmax of the raw row: the token's log probability and the `top` most likely (ties by id)."""
    peak = float(logits.max())
    # exp in float32 (vectorised; float64's is ~4x slower on a large vocabulary), summed in float64
    log_total = peak + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    top_ids: tuple[int, ...] = ()
    top_values: tuple[float, ...] = ()
    if top > 0:
        k = min(top, logits.size)
        # The k-th largest value, then everything above it and the lowest ids equal to it: ties go by id also at
        # the cut (argpartition alone picks any of the tied).
        kth = logits[np.argpartition(logits, logits.size - k)[logits.size - k]]
        above = np.flatnonzero(logits > kth)
        candidates = np.concatenate([above, np.flatnonzero(logits == kth)[: k - above.size]])
        order = candidates[np.lexsort((candidates, -logits[candidates]))]
        top_ids = tuple(int(i) for i in order)
        top_values = tuple(float(logits[i]) - log_total for i in order)
    return TokenLogprob(float(logits[token]) - log_total, top_ids, top_values)
