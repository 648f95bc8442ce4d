"""Continuous-batching token generation with onnxruntime and numpy (no Triton, no torch): testable on its own.

Pieces, bottom up:

  KVPool       per-layer K/V buffers [slots, n_kv, capacity, head_dim] in one anonymous memory mapping. A slot
               is one sequence's cache, right-padded; the graph (graph.py) writes new K/V into it in place
               (GroupQueryAttention with past and present bound to the same memory), so no step copies the
               cache. Pages are committed by the kernel only when first written and handed back
               (madvise DONTNEED) when a slot is released, so resident memory follows the tokens in use, in
               16-token pages: the operating system's page table is the block table.
  ModelRunner  one graph call over a contiguous range of slots (IOBinding; bindings cached per range).
  Engine       the scheduler. Iteration-level: every `step()` runs one decode call for all running sequences
               (one token each), then at most one prefill call for newcomers (chunked: `prefill_chunk` tokens),
               so new sequences join between decode steps and running streams keep flowing. A sequence leaves
               the moment it stops. KV memory is accounted in blocks of `block_size` tokens against
               `kv_budget_tokens`; admission waits when the budget is full, and a running sequence that
               cannot grow preempts the newest running one (recomputed later from its tokens). Finished
               sequences stay in an LRU prefix cache (within the budget) that newcomers with the same
               leading tokens copy from instead of recomputing.

Running sequences always occupy slots [0, n_running) (decode binds that range); the rare moves that keep it
so (a sequence joins or leaves) copy one sequence's used tokens, never the whole pool.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from llmesh.model_artifact import ModelMetadata

MODEL_FILE = "model.onnx"

FinishReason = Literal["stop", "length", "cancelled"]
Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE


class InvalidRequest(ValueError):
    """A request the model cannot run; the message is meant for the client."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # same seed + same prompt + same params -> same tokens


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    sampling: SamplingParams
    priority: int = 0  # lower runs first (0 = most urgent); ties in arrival order


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated tokens; never includes the EOS token
    finish_reason: FinishReason | None = None
    error: str | None = None


