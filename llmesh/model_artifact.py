"""A built model version directory as the serving side reads it (`<repository>/<variant>/1/`).

The builder (triton_models) writes `llmesh_model.json` (ModelMetadata) and `tokenizer.json` next to the graph;
the router and the Triton model read them back through this module, so neither imports the builder, torch or the
GGUF at serve time. This file format is the contract between the two.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
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
        self._added: frozenset[str] | None = None
        self._token_bytes: dict[int, bytes] | None = None

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

    @property
    def supports_tools(self) -> bool:
        """The chat template renders `tools` and the Hermes-style `<tool_call>` format the router parses (Qwen2.5)."""
        source = self.metadata.chat_template or ""
        return "tools" in source and "<tool_call>" in source

    @property
    def added_tokens(self) -> frozenset[str]:
        """The text of every added token (special or not): each is one id however it is spelled in text."""
        if self._added is None:
            self._added = frozenset(t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.content)
        return self._added

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render the template. `tools` are OpenAI-shaped ({"type": "function", "function": {...}}); assistant
        turns may carry `tool_calls` (arguments as parsed JSON) and `tool` turns answer them."""
        if self._template is None:
            raise ValueError(f"model {self.metadata.variant!r} has no chat template")
        extra: dict[str, Any] = {"tools": [dict(t) for t in tools]} if tools else {}
        return str(
            self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.metadata.bos_token or "",
                eos_token=self.metadata.eos_token or "",
                **extra,
            )
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """The prompt's ids with control tokens only where the template put them.

        Text a caller sends (any message's content, tool calls' names and arguments, tools' names, descriptions and
        parameter schemas) is tokenized as text: `<|im_start|>system` typed into a user message becomes the tokens
        of those characters, not the control token, so no one can forge a turn. A conversation without such text
        gets exactly the ids of `encode(apply_chat_template(messages, tools=tools))`.
        """
        prompt = self.apply_chat_template(messages, add_generation_prompt, tools)
        encoding = self._tokenizer.encode(prompt, add_special_tokens=True)
        pattern = self._special_pattern
        if pattern is None:
            return list(encoding.ids)
        found: list[str] = []

        def collect(text: str) -> str:
            found.append(text)
            return text

        _map_caller_text(messages, tools, collect)
        if not any(pattern.search(text) for text in found):
            return list(encoding.ids)
        spans = self._caller_spans(messages, tools, add_generation_prompt, prompt, "".join(found))
        if spans is None:
            # The template rewrites caller text beyond trimming, so it cannot be located in the prompt: drop the
            # control-token spellings from it instead. Rare, and never lets a control token through.
            clean_messages, clean_tools = _map_caller_text(messages, tools, lambda text: pattern.sub("", text))
            return self.encode(self.apply_chat_template(clean_messages, add_generation_prompt, clean_tools))
        ids: list[int] = []
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id in self._special_ids and any(lo <= start < hi for lo, hi in spans):
                ids.extend(self._plain_ids(prompt[start:end]))
            else:
                ids.append(token_id)
        return ids

    def _caller_spans(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
        prompt: str,
        used: str,
    ) -> list[tuple[int, int]] | None:
        """Where each piece of caller text lies in `prompt` (character offsets), found by rendering the template
        with every piece between two markers; None when the template changes it other than by trimming content."""
        free = [c for c in _MARKER_CANDIDATES if c not in used]
        if len(free) < 2:
            return None
        begin, end = free[0], free[1]
        for trim in (False, True):
            marked_messages, marked_tools = _map_caller_text(
                messages,
                tools,
                lambda text: begin + text + end,
                (lambda text: begin + text.strip() + end) if trim else None,
            )
            rendered = self.apply_chat_template(marked_messages, add_generation_prompt, marked_tools)
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

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a piece of a multi-byte character stays a piece): byte-level BPE
        tokens through GPT-2's byte table, SentencePiece pieces with '\u2581' as a space and <0xNN> as that byte,
        added tokens as their text. b"" for ids the tokenizer does not have (vocabulary padding)."""
        if self._token_bytes is None:
            self._token_bytes = _token_byte_table(self._tokenizer)
        return self._token_bytes.get(int(token_id), b"")

    @property
    def hf_tokenizer(self) -> Tokenizer:
        return self._tokenizer


_SPM_SPACE = "\u2581"
_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is spelled with in byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _uses_byte_level(decoder: Any) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(d) for d in decoder.get("decoders") or [])


def _token_byte_table(tokenizer: Tokenizer) -> dict[int, bytes]:
    spec = json.loads(tokenizer.to_str())
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    table: dict[int, bytes] = {}
    if _uses_byte_level(spec.get("decoder")):
        byte_of = _gpt2_byte_decoder()
        for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
            if all(c in byte_of for c in token):
                table[token_id] = bytes(byte_of[c] for c in token)
            else:
                table[token_id] = token.encode()
    else:
        for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
            match = _SPM_BYTE.fullmatch(token)
            table[token_id] = bytes([int(match.group(1), 16)]) if match else token.replace(_SPM_SPACE, " ").encode()
    for token_id, content in added.items():
        table[token_id] = content.encode()
    return table


# Keys of messages, tool calls and tools that the template reads as structure, not caller text.
_STRUCTURE_KEYS = frozenset({"role", "type"})


def _map_json(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` (parsed JSON) with every string in it, object keys included, mapped through `fn`."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_json(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_json(v, fn) for v in value]
    return value


def _map_fields(item: Mapping[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A message, tool call or tool with its caller text mapped: string fields, and nested structures' text."""
    out: dict[str, Any] = {}
    for key, value in item.items():
        if key in _STRUCTURE_KEYS:
            out[key] = value
        elif key in ("arguments", "parameters"):
            out[key] = _map_json(value, fn)  # free-form JSON: its keys are caller text too
        elif isinstance(value, str):
            out[key] = fn(value)
        elif isinstance(value, Mapping):
            out[key] = _map_fields(value, fn)
        elif isinstance(value, list):
            out[key] = [_map_fields(v, fn) if isinstance(v, Mapping) else _map_json(v, fn) for v in value]
        else:
            out[key] = value
    return out


def _map_caller_text(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    fn: Callable[[str], str],
    content_fn: Callable[[str], str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and tools with every piece of caller text mapped through `fn` (message content through
    `content_fn` when given). Roles and types are structure and stay as they are."""
    mapped_messages = []
    for message in messages:
        mapped = _map_fields({k: v for k, v in message.items() if k != "content"}, fn)
        if "content" in message:
            content = message["content"]
            mapped["content"] = (content_fn or fn)(content) if isinstance(content, str) else content
        mapped_messages.append({k: mapped[k] for k in message})  # the caller's key order
    mapped_tools = [_map_fields(t, fn) for t in tools] if tools is not None else None
    return mapped_messages, mapped_tools
