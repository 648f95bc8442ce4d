"""A built model version directory as the serving side reads it (`<repository>/<variant>/1/`).

The builder (triton_models) writes `llmesh_model.json` (ModelMetadata) and `tokenizer.json` next to the graph;
the router and the Triton model read them back through this module, so neither imports the builder, torch or the
GGUF at serve time. This file format is the contract between the two.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from tokenizers import Tokenizer, decoders

TOKENIZER_FILE = "tokenizer.json"
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
    weights: str = "fp32"  # VariantSpec.weights
    engine: dict[str, int | bool | str] = field(default_factory=dict)  # engine.EngineConfig fields

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, version_dir: Path) -> ModelMetadata:
        raw = json.loads((version_dir / METADATA_FILE).read_text())
        raw["eos_token_ids"] = tuple(int(i) for i in raw["eos_token_ids"])
        return cls(**raw)


def _raise_exception(message: str) -> NoReturn:
    # HF chat templates call raise_exception(...) to reject malformed conversations.
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> Any:
    """Compile an HF-style chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTokenizer:
    """Tokenizer + chat template + stop ids of one built model version directory (`<repo>/<variant>/1`)."""

    def __init__(self, tokenizer: Tokenizer, metadata: ModelMetadata) -> None:
        self._tokenizer = tokenizer
        self.metadata = metadata
        self._template = compile_chat_template(metadata.chat_template) if metadata.chat_template else None

    @classmethod
    def from_model_dir(cls, version_dir: Path) -> ChatTokenizer:
        return cls(Tokenizer.from_file(str(version_dir / TOKENIZER_FILE)), ModelMetadata.load(version_dir))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.metadata.eos_token_ids)

    @property
    def context_length(self) -> int:
        return self.metadata.context_length

    @property
    def vocab_size(self) -> int:
        return self.metadata.vocab_size

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError(f"model {self.metadata.variant!r} has no chat template")
        return str(
            self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.metadata.bos_token or "",
                eos_token=self.metadata.eos_token or "",
            )
        )

    def encode(self, text: str) -> list[int]:
        # Special tokens in `text` (e.g. from the chat template) map to their single ids; BOS is added only
        # when the GGUF says add_bos_token (through the post-processor).
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def decode_stream(self, skip_special_tokens: bool = True) -> decoders.DecodeStream:
        """Incremental detokenizer for streamed ids: `.step(tokenizer_obj, id)` returns new text or None
        while a multi-byte character is incomplete. Pass `self.hf_tokenizer` as the tokenizer."""
        return decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    @property
    def hf_tokenizer(self) -> Tokenizer:
        return self._tokenizer
