"""Continuous-batching token generation with onnxruntime and numpy (no Triton, no torch): testable on its own.

Parts, bottom up (each module's docstring has the details):

  requests      GenerationRequest, EngineSampling, RequestRejected, the Sink contract, per-sequence (per-choice) state
  sampler       next token from one row of logits (bias, penalties, greedy, temperature, top-k, top-p), logprobs
  grammar       grammar-constrained decoding (llguidance), loaded on the first constrained request
  kv_pool       KV memory: one anonymous mapping, a slot per sequence, pages handed back on release
  runner        the Runner protocol (one graph call over a range of slots) and ModelRunner (onnxruntime)
  kv_blocks     the KV block budget
  prefix_cache  LRU index of finished sequences' KV for prefix reuse
  slots         the slot table: who holds each slot, moves, eviction, the running-range layout
  speculative   greedy speculative decoding with a draft model
  scheduler     iteration-level scheduling with per-request fault isolation
  core          Engine: wiring from a model folder, thread-safe intake, the run loop
"""

from triton_models.engine.core import STOPPED_MESSAGE, Engine, EngineStopped
from triton_models.engine.kv_pool import KVPool
from triton_models.engine.requests import (
    EngineSampling,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    RequestRejected,
    Sink,
    TokenLogprob,
)
from triton_models.engine.runner import MODEL_FILE, ModelRunner, Runner
from triton_models.engine.sampler import Sampler
from triton_models.engine.scheduler import Scheduler
from triton_models.engine.settings import EngineConfig, EngineStats

__all__ = [
    "MODEL_FILE",
    "STOPPED_MESSAGE",
    "Engine",
    "EngineConfig",
    "EngineSampling",
    "EngineStats",
    "EngineStopped",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "KVPool",
    "ModelRunner",
    "RequestRejected",
    "Runner",
    "Sampler",
    "Scheduler",
    "Sink",
    "TokenLogprob",
]
