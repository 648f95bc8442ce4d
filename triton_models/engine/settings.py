"""The engine's settings (EngineConfig, from the built model's llmesh_model.json) and its counters (EngineStats,
exported as Triton metrics by python_model.py)."""

from __future__ import annotations

from dataclasses import dataclass


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
    # A sequence speculates while its recent acceptance (an average over its last rounds) stays at least this; below
    # it, drafting costs more than it saves (the Qwen 0.5B drafting for the 1.5B: 1.15x at 75% acceptance on code,
    # 0.74x at 44% on prose), so it decodes plainly and tries a round again every `speculative_retry_steps` steps.
    speculative_min_acceptance: float = 0.6
    speculative_retry_steps: int = 16
    max_choices: int = 8  # n choices per request at most

    def __post_init__(self) -> None:
        for name in ("max_running", "kv_budget_tokens", "block_size", "prefill_chunk", "max_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_cached < 0:
            raise ValueError(f"max_cached must be >= 0, got {self.max_cached}")
        if not 0.0 <= self.speculative_min_acceptance <= 1.0 or self.speculative_retry_steps < 1:
            raise ValueError("speculative_min_acceptance must be in [0, 1] and speculative_retry_steps >= 1")


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
    prefill_tokens: int = 0  # computed (a prompt of n choices once: the siblings copy choice 0's KV)
    prefill_tokens_saved: int = 0  # reused from the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0
    decode_steps: int = 0
    prefill_calls: int = 0
    finished: int = 0
    failed: int = 0  # requests ended by an error (a fault in their step, or the engine stopping)
    forks: int = 0  # choices that copied a sibling's computed prompt instead of computing it
    spec_rounds: int = 0
    spec_proposed: int = 0  # draft tokens proposed
    spec_accepted: int = 0  # draft tokens the target agreed with
    spec_paused_steps: int = 0  # plain steps of a lone sequence whose drafts were mostly refused
