"""What one generation asks for and how its output leaves the engine: the request, its sampling settings, the
sink that receives tokens and the final event, and the engine's per-sequence state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


class RequestRejected(ValueError):
    """A request the model cannot run; the message is meant for the client. Raised by `Engine.submit` before
    anything is queued (the service layer's `llmesh.errors.InvalidRequest` is a different, mesh-wide type)."""


@dataclass(frozen=True)
class EngineSampling:
    """Token sampling as the engine runs it (greedy by default; the mesh's `llmesh.types.SamplingParams` carries
    the client's values and stop strings, which never reach the engine)."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # same seed + same prompt + same params -> same tokens


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    sampling: EngineSampling
    priority: int = 0  # lower runs first (0 = most urgent); ties in arrival order


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated tokens; never includes the EOS token
    finish_reason: FinishReason | None = None
    error: str | None = None


class Sink(Protocol):
    """Where one request's output goes; called on the engine's thread.

    Contract: any number of `token` calls, then exactly one final call, `finish` or `fail`. The engine makes the
    final call also when something it does for this request raises (then `fail`, with the error), and when the
    engine stops. A final call that raises is followed by one `fail`, so a sink that raised before delivering
    still ends its stream."""

    def token(self, token_id: int) -> None: ...

    def finish(self, reason: FinishReason) -> None: ...

    def fail(self, message: str) -> None: ...

    def cancelled(self) -> bool: ...


class CollectingSink:
    """Collects one request's output into a GenerationResult (Engine.generate)."""

    def __init__(self, result: GenerationResult, on_token: Callable[[int], None] | None = None) -> None:
        self.result = result
        self.on_token = on_token
        self.cancel = False

    def token(self, token_id: int) -> None:
        self.result.token_ids.append(token_id)
        if self.on_token is not None:
            self.on_token(token_id)

    def finish(self, reason: FinishReason) -> None:
        self.result.finish_reason = reason

    def fail(self, message: str) -> None:
        self.result.error = message
        self.result.finish_reason = "cancelled"

    def cancelled(self) -> bool:
        return self.cancel


@dataclass(eq=False)  # identity: the scheduler finds sequences in its queues with `in` and `remove`
class Seq:
    """One request inside the engine."""

    id: int
    request: GenerationRequest
    sink: Sink
    rng: np.random.Generator
    tokens: list[int]  # prompt + emitted tokens
    arrival: int
    generated: int = 0
    slot: int | None = None
    kv_len: int = 0  # leading tokens whose K/V are in the slot
    blocks: int = 0
    done: bool = False  # left the scheduler (finished, cancelled or failed)
    closed: bool = False  # the sink got its final call (attempted)
    draft_len: int = 0  # leading tokens whose K/V are in the draft model's slot (speculative decoding)
    spec_acceptance: float = 1.0  # moving average of this sequence's accepted / proposed per round
    spec_paused: int = 0  # plain steps since speculation was paused for a low acceptance

    @property
    def sampling(self) -> EngineSampling:
        return self.request.sampling

    def close(self, reason: FinishReason | None = None, error: str | None = None) -> None:
        """The sink's one final call: finish(reason), or fail(error) when an error is given. If finish raises,
        fail follows once with that error (a sink that raised has most likely not delivered its response)."""
        if self.closed:
            return
        self.closed = True
        try:
            if error is not None:
                self.sink.fail(error)
            elif reason is not None:
                self.sink.finish(reason)
            else:
                raise ValueError("a final call needs a finish reason or an error")
        except Exception as exc:
            log.exception("sequence %d: the final response raised", self.id)
            if error is None:
                try:
                    self.sink.fail(f"generation failed: {exc}")
                except Exception:
                    log.exception("sequence %d: the error response raised too", self.id)