class Sink(Protocol):
    """Where one request's output goes; called on the engine's thread."""

    def token(self, token_id: int) -> None: ...

    def finish(self, reason: FinishReason) -> None: ...

    def fail(self, message: str) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32  # sequences decoded together at most
    kv_budget_tokens: int = 32768  # KV memory budget, in tokens (all layers), shared by sequences and the cache
    block_size: int = 16  # accounting unit; 16 fp32 tokens of one head = one 4 KiB page
    prefill_chunk: int = 256  # tokens per prefill call (padded rows x length for a batch of short prompts)
    prefix_cache: bool = True
    max_cached: int = 16  # finished sequences kept for prefix reuse at most (LRU)
    # Speculative decoding (greedy, single running sequence): draft model variant name and tokens per round.
    draft: str = ""
    speculative_k: int = 0  # 0 = off

    def __post_init__(self) -> None:
        for name in ("max_running", "kv_budget_tokens", "block_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_cached < 0:
            raise ValueError(f"max_cached must be >= 0, got {self.max_cached}")


class Sampler:
    """Turns one row of logits into a token id; stateless apart from the row's own RNG."""

    @staticmethod
    def sample(logits: Float32Array, params: SamplingParams, rng: np.random.Generator) -> int:
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


class KVPool:
    """K/V memory for `slots` sequences of up to `capacity` tokens (see the module docstring)."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, slots: int, capacity: int) -> None:
        # Round capacity up so that every (array, slot) region starts on a page boundary (madvise needs it).
        token_bytes = head_dim * 4
        step = _PAGE // math.gcd(_PAGE, n_kv * token_bytes)
        self.capacity = -(-capacity // step) * step
        self.slots = slots
        self.n_arrays = 2 * n_layers
        self.region_bytes = n_kv * self.capacity * token_bytes  # one slot of one array
        self.tokens_per_page = max(1, _PAGE // token_bytes)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._map = mmap.mmap(-1, self.n_arrays * slots * self.region_bytes, flags=flags)
        base = np.frombuffer(self._map, dtype=np.float32).reshape(self.n_arrays, slots, n_kv, self.capacity, head_dim)
        self.arrays = [base[i] for i in range(self.n_arrays)]  # [key_0, value_0, key_1, ...]
        self.bytes_per_token = self.n_arrays * n_kv * token_bytes

    def copy(self, src: int, dst: int, length: int) -> None:
        if length > 0 and src != dst:
            for a in self.arrays:
                a[dst, :, :length] = a[src, :, :length]

    def release(self, slot: int) -> None:
        """Give the slot's pages back to the OS (they read as zeros afterwards)."""
        for i in range(self.n_arrays):
            self._map.madvise(mmap.MADV_DONTNEED, (i * self.slots + slot) * self.region_bytes, self.region_bytes)

    def close(self) -> None:
        self.arrays = []
        with contextlib.suppress(BufferError):  # numpy views may still exist; the mapping then dies with them
            self._map.close()


class ModelRunner:
    """Runs the decoder graph (contract in graph.py) over a contiguous range of KV slots."""

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata, pool: KVPool) -> None:
        self.session = session
        self.metadata = metadata
        self.pool = pool
        names = {i.name for i in session.get_inputs()}
        expected = 4 + 2 * metadata.num_layers
        if len(names) != expected or "logits_index" not in names:
            raise ValueError(f"model graph has inputs {sorted(names)[:6]}..., not the contract of graph.py")
        self._bindings: OrderedDict[tuple[int, int], ort.IOBinding] = OrderedDict()

    @staticmethod
    def session_for(version_dir: Path, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # graph calls are sequential: parallelism is inside each op
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Intra-op threads spin between the ~300 small ops of one decode step (waking a sleeping thread per op
        # made a single-stream step ~1.4x slower), and stop spinning when the call returns: between steps the
        # cores belong to the router, gateway and Envoy that share them with tritonserver.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(str(version_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"])

    def _binding(self, slot0: int, rows: int) -> ort.IOBinding:
        key = (slot0, rows)
        binding = self._bindings.get(key)
        if binding is not None:
            self._bindings.move_to_end(key)
            return binding
        binding = self.session.io_binding()
        pool = self.pool
        shape = [rows, self.metadata.num_kv_heads, pool.capacity, self.metadata.head_dim]
        for i, array in enumerate(pool.arrays):
            name = f"{'key' if i % 2 == 0 else 'value'}_{i // 2}"
            pointer = array.ctypes.data + slot0 * array.strides[0]
            binding.bind_input(f"past_{name}", "cpu", 0, np.float32, shape, pointer)
            binding.bind_output(f"present_{name}", "cpu", 0, np.float32, shape, pointer)
        self._bindings[key] = binding
        if len(self._bindings) > 256:
            self._bindings.popitem(last=False)
        return binding

    def forward(
        self, slot0: int, ids: Int64Array, seqlens_k: npt.NDArray[np.int32], logits_index: Int64Array
    ) -> Float32Array:
        """ids [B, S] for slots slot0..slot0+B-1; seqlens_k = tokens per row after this call - 1."""
        binding = self._binding(slot0, ids.shape[0])
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens_k, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(int(seqlens_k.max()) + 1, dtype=np.int32))
        binding.bind_cpu_input("logits_index", np.ascontiguousarray(logits_index, dtype=np.int64))
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        logits: Float32Array = binding.get_outputs()[-1].numpy()
        return logits


@dataclass
class _Seq:
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
    done: bool = False
    draft_len: int = 0  # leading tokens whose K/V are in the draft model's slot (speculative decoding)

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling


@dataclass
class _CacheEntry:
    tokens: Int64Array  # exactly the tokens whose K/V the slot holds
    slot: int
    blocks: int


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    prefilling: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    kv_bytes_per_block: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    prefill_tokens: int = 0  # computed
    prefill_tokens_saved: int = 0  # reused from the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0
    decode_steps: int = 0
    prefill_calls: int = 0
    finished: int = 0
    spec_rounds: int = 0
    spec_proposed: int = 0  # draft tokens proposed
    spec_accepted: int = 0  # draft tokens the target agreed with


class _CollectingSink:
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


class Engine:
    """Iteration-level scheduler over one ModelRunner (see the module docstring). `submit` may be called from
    any thread; `step`/`run` from one engine thread."""

    def __init__(self, runner: ModelRunner, config: EngineConfig, draft: ModelRunner | None = None) -> None:
        self.runner = runner
        self.config = config
        # The draft keeps its own KV in its own pool, slot for slot with the target's; it is caught up lazily
        # (seq.draft_len), so prefix-cache hits, moves and preemptions need no mirroring.
        self.draft = draft if config.speculative_k > 0 else None
        self.metadata = runner.metadata
        self.eos_token_ids = frozenset(runner.metadata.eos_token_ids)
        pool = runner.pool
        self.pool = pool
        self.capacity = min(pool.capacity, runner.metadata.context_length)
        self.block_size = config.block_size
        self.total_blocks = config.kv_budget_tokens // config.block_size
        self.blocks_used = 0
        self.slot_owner: list[_Seq | _CacheEntry | None] = [None] * pool.slots
        self.running: list[_Seq] = []  # running[i].slot == i
        self.prefilling: list[_Seq] = []  # admitted, prompt not fully computed yet; in admission order
        self.waiting: list[_Seq] = []
        self.cache: OrderedDict[int, _CacheEntry] = OrderedDict()  # slot -> entry, least recently used first
        self.stats = EngineStats(
            kv_blocks_total=self.total_blocks, kv_bytes_per_block=pool.bytes_per_token * self.block_size
        )
        self._inbox: list[_Seq] = []
        self._wake = threading.Condition()
        self._ids = 0

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
        return cls(ModelRunner(session, metadata, pool), config, draft)

    # ---- requests ---------------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest with a client-facing message if the request cannot run."""
        prompt, params = request.prompt_ids, request.sampling
        limit = self.capacity
        if len(prompt) == 0:
            raise InvalidRequest("input_ids is empty: the prompt needs at least one token")
        if params.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be positive, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"length of {limit} tokens"
            )
        if len(prompt) + params.max_tokens > self.total_blocks * self.block_size:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds this model's KV cache "
                f"budget of {self.total_blocks * self.block_size} tokens"
            )
        bad = [t for t in prompt if not 0 <= t < self.metadata.vocab_size]
        if bad:
            raise InvalidRequest(f"input_ids has ids outside [0, {self.metadata.vocab_size}): {bad[:5]}")
        if not (math.isfinite(params.temperature) and params.temperature >= 0.0):
            raise InvalidRequest(f"temperature must be >= 0, got {params.temperature}")
        if not (0.0 < params.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {params.top_k}")

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request (thread-safe); raises InvalidRequest before queueing anything."""
        self.validate(request)
        with self._wake:
            self._ids += 1
            seq = _Seq(
                id=self._ids,
                request=request,
                sink=sink,
                rng=np.random.default_rng(request.sampling.seed),
                tokens=[int(t) for t in request.prompt_ids],
                arrival=self._ids,
            )
            self._inbox.append(seq)
            self._wake.notify()

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting or self._inbox)

    def run(self, stop: threading.Event, idle_wait_s: float = 0.05) -> None:
        """Step until `stop` is set; sleeps while there is nothing to do."""
        while not stop.is_set():
            if not self.step():
                with self._wake:
                    if not self._inbox:
                        self._wake.wait(idle_wait_s)

    def run_idle_wait(self, timeout_s: float = 0.05) -> None:
        """Sleep until a request arrives (or `timeout_s`), for loops that call `step` themselves."""
        with self._wake:
            if not self._inbox:
                self._wake.wait(timeout_s)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def generate(
        self, requests: Sequence[GenerationRequest], on_token: Callable[[int, int], None] | None = None
    ) -> list[GenerationResult]:
        """Run `requests` to completion on the calling thread (tests, benchmarks, scoring)."""
        results = [GenerationResult() for _ in requests]
        for i, request in enumerate(requests):
            callback = None if on_token is None else (lambda token, i=i: on_token(i, token))  # type: ignore[misc]
            self.submit(request, _CollectingSink(results[i], callback))
        while self.has_work():
            self.step()
        return results

    # ---- one iteration ----------------------------------------------------------------------------------

    def step(self) -> bool:
        """One scheduler iteration: intake, cancellations, admission, one decode call, one prefill call.
        Returns False when there was nothing to do."""
        with self._wake:
            inbox, self._inbox = self._inbox, []
        self.waiting.extend(inbox)
        if not self.has_work():
            return False
        self._drop_cancelled()
        self._admit()
        try:
            if self.running:
                self._decode()
            if self.prefilling:
                self._prefill()
        except Exception as exc:
            # Not swallowed: every sequence in flight ends with the error, the engine stays usable.
            log.exception("engine step failed")
            self._fail_all(f"generation failed: {exc}")
        self._update_stats()
        return True

    def _update_stats(self) -> None:
        s = self.stats
        s.running, s.waiting, s.prefilling = len(self.running), len(self.waiting), len(self.prefilling)
        s.kv_blocks_used = self.blocks_used
        s.kv_blocks_cached = sum(e.blocks for e in self.cache.values())

    # ---- blocks and slots -------------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _reserve(self, seq: _Seq, tokens: int) -> bool:
        """Make `seq` own enough blocks for `tokens` tokens, evicting cached prefixes if needed."""
        extra = self._blocks_for(tokens) - seq.blocks
        if extra <= 0:
            return True
        while self.blocks_used + extra > self.total_blocks and self.cache:
            self._evict_oldest()
        if self.blocks_used + extra > self.total_blocks:
            return False
        self.blocks_used += extra
        seq.blocks += extra
        return True

    def _free_slot(self, below: int | None = None) -> int | None:
        """A free slot at or above n_running (highest first: the low range is where running rows go)."""
        low = len(self.running)
        for slot in range(len(self.slot_owner) - 1, low - 1, -1):
            if self.slot_owner[slot] is None and (below is None or slot < below):
                return slot
        return None

    def _free_run(self, count: int) -> int | None:
        """Start of `count` consecutive free slots at or above n_running (highest first)."""
        end = len(self.slot_owner)
        run = 0
        for slot in range(end - 1, len(self.running) - 1, -1):
            run = run + 1 if self.slot_owner[slot] is None else 0
            if run == count:
                return slot
        return None

    def _claim_slot(self) -> int:
        slot = self._free_slot()
        while slot is None and self.cache:
            self._evict_oldest()
            slot = self._free_slot()
        if slot is None:
            raise RuntimeError("no free KV slot (scheduler invariant broken)")
        return slot

    def _release(self, seq: _Seq) -> None:
        seq.draft_len = 0
        if seq.slot is not None:
            self.pool.release(seq.slot)
            if self.draft is not None:
                self.draft.pool.release(seq.slot)
            self.slot_owner[seq.slot] = None
            seq.slot = None
        self.blocks_used -= seq.blocks
        seq.blocks = 0
        seq.kv_len = 0

    def _move(self, owner: _Seq | _CacheEntry, dst: int) -> None:
        src = owner.slot
        assert src is not None and self.slot_owner[dst] is None
        length = owner.kv_len if isinstance(owner, _Seq) else int(owner.tokens.size)
        self.pool.copy(src, dst, length)
        self.pool.release(src)
        self.slot_owner[src] = None
        self.slot_owner[dst] = owner
        if isinstance(owner, _CacheEntry):
            del self.cache[src]
            owner.slot = dst
            self.cache[dst] = owner
            self.cache.move_to_end(dst, last=False)  # a move is not a use
        else:
            owner.slot = dst
            owner.draft_len = 0  # the draft's KV is not moved; it is recomputed when needed

    def _vacate(self, slot: int) -> None:
        """Move whatever non-running owner sits in `slot` elsewhere."""
        owner = self.slot_owner[slot]
        if owner is None:
            return
        target = self._free_slot()
        if target is None or target == slot:
            if isinstance(owner, _CacheEntry):
                self._evict(owner)
                return
            raise RuntimeError("no free KV slot to vacate into (scheduler invariant broken)")
        self._move(owner, target)

    def _join_running(self, seq: _Seq) -> None:
        dst = len(self.running)
        if seq.slot != dst:
            self._vacate(dst)
            self._move(seq, dst)
        self.running.append(seq)

    def _leave_running(self, seq: _Seq, keep_cache: bool) -> None:
        index = seq.slot
        assert index is not None and self.running[index] is seq
        if keep_cache:
            self._to_cache(seq)
        else:
            self._release(seq)
        last = self.running.pop()
        if last is not seq:
            self.running[index] = last
            self._move(last, index)

    # ---- prefix cache -----------------------------------------------------------------------------------

    def _to_cache(self, seq: _Seq) -> None:
        """Turn a finished sequence's slot into a cache entry, or release it."""
        if not self.config.prefix_cache or self.config.max_cached == 0 or seq.kv_len < self.block_size:
            self._release(seq)
            return
        while len(self.cache) >= self.config.max_cached:
            self._evict_oldest()
        src = seq.slot
        assert src is not None
        entry = _CacheEntry(np.asarray(seq.tokens[: seq.kv_len], dtype=np.int64), src, seq.blocks)
        if src < len(self.running):  # a running row: its slot must be given back to the running range
            target = self._free_slot()
            if target is None:
                self._release(seq)
                return
            self.pool.copy(src, target, seq.kv_len)
            self.pool.release(src)
            self.slot_owner[src] = None
            entry.slot = target
        self.slot_owner[entry.slot] = entry
        self.cache[entry.slot] = entry
        # The blocks move from the sequence to the cache entry.
        seq.slot, seq.blocks, seq.kv_len = None, 0, 0

    def _evict(self, entry: _CacheEntry) -> None:
        del self.cache[entry.slot]
        self.pool.release(entry.slot)
        self.slot_owner[entry.slot] = None
        self.blocks_used -= entry.blocks

    def _evict_oldest(self) -> None:
        self._evict(next(iter(self.cache.values())))

    def _lookup(self, seq: _Seq) -> None:
        """Copy the longest cached prefix (whole blocks, leaving >= 1 token to compute) into seq's slot."""
        if not self.config.prefix_cache:
            return
        self.stats.prefix_queries += 1
        prompt = np.asarray(seq.tokens, dtype=np.int64)
        best, best_len = None, 0
        for entry in self.cache.values():
            n = min(entry.tokens.size, prompt.size - 1)
            if n < self.block_size:
                continue
            diff = np.flatnonzero(entry.tokens[:n] != prompt[:n])
            common = int(diff[0]) if diff.size else n
            usable = common // self.block_size * self.block_size
            if usable > best_len:
                best, best_len = entry, usable
        if best is None:
            return
        self.cache.move_to_end(best.slot)
        assert seq.slot is not None
        self.pool.copy(best.slot, seq.slot, best_len)
        seq.kv_len = best_len
        self.stats.prefix_hits += 1
        self.stats.prefill_tokens_saved += best_len

    # ---- scheduling ---------------------------------------------------------------------------------------

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        if seq.done:
            return
        seq.done = True
        seq.kv_len = min(seq.kv_len, len(seq.tokens))  # speculation may have computed tokens never emitted
        if seq in self.running:
            self._leave_running(seq, keep_cache=reason != "cancelled")
        else:
            if seq in self.prefilling:
                self.prefilling.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            self._release(seq)
        self.stats.finished += 1
        seq.sink.finish(reason)

    def _fail_all(self, message: str) -> None:
        for seq in [*self.running, *self.prefilling, *self.waiting]:
            seq.done = True
            with contextlib.suppress(Exception):
                seq.sink.fail(message)
        for seq in list(self.running):
            self._release(seq)
        for seq in [*self.prefilling, *self.waiting]:
            self._release(seq)
        self.running, self.prefilling, self.waiting = [], [], []

    def _drop_cancelled(self) -> None:
        for seq in [*self.running, *self.prefilling, *self.waiting]:
            if seq.sink.cancelled():
                self._finish(seq, "cancelled")

    def _admit(self) -> None:
        """Move waiting sequences (priority, then arrival) into prefill while slots and blocks allow."""
        if not self.waiting:
            return
        self.waiting.sort(key=lambda s: (s.request.priority, s.arrival))
        while self.waiting and len(self.running) + len(self.prefilling) < self.config.max_running:
            seq = self.waiting[0]
            if not self._reserve(seq, len(seq.tokens) + 1):
                break  # wait for blocks; the queue order is kept (no overtaking by smaller requests)
            self.waiting.pop(0)
            seq.slot = self._claim_slot()
            self.slot_owner[seq.slot] = seq
            self._lookup(seq)
            self.prefilling.append(seq)

    def _emit(self, seq: _Seq, logits: Float32Array) -> bool:
        """Sample seq's next token; returns True if the sequence goes on."""
        return self._accept(seq, Sampler.sample(logits, seq.sampling, seq.rng))

    def _accept(self, seq: _Seq, token: int) -> bool:
        if token in self.eos_token_ids:
            self._finish(seq, "stop")
            return False
        seq.tokens.append(token)
        seq.generated += 1
        self.stats.generated_tokens += 1
        seq.sink.token(token)
        if seq.generated >= seq.sampling.max_tokens:
            self._finish(seq, "length")
            return False
        return True

    def _grow_or_preempt(self) -> None:
        """Every running sequence needs room for one more token; preempt the newest ones until it fits."""
        for seq in list(self.running):
            if seq.done or seq not in self.running:
                continue
            while not self._reserve(seq, seq.kv_len + 1):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                if victim is seq:
                    break

    def _preempt(self, seq: _Seq) -> None:
        """Drop seq's KV and queue it again; on re-admission its prompt + emitted tokens are recomputed."""
        self._leave_running(seq, keep_cache=False)
        self.waiting.insert(0, seq)
        self.stats.preemptions += 1
        log.info("preempted sequence %d (%d tokens) to free KV blocks", seq.id, len(seq.tokens))

    def _decode(self) -> None:
        self._grow_or_preempt()
        rows = list(self.running)
        if not rows:
            return
        if len(rows) == 1 and self._speculate(rows[0]):
            return
        ids = np.array([[s.tokens[-1]] for s in rows], dtype=np.int64)
        lengths = np.array([s.kv_len for s in rows], dtype=np.int32)  # after this step: kv_len + 1 tokens
        logits = self.runner.forward(0, ids, lengths, np.arange(len(rows), dtype=np.int64))
        self.stats.decode_steps += 1
        for seq in rows:
            seq.kv_len += 1
        for b, seq in enumerate(rows):
            self._emit(seq, logits[b])

    def _speculate(self, seq: _Seq) -> bool:
        """One greedy speculative round for a lone running sequence: the draft proposes k tokens one by one,
        the target checks all of them in one call (S = k + 1), the agreeing prefix plus the target's own next
        token are emitted. Output is the target's greedy output. Returns False when it does not apply."""
        draft, k = self.draft, self.config.speculative_k
        if draft is None or seq.sampling.temperature != 0.0 or self.prefilling or self.waiting:
            return False  # newcomers first: a round is ~k times longer than a step
        if seq.kv_len + k + 1 > self.capacity or not self._reserve(seq, seq.kv_len + k + 1):
            return False
        slot = seq.slot
        assert slot is not None
        while seq.draft_len < seq.kv_len:  # catch the draft up (after prefill, a cache hit or a move)
            end = min(seq.kv_len, seq.draft_len + self.config.prefill_chunk)
            ids = np.array([seq.tokens[seq.draft_len : end]], dtype=np.int64)
            draft.forward(slot, ids, np.array([end - 1], dtype=np.int32), np.array([end - seq.draft_len - 1]))
            seq.draft_len = end
        proposals: list[int] = []
        last = seq.tokens[-1]
        for _ in range(k):
            logits = draft.forward(
                slot, np.array([[last]], dtype=np.int64), np.array([seq.draft_len], dtype=np.int32), np.array([0])
            )
            seq.draft_len += 1
            last = int(np.argmax(logits[0]))
            proposals.append(last)
        ids = np.array([[seq.tokens[-1], *proposals]], dtype=np.int64)
        logits = self.runner.forward(
            slot, ids, np.array([seq.kv_len + k], dtype=np.int32), np.arange(k + 1, dtype=np.int64)
        )
        choices = logits.argmax(axis=1)
        accepted = 0
        while accepted < k and proposals[accepted] == int(choices[accepted]):
            accepted += 1
        self.stats.spec_rounds += 1
        self.stats.spec_proposed += k
        self.stats.spec_accepted += accepted
        self.stats.decode_steps += 1
        seq.kv_len += 1 + accepted  # the fed token and the accepted drafts; the rest is overwritten later
        seq.draft_len = min(seq.draft_len, seq.kv_len)
        for token in [*proposals[:accepted], int(choices[accepted])]:
            if not self._accept(seq, token):
                break
        return True

    def _prefill(self) -> None:
        head = self.prefilling[0]
        chunk = self.config.prefill_chunk
        if head.kv_len > 0 or len(head.tokens) > chunk:
            self._prefill_chunk(head, chunk)
            return
        # A batch of whole short prompts without cached prefixes, right-padded to the longest.
        group = [head]
        for seq in self.prefilling[1:]:
            width = max(len(s.tokens) for s in [*group, seq])
            if seq.kv_len > 0 or width * (len(group) + 1) > chunk:
                break
            group.append(seq)
        start = self._free_run(len(group)) if len(group) > 1 else None
        if start is None:
            self._prefill_chunk(head, chunk)
            return
        for seq in group:  # nothing computed yet, so moving is only bookkeeping
            assert seq.slot is not None
            self.slot_owner[seq.slot] = None
        for i, seq in enumerate(group):
            seq.slot = start + i
            self.slot_owner[seq.slot] = seq
        width = max(len(s.tokens) for s in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        for i, seq in enumerate(group):
            ids[i, : len(seq.tokens)] = seq.tokens
        lengths = np.array([len(s.tokens) - 1 for s in group], dtype=np.int32)
        # GroupQueryAttention treats the call as a first prompt (S == total length): rows are right-padded.
        index = np.array([i * width + len(s.tokens) - 1 for i, s in enumerate(group)], dtype=np.int64)
        logits = self.runner.forward(start, ids, lengths, index)
        self.stats.prefill_calls += 1
        for i, seq in enumerate(group):
            self.stats.prefill_tokens += len(seq.tokens)
            seq.kv_len = len(seq.tokens)
            self.prefilling.remove(seq)
            if self._emit(seq, logits[i]):
                self._join_running(seq)

    def _prefill_chunk(self, seq: _Seq, chunk: int) -> None:
        assert seq.slot is not None
        start = seq.kv_len
        end = min(len(seq.tokens), start + chunk)
        ids = np.array([seq.tokens[start:end]], dtype=np.int64)
        logits = self.runner.forward(
            seq.slot, ids, np.array([end - 1], dtype=np.int32), np.array([end - start - 1], dtype=np.int64)
        )
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += end - start
        seq.kv_len = end
        if end == len(seq.tokens):
            self.prefilling.remove(seq)
            if self._emit(seq, logits[0]):
                self._join_running(seq)

    # ---- scoring --------------------------------------------------------------------------------------

    def score(self, prompt: Sequence[int], all_positions: bool = False) -> Float32Array:
        """Logits after each prompt token ([len, vocab]) or after the last one ([vocab]), computed alone in a
        scratch slot (numerics checks, perplexity). Only between steps, on the engine's thread."""
        slot = self._claim_slot()
        try:
            n = len(prompt)
            index = np.arange(n) if all_positions else np.array([n - 1])
            logits = self.runner.forward(
                slot, np.array([list(prompt)], dtype=np.int64), np.array([n - 1], dtype=np.int32), index
            )
        finally:
            self.pool.release(slot)
        return logits if all_positions else logits[0]

    def close(self) -> None:
        self.pool.close()
