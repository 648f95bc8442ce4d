"""What a model replica streams back for one request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    # Empty until the choice's last response: "stop", "length" or "cancelled".
    finish_reason: str = ""
    # The choice (sampling.n > 1) these tokens belong to.
    index: int = 0
    # When logprobs were asked for: per token in token_ids, its log probability and the most likely alternatives
    # (ids and log probabilities, best first).
    logprobs: tuple[float, ...] = ()
    top_ids: tuple[tuple[int, ...], ...] = ()
    top_logprobs: tuple[tuple[float, ...], ...] = ()
