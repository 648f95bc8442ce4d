"""What a model replica streams back for one request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    # Empty until the engine's last response: "stop", "length" or "cancelled".
    finish_reason: str = ""
