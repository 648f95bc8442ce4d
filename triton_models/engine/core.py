"""Engine: the engine's public face. Builds the parts from a model folder (the one wiring place), checks and
queues requests from any thread, and owns the one run loop that drives the Scheduler on the engine's thread."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from llmesh.model_artifact import ModelMetadata
from triton_models.engine.kv_pool import KVPool
from triton_models.engine.requests import (
    Choices,
    CollectingSink,
    ConstraintCompiler,
    GenerationRequest,
    GenerationResult,
    RequestRejected,
    Seq,
    Sink,
    TokenConstraint,
)
from triton_models.engine.runner import MODEL_FILE, Float32Array, ModelRunner, Runner
from triton_models.engine.scheduler import Scheduler
from triton_models.engine.settings import EngineConfig, EngineStats

log = logging.getLogger(__name__)

STOPPED_MESSAGE = "generation failed: the engine stopped"

# Client-facing bounds of the sampling controls (OpenAI's, and vLLM's for repetition_penalty).
PENALTY_RANGE = (-2.0, 2.0)
REPETITION_RANGE = (0.0, 2.0)  # (low, high]
BIAS_RANGE = (-100.0, 100.0)
MAX_BIAS_ENTRIES = 300
MAX_TOP_LOGPROBS = 20


class EngineStopped(RuntimeError):
    """`submit` after the run loop ended: nothing would ever run the request."""


class Engine:
    """Continuous batching over one Runner (scheduler.py). `submit` may be called from any thread; `run` (or
    `step`, `generate`, `score`) from one engine thread."""

    def __init__(
        self,
        runner: Runner,
        config: EngineConfig,
        draft: Runner | None = None,
        grammar: Callable[[], ConstraintCompiler] | None = None,
    ) -> None:
        """`grammar` builds the grammar compiler on the first constrained request (None: grammars are refused)."""
        self.runner = runner
        self.config = config
        self.draft = draft if config.speculative_k > 0 else None
        self.metadata = runner.metadata
        self.scheduler = Scheduler(runner, config, self.draft)
        self.capacity = self.scheduler.capacity
        self.eos_token_ids = self.scheduler.eos_token_ids
        self._inbox: list[Seq] = []
        self._wake = threading.Condition()
        self._ids = 0
        self._stopped = False
        self._grammar_factory = grammar
        self._grammar: ConstraintCompiler | None = None
        self._grammar_lock = threading.Lock()

    @property
    def stats(self) -> EngineStats:
        return self.scheduler.stats

    @classmethod
    def from_model_dir(
        cls, version_dir: Path, config: EngineConfig | None = None, threads: int | None = None
    ) -> Engine:
        metadata = ModelMetadata.load(version_dir)
        config = config or EngineConfig(**metadata.engine)  # type: ignore[arg-type]
        session = ModelRunner.session_for(version_dir, threads or metadata.ort_threads)
        # Slots: running + a batch being prefilled + cached prefixes. Only touched pages use memory.
        slots = 2 * config.max_running + (config.max_cached if config.prefix_cache else 0)
        pool = KVPool(metadata.num_layers, metadata.num_kv_heads, metadata.head_dim, slots, metadata.context_length)
        draft = None
        if config.speculative_k > 0 and config.draft:
            draft_dir = version_dir.parent.parent / config.draft / version_dir.name
            if (draft_dir / MODEL_FILE).is_file():
                draft_meta = ModelMetadata.load(draft_dir)
                draft_pool = KVPool(
                    draft_meta.num_layers, draft_meta.num_kv_heads, draft_meta.head_dim, slots, metadata.context_length
                )
                draft_session = ModelRunner.session_for(draft_dir, threads or metadata.ort_threads)
                draft = ModelRunner(draft_session, draft_meta, draft_pool)
            else:
                log.warning(
                    "draft model %s not found next to %s: speculative decoding is off", config.draft, version_dir
                )
        runner = ModelRunner(session, metadata, pool, pad_single_row=bool(config.draft))
        return cls(runner, config, draft, grammar=lambda: _grammar_compiler(version_dir))

    # ---- requests (any thread) --------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise RequestRejected with a client-facing message if the request cannot run."""
        prompt, params = request.prompt_ids, request.sampling
        limit = self.capacity
        budget_tokens = self.scheduler.budget.total * self.config.block_size
        if len(prompt) == 0:
            raise RequestRejected("input_ids is empty: the prompt needs at least one token")
        if params.max_tokens <= 0:
            raise RequestRejected(f"max_tokens must be positive, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > limit:
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"length of {limit} tokens"
            )
        if len(prompt) + params.max_tokens > budget_tokens:
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds this model's KV cache "
                f"budget of {budget_tokens} tokens"
            )
        bad = [t for t in prompt if not 0 <= t < self.metadata.vocab_size]
        if bad:
            raise RequestRejected(f"input_ids has ids outside [0, {self.metadata.vocab_size}): {bad[:5]}")
        if not (math.isfinite(params.temperature) and params.temperature >= 0.0):
            raise RequestRejected(f"temperature must be >= 0, got {params.temperature}")
        if not (0.0 < params.top_p <= 1.0):
            raise RequestRejected(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k < 0:
            raise RequestRejected(f"top_k must be >= 0, got {params.top_k}")
        self._validate_controls(request)

    def _validate_controls(self, request: GenerationRequest) -> None:
        params, vocab = request.sampling, self.metadata.vocab_size
        if not 1 <= request.n <= self.config.max_choices:
            raise RequestRejected(f"n must be in [1, {self.config.max_choices}], got {request.n}")
        low, high = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(params, name)
            if not (math.isfinite(value) and low <= value <= high):
                raise RequestRejected(f"{name} must be in [{low:g}, {high:g}], got {value}")
        low, high = REPETITION_RANGE
        if not (math.isfinite(params.repetition_penalty) and low < params.repetition_penalty <= high):
            raise RequestRejected(f"repetition_penalty must be in ({low:g}, {high:g}], got {params.repetition_penalty}")
        if len(params.logit_bias) > MAX_BIAS_ENTRIES:
            raise RequestRejected(f"logit_bias has {len(params.logit_bias)} entries, at most {MAX_BIAS_ENTRIES}")
        low, high = BIAS_RANGE
        for token, bias in params.logit_bias:
            if not 0 <= token < vocab:
                raise RequestRejected(f"logit_bias token id {token} is outside [0, {vocab})")
            if not (math.isfinite(bias) and low <= bias <= high):
                raise RequestRejected(f"logit_bias values must be in [{low:g}, {high:g}], got {bias}")
        if params.top_logprobs is not None and not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestRejected(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}")
        bad = sorted(t for t in params.stop_token_ids if not 0 <= t < vocab)
        if bad:
            raise RequestRejected(f"stop_token_ids has ids outside [0, {vocab}): {bad[:5]}")

    def _constraints(self, request: GenerationRequest) -> list[TokenConstraint | None]:
        """One grammar state per choice (compiled once per distinct grammar text); RequestRejected if refused."""
        grammar = request.sampling.grammar
        if grammar is None:
            return [None] * request.n
        with self._grammar_lock:
            if self._grammar is None:
                if self._grammar_factory is None:
                    raise RequestRejected("this model does not support grammar-constrained generation")
                self._grammar = self._grammar_factory()
            compiler = self._grammar
        try:
            return [compiler.constraint(grammar) for _ in range(request.n)]
        except ValueError as exc:  # grammar.GrammarError: the message is meant for the client
            raise RequestRejected(str(exc)) from None

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request (thread-safe); raises RequestRejected (or EngineStopped) before queueing anything."""
        self.validate(request)
        constraints = self._constraints(request)
        seed = request.sampling.seed
        choices = Choices(sink, request.n)
        with self._wake:
            if self._stopped:
                raise EngineStopped("the engine has stopped")
            arrival = self._ids + 1
            seqs = []
            for index in range(request.n):
                self._ids += 1
                # Choice 0 draws from the seed exactly as a request of one does; choice i from (seed, i).
                rng = np.random.default_rng(seed if index == 0 or seed is None else [seed, index])
                seqs.append(
                    Seq(
                        id=self._ids,
                        request=request,
                        sink=sink,
                        rng=rng,
                        tokens=[int(t) for t in request.prompt_ids],
                        arrival=arrival,
                        index=index,
                        choices=choices,
                        constraint=constraints[index],
                    )
                )
            choices.unforked = seqs[1:]  # they copy choice 0's KV once its prompt is computed
            self._inbox.append(seqs[0])
            self._wake.notify()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    # ---- the engine thread ------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._inbox)

    def step(self) -> bool:
        """One scheduler iteration over what is queued; False when there was nothing to do."""
        with self._wake:
            inbox, self._inbox = self._inbox, []
        return self.scheduler.step(inbox)

    def run(
        self, stop: threading.Event, after_step: Callable[[bool], None] | None = None, idle_wait_s: float = 0.05
    ) -> None:
        """The engine thread: step until `stop` is set, sleeping while there is nothing to do; `after_step(worked)`
        follows every step (metrics). When the loop ends, for whatever reason, every request still in the engine
        fails and later submits raise EngineStopped: nothing waits on a loop that is gone."""
        try:
            while not stop.is_set():
                worked = self.step()
                if after_step is not None:
                    after_step(worked)
                if not worked:
                    with self._wake:
                        if not self._inbox and not stop.is_set():
                            self._wake.wait(idle_wait_s)
        finally:
            with self._wake:
                self._stopped = True
                inbox, self._inbox = self._inbox, []
            self.scheduler.fail_all(STOPPED_MESSAGE, inbox)

    def generate(
        self, requests: Sequence[GenerationRequest], on_token: Callable[[int, int], None] | None = None
    ) -> list[GenerationResult]:
        """Run `requests` to completion on the calling thread (tests, benchmarks, scoring)."""
        results = [GenerationResult() for _ in requests]
        for i, request in enumerate(requests):
            callback = None if on_token is None else (lambda token, i=i: on_token(i, token))  # type: ignore[misc]
            self.submit(request, CollectingSink(results[i], callback, request.n))
        while self.has_work():
            self.step()
        return results

    def score(self, prompt: Sequence[int], all_positions: bool = False) -> Float32Array:
        """Logits after each prompt token ([len, vocab]) or after the last one ([vocab]), computed alone in a
        scratch slot (numerics checks, perplexity). Only between steps, on the engine's thread."""
        slot = self.scheduler.slots.claim(len(self.scheduler.running))
        try:
            n = len(prompt)
            index = np.arange(n) if all_positions else np.array([n - 1])
            logits = self.runner.forward(
                slot, np.array([list(prompt)], dtype=np.int64), np.array([n - 1], dtype=np.int32), index
            )
        finally:
            self.runner.pool.release(slot)
        return logits if all_positions else logits[0]

    def close(self) -> None:
        self.runner.pool.close()


def _grammar_compiler(version_dir: Path) -> ConstraintCompiler:
    # Imported here: llguidance loads only for a model that gets a constrained request.
    from triton_models.engine.grammar import GrammarCompiler

    return GrammarCompiler.from_model_dir(version_dir)
