"""Tokenizer and chat template of a built model version directory. No torch: the router imports this.

`build_tokenizer` turns GGUF tokenizer metadata into a `tokenizers.Tokenizer` (saved as `tokenizer.json` at build
time); `ChatTokenizer` loads that file plus `llmesh_model.json` at serve time. Two GGUF tokenizer models are
supported: byte-level BPE ("gpt2", e.g. SmolLM2, Qwen2.5) and SentencePiece ("llama", e.g. Gemma 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from llmesh.model_artifact import TOKENIZER_FILE

if TYPE_CHECKING:
    from triton_models.gguf_loader import TokenizerMetadata

# GGUF token types (llama.cpp's llama_token_type): 1 = normal, 3 = control, 4 = user defined, 6 = byte (<0xXX>).
_NORMAL = 1
_CONTROL = 3
_USER_DEFINED = 4

# SentencePiece writes spaces as this character inside its tokens.
_SPM_SPACE = "\u2581"

# Control tokens that end a turn in common chat formats; llama.cpp treats the same names as end-of-generation.
# Only those present in the vocab as control tokens are used, next to the GGUF's eos id. Qwen's three FIM
# control tokens are on llama.cpp's list too (it stops on them), so a Qwen model stops where llama.cpp does.
_END_OF_TURN_NAMES = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|eom_id|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 split (src/llama-vocab.cpp): Qwen2's tokenizer.json regex with the
# case-insensitive contraction group spelled out in ASCII, as llama.cpp does (`(?i:'s)` in Oniguruma would also
# fold e.g. the long s U+017F to "s"). Every digit is its own piece. llama.cpp runs a hand-written matcher for
# exactly this regex (unicode.cpp, unicode_regex_split_custom_qwen2); tests/unit/test_tokenizer_qwen.py checks
# the two agree on llama.cpp's own output.
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name (only byte-level BPE families)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre == "smollm":
        # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit on its own, then GPT-2 splitting. This is what
        # SmolLM's HF tokenizer.json encodes as Sequence[Digits(individual_digits), ByteLevel].
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "qwen2":
        # No NFC normalizer, unlike Qwen2's tokenizer.json: llama.cpp does not normalize, and the served GGUF is
        # llama.cpp's model, so decomposed text ("e" + U+0301) keeps its decomposed ids here too.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise NotImplementedError(
        f"GGUF pre-tokenizer {pre!r} is not supported yet (known: default, gpt2, smollm, qwen2); "
        f"its split regex must be added to triton_models/tokenizer.py"
    )


def build_tokenizer(meta: TokenizerMetadata) -> Tokenizer:
    """The HF tokenizer equivalent to llama.cpp's for this GGUF vocabulary (same ids for the same text)."""
    vocab = {token: i for i, token in enumerate(meta.tokens)}
    if len(vocab) != len(meta.tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    if meta.model == "gpt2":
        tokenizer = _byte_level_bpe(meta, vocab)
    elif meta.model == "llama":
        tokenizer = _sentencepiece(meta, vocab)
    else:
        raise NotImplementedError(
            f"GGUF tokenizer model {meta.model!r} is not supported "
            f"(known: gpt2 = byte-level BPE, llama = SentencePiece)"
        )
    # Control and user-defined tokens are matched whole in the raw text, before the model, so that e.g.
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


def _byte_level_bpe(meta: TokenizerMetadata, vocab: dict[str, int]) -> Tokenizer:
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
    return tokenizer


def _sentencepiece(meta: TokenizerMetadata, vocab: dict[str, int]) -> Tokenizer:
    """llama.cpp's SPM tokenizer as HF BPE.

    llama.cpp splits the text into UTF-8 characters and repeatedly merges the adjacent pair whose concatenation
    is the vocab token with the highest score (leftmost on ties); characters left without a token become their
    <0xXX> byte tokens. HF BPE does the same given one merge per (left, right) split of each token, ranked by the
    token's score (`_spm_merges`), plus byte_fallback.
    """
    if len(meta.scores) != len(meta.tokens):
        raise ValueError(f"SentencePiece GGUF has {len(meta.scores)} scores for {len(meta.tokens)} tokens")
    if meta.unk_id is None or not 0 <= meta.unk_id < len(meta.tokens):
        raise ValueError("SentencePiece GGUF names no unknown token")
    merges = _spm_merges(meta.tokens, meta.token_types, meta.scores, vocab)
    # unk is only reached when a byte token is missing: the byte tokens cover every character.
    model = models.BPE(
        vocab=vocab, merges=merges, unk_token=meta.tokens[meta.unk_id], fuse_unk=True, byte_fallback=True
    )
    tokenizer = Tokenizer(model)
    # No pre-tokenizer: llama.cpp merges across the whole text between special tokens, and the vocab has a
    # token spanning a space (">▁</"), which splitting at spaces would never form.
    escape = normalizers.Replace(" ", _SPM_SPACE)
    if meta.add_space_prefix:
        # HF normalizes each stretch of text between added tokens on its own, so this prepends after every
        # control / user-defined token too, as llama.cpp does (it adds the space after any special fragment).
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), escape])
    else:
        tokenizer.normalizer = escape
    steps: list[decoders.Decoder] = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _spm_merges(
    tokens: Sequence[str], token_types: Sequence[int], scores: Sequence[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """BPE merges reproducing SentencePiece's score-greedy merging: every split of a normal token into two
    normal tokens, highest token score first (ties by left then right id, only to be deterministic).

    Only normal tokens take part: control and user-defined tokens are cut out of the text before merging, so
    they never occur as pieces, and byte tokens are fallback output, not text. (llama.cpp would also merge a
    literal "<0x41>" in the text into that byte token if every step existed in the vocab; the HF and
    SentencePiece tokenizers do not, and neither does this.)
    """
    # A GGUF without token types marks nothing special: every token is normal.
    normal = [kind == _NORMAL for kind in token_types] if token_types else [True] * len(tokens)
    ranked: list[tuple[float, int, int]] = []
    for i, token in enumerate(tokens):
        if not normal[i] or len(token) < 2:
            continue
        priority = -scores[i]
        for cut in range(1, len(token)):
            left = vocab.get(token[:cut])
            if left is None or not normal[left]:
                continue
            right = vocab.get(token[cut:])
            if right is not None and normal[right]:
                ranked.append((priority, left, right))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, left, right in ranked]


@dataclass(frozen=True)
class HFTokenizerInfo:
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None


def load_hf_tokenizer(directory: Path) -> tuple[Tokenizer, HFTokenizerInfo]:
    """tokenizer.json of a Hugging Face checkpoint as it is, plus what tokenizer_config.json, config.json and
    generation_config.json say about BOS, end of generation and the chat template."""
    import json

    def read(name: str) -> dict[str, Any]:
        path = directory / name
        return json.loads(path.read_text()) if path.is_file() else {}

    if not (directory / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {TOKENIZER_FILE} (a Hugging Face 'fast' tokenizer is needed)")
    tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    settings = read("tokenizer_config.json")

    def token(value: object) -> str | None:
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    bos, eos = token(settings.get("bos_token")), token(settings.get("eos_token"))
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    ids: set[int] = set()
    for source in (read("config.json"), read("generation_config.json")):
        value = source.get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    eos_id = tokenizer.token_to_id(eos) if eos is not None else None
    if eos_id is not None:
        ids.add(int(eos_id))
    if not ids:
        raise ValueError(f"{directory}: no end-of-sequence token in its config.json or tokenizer_config.json")
    if isinstance(template, str) and "bos_token" in template:
        # The template writes BOS itself (transformers then encodes without special tokens); the engine's
        # encode adds them, so drop the tokenizer's own BOS to avoid two.
        tokenizer.post_processor = None
    return tokenizer, HFTokenizerInfo(bos, eos, tuple(sorted(ids)), template if isinstance(template, str) else None)


def eos_token_ids(meta: TokenizerMetadata) -> tuple[int, ...]:
    ids = {meta.eos_id} if meta.eos_id is not None else set()
    for i, (token, kind) in enumerate(zip(meta.tokens, meta.token_types, strict=False)):
        if kind == _CONTROL and token in _END_OF_TURN_NAMES:
            ids.add(i)
    if not ids:
        raise ValueError("GGUF names no end-of-sequence token")
    return tuple(sorted(ids))


# Gemma's turn format, for GGUFs that carry no chat template (the Gemma-3-270M base model's does not). Gemma has
# no system role: system text goes before the first user turn. No BOS here: the tokenizer adds it.
GEMMA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + message['content'] | trim + '\n\n' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' -}}"
    "{%- if message['role'] == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- message['content'] | trim + '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)


def default_chat_template(arch: str) -> str | None:
    """The chat template to use when the checkpoint has none (None: the model cannot take chat requests)."""
    return GEMMA_CHAT_TEMPLATE if arch == "gemma3" else None
