"""What one generation asks for and how its output leaves the engine: the request, its sampling settings, the
sink that receives tokens and the final events, and the engine's per-sequence state (one Seq per choice)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


class RequestRejected(ValueError):
    """A request the model cannot run; the message is meant for the client. Raised by `Engine.submit` before
    anything is queued (the service layer's `llmesh.errors.InvalidRequest` is a different, mesh-wide type)."""


class TokenConstraint(Protocol):
    """One sequence's grammar state (engine/grammar.py implements it)."""

    def apply(self, logits: npt.NDArray[np.float32]) -> None: ...  # disallowed logits -> -inf, in place

    def advance(self, token_id: int) -> None: ...  # raises (ValueError) if the token was not allowed

    def is_finished(self) -> bool: ...  # complete: nothing may follow


class ConstraintCompiler(Protocol):
    """Grammar text -> a fresh TokenConstraint (engine/grammar.py's GrammarCompiler); raises ValueError with a
    client-facing message for a grammar it refuses. Thread-safe: called from submitting threads."""

    def constraint(self, grammar: str) -> TokenConstraint: ...


@dataclass(frozen=True)
class EngineSampling:
    """Token sampling as the engine runs it (greedy by default; the mesh's `llmesh.types.SamplingParams` carries
    the client's values and stop strings, which never reach the engine).

    Per row, on a copy of the model's logits, in this order: logit_bias, repetition_penalty, presence and
    frequency penalties, the grammar mask, then temperature / top-k / top-p (or greedy). Logprobs are taken from
    the RAW logits (before any of these), as vLLM does by default."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # same seed + same prompt + same params -> same tokens
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0), over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count, over generated tokens
    repetition_penalty: float = 1.0  # vLLM: tokens in prompt or output, positive / p, negative * p; 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    top_logprobs: int | None = None  # None = no logprobs; K >= 0: the chosen token's and the K most likely
    stop_token_ids: frozenset[int] = frozenset()  # end with "stop" at any of these (the token is not emitted)
    grammar: str | None = None  # grammar text (engine/grammar.py); None = unconstrained

    @property
    def plain(self) -> bool:
        """Nothing but temperature / top-k / top-p: the row is sampled as it comes (no copy, no extra work)."""
        return (
            not self.logit_bias
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.repetition_penalty == 1.0
            and self.top_logprobs is None
            and self.grammar is None
        )


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    sampling: EngineSampling
    priority: int = 0  # lower runs first (0 = most urgent); ties in arrival order
    n: int = 1  # choices: the prompt is computed once, each choice samples on its own


@dataclass(frozen=True)
class TokenLogprob:
    """The log probability of an emitted token and the most likely alternatives (log-softmax of the raw row)."""

    logprob: float
    top_ids: tuple[int, ...] = ()  # most likely first (ties by id)
    top_logprobs: tuple[float, ...] = ()


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated tokens; never includes the EOS token
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when asked
    choices: list[GenerationResult] = field(default_factory=list)  # n > 1: every choice (this one holds choice 0)


class Sink(Protocol):
    """Where one request's output goes; called on the engine's thread.

    Contract: any number of `token` calls (each with its choice index and, when asked, its logprobs), then per
    choice one `finish` with that choice's index; the finish with `last=True` (the last choice to end) is the
    request's final call. Or, instead of what is left, one `fail`, which is final for every choice. With n == 1
    that is: tokens, then exactly one final call, `finish(reason, 0, True)` or `fail`. The engine makes the final
    call also when something it does for this request raises (then `fail`, with the error), and when the engine
    stops. A finish that raises is followed by one `fail`, so a sink that raised before delivering still ends
    its stream."""

    def token(self, token_id: int, index: int = 0, logprob: TokenLogprob | None = None) -> None: ...

    def finish(self, reason: FinishReason, index: int = 0, last: bool = True) -> None: ...

    def fail(self, message: str) -> None: ...

    def cancelled(self) -> bool: ...


class CollectingSink:
    """Collects one request's output into a GenerationResult (Engine.generate)."""

    def __init__(self, result: GenerationResult, on_token: Callable[[int], None] | None = None, n: int = 1) -> None:
        self.result = result
        self.on_token = on_token
        self.cancel = False
        if n > 1:
            result.choices = [result, *(GenerationResult() for _ in range(n - 1))]

    def _choice(self, index: int) -> GenerationResult:
        return self.result.choices[index] if self.result.choices else self.result

    def token(self, token_id: int, index: int = 0, logprob: TokenLogprob | None = None) -> None:
        choice = self._choice(index)
        choice.token_ids.append(token_id)
        if logprob is not None:
            choice.logprobs.append(logprob)
        if self.on_token is not None and index == 0:
            self.on_token(token_id)

    def finish(self, reason: FinishReason, index: int = 0, last: bool = True) -> None:
        self._choice(index).finish_reason = reason

    def fail(self, message: str) -> None:
        for choice in self.result.choices or [self.result]:
            choice.error = message
            choice.finish_reason = "cancelled"

    def cancelled(self) -> bool:
        return self.cancel


class Choices:
    """The n choices of one request: they share its sink, end one by one, and the request's final call is the
    last choice's finish (or the first fail). Siblings (index > 0) wait in `unforked` until choice 0's prompt is
    computed; then the scheduler forks them from its KV."""

    def __init__(self, sink: Sink, n: int) -> None:
        self.sink = sink
        self.n = n
        self.open = n  # choices whose finish has not been made yet
        self.closed = False  # the request's final call was made (or attempted)
        self.unforked: list[Seq] = []


@dataclass(eq=False)  # identity: the scheduler finds sequences in its queues with `in` and `remove`
class Seq:
    """One choice of one request inside the engine."""

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
    closed: bool = False  # this choice's final event was made (attempted)
    draft_len: int = 0  # leading tokens whose K/V are in the draft model's slot (speculative decoding)
    spec_acceptance: float = 1.0  # moving average of this sequence's accepted / proposed per round
    spec_paused: int = 0  # plain steps since speculation was paused for a low acceptance
    index: int = 0  # choice index
    choices: InitVar[Choices | None] = None  # the request's choices; None: a request of one
    constraint: TokenConstraint | None = None  # the grammar state, when sampling.grammar is set
    group: Choices = field(init=False)
    history: TokenHistory | None = field(init=False, default=None)  # counts for the penalties, when any is set
    plain: bool = field(init=False, default=True)  # sampling.plain, kept at hand for the decode loop

    def __post_init__(self, choices: Choices | None) -> None:
        self.group = choices if choices is not None else Choices(self.sink, 1)
        self.plain = self.request.sampling.plain
        params = self.request.sampling
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
            self.history = TokenHistory(self.tokens, params.max_tokens)

    @property
    def sampling(self) -> EngineSampling:
        return self.request.sampling

    def close(self, reason: FinishReason | None = None, error: str | None = None) -> None:
        """This choice's finish(reason), or the request's fail(error) when an error is given (once for all
        choices). If finish raises, fail follows once with that error (a sink that raised has most likely not
        delivered its response) and the request's other choices end silently."""
        if self.closed:
            return
        self.closed = True
        choices = self.group
        if choices.closed:
            return
        try:
            if error is not None:
                choices.closed = True
                self.sink.fail(error)
            elif reason is not None:
                choices.open -= 1
                choices.closed = choices.open == 0
                self.sink.finish(reason, self.index, choices.closed)
            else:
                raise ValueError("a final call needs a finish reason or an error")
        except Exception as exc:
            log.exception("sequence %d: the final response raised", self.id)
            choices.closed = True
            if error is None:
                try:
                    self.sink.fail(f"generation failed: {exc}")
                except Exception:
                    log.exception("sequence %d: the error response raised too", self.id)


class TokenHistory:
    """Token counts for the penalties, kept as tokens are emitted (never recounted): the generated tokens' counts
    (presence, frequency) and the distinct tokens of prompt + output (repetition), in arrays sized for the whole
    generation up front, so each emitted token is O(1) and each step reads views."""

    def __init__(self, prompt: Sequence[int], max_tokens: int) -> None:
        distinct_prompt = np.unique(np.asarray(prompt, dtype=np.int64))
        self._seen = np.empty(distinct_prompt.size + max_tokens, dtype=np.int64)
        self._seen[: distinct_prompt.size] = distinct_prompt
        self._n_seen = distinct_prompt.size
        self._seen_set = set(distinct_prompt.tolist())
        self._ids = np.empty(max_tokens, dtype=np.int64)
        self._counts = np.zeros(max_tokens, dtype=np.float32)
        self._position: dict[int, int] = {}  # generated token -> its place in _ids / _counts

    def add(self, token: int) -> None:
        position = self._position.get(token)
        if position is None:
            position = self._position[token] = len(self._position)
            self._ids[position] = token
        self._counts[position] += 1.0
        if token not in self._seen_set:
            self._seen_set.add(token)
            self._seen[self._n_seen] = token
            self._n_seen += 1

    def seen_ids(self) -> npt.NDArray[np.int64]:
        """Distinct ids of prompt + generated tokens."""
        return self._seen[: self._n_seen]

    def generated(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Distinct generated ids and how often each was generated."""
        n = len(self._position)
        return self._ids[:n], self._counts[:n]
