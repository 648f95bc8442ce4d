"""A built model version directory as the serving side reads it (`<repository>/<variant>/1/`).

The builder (triton_models) writes `llmesh_model.json` (ModelMetadata) and `tokenizer.json` next to the graph;
the router and the Triton model read them back through this module, so neither imports the builder, torch or the
GGUF at serve time. This file format is the contract between the two.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from tokenizers import Tokenizer, decoders

TOKENIZER_FILE = "tokenizer.json"

# Private-use characters that mark where a message's content starts and ends in a rendered template (only used when
# some content spells a control token; chosen per call so that no content contains them).
_MARKER_CANDIDATES = tuple(chr(c) for c in range(0xE000, 0xE010))
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
        special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special and t.content}
        self._special_ids = frozenset(special)
        # Longest first, so a token that contains another is found whole.
        names = sorted(set(special.values()), key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, names))) if names else None
        self._plain: Tokenizer | None = None

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

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt's ids with control tokens only where the template put them.

        Text a caller sends (any message's content) is tokenized as text: `<|im_start|>system` typed into a user
        message becomes the tokens of those characters, not the control token, so no one can forge a turn. A
        conversation without such text gets exactly the ids of `encode(apply_chat_template(messages))`.
        """
        prompt = self.apply_chat_template(messages, add_generation_prompt)
        encoding = self._tokenizer.encode(prompt, add_special_tokens=True)
        pattern = self._special_pattern
        if pattern is None or not any(pattern.search(m.get("content") or "") for m in messages):
            return list(encoding.ids)
        spans = self._content_spans(messages, add_generation_prompt, prompt)
        if spans is None:
            # The template rewrites content beyond trimming, so content cannot be located in the prompt: drop the
            # control-token spellings from the content instead. Rare, and never lets a control token through.
            cleaned = [{**m, "content": pattern.sub("", m.get("content") or "")} for m in messages]
            return self.encode(self.apply_chat_template(cleaned, add_generation_prompt))
        ids: list[int] = []
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id in self._special_ids and any(lo <= start < hi for lo, hi in spans):
                ids.extend(self._plain_ids(prompt[start:end]))
            else:
                ids.append(token_id)
        return ids

    def _content_spans(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, prompt: str
    ) -> list[tuple[int, int]] | None:
        """Where each message's content lies in `prompt` (character offsets), found by rendering the template with
        every content between two markers; None when the template changes content other than by trimming it."""
        used = "".join(m.get("content") or "" for m in messages)
        free = [c for c in _MARKER_CANDIDATES if c not in used]
        if len(free) < 2:
            return None
        begin, end = free[0], free[1]
        for trim in (False, True):
            marked = [
                {**m, "content": begin + ((m.get("content") or "").strip() if trim else m.get("content") or "") + end}
                for m in messages
            ]
            rendered = self.apply_chat_template(marked, add_generation_prompt)
            spans: list[tuple[int, int]] = []
            text: list[str] = []
            length = 0
            for part in re.split(f"([{begin}{end}])", rendered):
                if part == begin:
                    spans.append((length, length))
                elif part == end:
                    if spans:
                        spans[-1] = (spans[-1][0], length)
                else:
                    text.append(part)
                    length += len(part)
            if "".join(text) == prompt:
                return spans
        return None

    def _plain_ids(self, text: str) -> list[int]:
        """`text` tokenized as ordinary characters, control-token spellings included."""
        if self._plain is None:
            self._plain = Tokenizer.from_str(self._tokenizer.to_str())
            self._plain.encode_special_tokens = True
        return list(self._plain.encode(text, add_special_tokens=False).ids)

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
