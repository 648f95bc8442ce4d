"""Next-token sampling from one row of logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from triton_models.engine.requests import EngineSampling

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
