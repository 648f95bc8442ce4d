"""Tokenizer and chat template of a built model version directory. No torch: the router imports this.

`build_tokenizer` turns GGUF tokenizer metadata into a `tokenizers.Tokenizer` (saved as `tokenizer.json` at build
time); `ChatTokenizer` loads that file plus `llmesh_model.json` at serve time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from triton_models.config import ModelMetadata

if TYPE_CHECKING:
    from triton_models.gguf_loader import TokenizerMetadata

TOKENIZER_FILE = "tokenizer.json"

# GGUF token types that are not plain vocabulary (llama.cpp: 3 = control, 4 = user defined).
_CONTROL = 3
_USER_DEFINED = 4

# Control tokens that end a turn in common chat formats; llama.cpp treats the same names as end-of-generation.
# Only those present in the vocab as control tokens are used, next to the GGUF's eos id.
_END_OF_TURN_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name (only byte-level BPE families)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre == "smollm":
        # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit on its own, then GPT-2 splitting. This is what
        # SmolLM's HF tokenizer.json encodes as Sequence[Digits(individual_digits), ByteLevel].
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise NotImplementedError(
        f"GGUF pre-tokenizer {pre!r} is not supported yet (known: default, gpt2, smollm); "
        f"its split regex must be added to triton_models/tokenizer.py"
    )


def build_tokenizer(meta: TokenizerMetadata) -> Tokenizer:
    if meta.model != "gpt2":
        raise NotImplementedError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {meta.model!r}")
    vocab = {token: i for i, token in enumerate(meta.tokens)}
    if len(vocab) != len(meta.tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    merges = []
    for merge in meta.merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"malformed GGUF merge {merge!r}")
        merges.append((left, right))
    # No unk_token: byte-level BPE covers every byte. (The GGUF's unknown id 0 is <|endoftext|>; mapping
    # anything to it would silently end generations.)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.pre)
    tokenizer.decoder = decoders.ByteLevel()
    # Control and user-defined tokens are matched whole in the raw text, before BPE, so that e.g.
    # "<|im_start|>" encodes as one id (add_tokens keeps the ids they already have in the vocab).
    specials = [
        AddedToken(meta.tokens[i], special=(kind == _CONTROL), normalized=False)
        for i, kind in enumerate(meta.token_types)
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    tokenizer.add_tokens(specials)
    if meta.add_bos and meta.bos_id is not None:
        bos = meta.tokens[meta.bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta.bos_id)]
        )
    return tokenizer


def eos_token_ids(meta: TokenizerMetadata) -> tuple[int, ...]:
    ids = {meta.eos_id} if meta.eos_id is not None else set()
    for i, (token, kind) in enumerate(zip(meta.tokens, meta.token_types, strict=False)):
        if kind == _CONTROL and token in _END_OF_TURN_NAMES:
            ids.add(i)
    if not ids:
        raise ValueError("GGUF names no end-of-sequence token")
    return tuple(sorted(ids))


def _raise_exception(message: str) -> NoReturn:
    # HF chat templates call raise_exception(...) to reject malformed conversations.
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> Any:
    """Compile an HF-style chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    import json

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
