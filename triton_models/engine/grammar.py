"""Grammar-constrained decoding: a per-step token mask from llguidance, for structured outputs and tool calls.

One `GrammarCompiler` per model (per tokenizer) is built at engine start; each constrained request gets a fresh
`TokenConstraint` from `GrammarCompiler.constraint(grammar)`. The scheduler calls `apply(logits)` on that request's
row before sampling and `advance(token)` after it; unconstrained requests never touch this module, so they pay
nothing. Compiling a grammar is paid once per distinct grammar text (an LRU cache of compiled matchers, copied per
request).

The grammar text
----------------
`grammar` is a JSON object text with exactly one of these keys:

  {"json_schema": {...}}    a JSON Schema (OpenAI `response_format: json_schema`, strict): the output is one JSON
                            value that validates against it. Schema keywords llguidance does not implement are
                            refused (GrammarError), not ignored; unknown (non-schema) keys are ignored.
  {"json_object": true}     any JSON object (OpenAI `response_format: json_object`).
  {"lark": "<grammar>"}     an llguidance Lark grammar (for tool-call formats). It may embed JSON Schemas with
                            `%json {...}` and must name added tokens unquoted, `<|im_end|>` or `<[id]>`, special
                            or not: Qwen2.5's `<tool_call>` (id 151657, an added non-special token) is written
                            `<tool_call>`. A quoted string containing such a token's text is refused (llguidance
                            matches quoted text only with ordinary tokens, so the model's own token would be
                            refused). Where the text is no added token (SmolLM2 has no `<tool_call>`), quote it:
                            "<tool_call>" is then ordinary text.

and optionally "whitespace": "compact" (default) or "flexible". Compact JSON has no free whitespace, only one space
after each ":" and "," (`{"a": 1, "b": [2, 3]}`, json.dumps' spelling): a greedy small model can otherwise emit
newlines or spaces until max_tokens. "flexible"
allows JSON's insignificant whitespace. It applies to "json_schema" and "json_object"; a Lark grammar says its own
whitespace (in its `%json {...}` bodies too: llguidance's default there is flexible, `"x-guidance":
{"whitespace_flexible": false}` in the body makes it compact).

Padding: ids at or past the tokenizer's size, and GGUF vocabulary filler tokens spelled `[PAD<id>]`, are never
allowed (the mask covers the whole logits width).

Ending: EOS ids are allowed exactly when the grammar may end at this point. When nothing more may follow
(`is_finished()`), the engine ends the request with finish reason "stop" without sampling again.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llguidance
import numpy as np
import numpy.typing as npt

from llmesh.model_artifact import TOKENIZER_FILE, ModelMetadata

__all__ = ["GrammarCompiler", "GrammarError", "TokenConstraint"]

WHITESPACE_MODES = ("compact", "flexible")
_GRAMMAR_KINDS = ("json_schema", "json_object", "lark")
_MAX_ERROR_CHARS = 300
# Which way apply() masks: above this fraction of allowed tokens, writing -inf where disallowed is cheaper than
# saving the allowed logits, filling the row and putting them back.
_DENSE_FRACTION = 0.25


class GrammarError(ValueError):
    """A grammar or schema the library refuses, or a token the grammar does not allow; the message is client-facing."""


def _client_message(prefix: str, detail: str) -> str:
    # llguidance's messages can span lines (regex errors draw a caret); one short line is enough for a client.
    text = re.sub(r"\s+", " ", detail).strip()
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return f"{prefix}: {text}" if text else prefix


def _parse_grammar(grammar: str) -> tuple[str, str]:
    """The llguidance grammar for a grammar text (see the module docstring) and the kind it was."""
    try:
        spec = json.loads(grammar)
    except (json.JSONDecodeError, TypeError) as e:
        raise GrammarError(f"grammar is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise GrammarError("grammar must be a JSON object")
    kinds = [k for k in _GRAMMAR_KINDS if k in spec]
    unknown = sorted(set(spec) - set(_GRAMMAR_KINDS) - {"whitespace"})
    if unknown:
        raise GrammarError(f"unknown grammar keys: {', '.join(unknown)}")
    if len(kinds) != 1:
        raise GrammarError(f"grammar must have exactly one of: {', '.join(_GRAMMAR_KINDS)}")
    kind = kinds[0]
    whitespace = spec.get("whitespace", "compact")
    if whitespace not in WHITESPACE_MODES:
        raise GrammarError(f"whitespace must be one of: {', '.join(WHITESPACE_MODES)}")
    value = spec[kind]
    if kind == "lark":
        if not isinstance(value, str) or not value.strip():
            raise GrammarError("lark must be a non-empty string")
        return llguidance.LLMatcher.grammar_from_lark(value), kind
    if kind == "json_object":
        if value is not True:
            raise GrammarError("json_object must be true")
        schema: Any = {"type": "object"}
    else:
        schema = value
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("json_schema must be a JSON Schema (an object)")
    # overrides, not defaults: the request's whitespace wins over any x-guidance in the schema.
    options: dict[str, Any] = {"whitespace_flexible": whitespace == "flexible", "lenient": False}
    if whitespace == "compact":
        # One space after ":" and ",", as json.dumps writes it: the spelling models saw most (with none at all, the
        # 0.5B Qwen, denied its usual '": "' token, wrote '"country":":"' for Paris).
        options |= {"item_separator": ", ", "key_separator": ": "}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options), kind  # type: ignore[arg-type]
    except ValueError as e:
        raise GrammarError(_client_message("invalid JSON schema", str(e))) from None


_LARK_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _token_names(tokenizer_json: str, tokenizer: llguidance.LLTokenizer) -> frozenset[str]:
    """Texts of the added tokens llguidance matches only by name (`<name>`), never as quoted text: the special ones,
    and non-special added ones such as Qwen2.5's `<tool_call>` as well."""
    added = json.loads(tokenizer_json).get("added_tokens", [])
    return frozenset(
        t["content"]
        for t in added
        if t.get("content") and t["id"] < tokenizer.vocab_size and tokenizer.is_special_token(t["id"])
    )


def _padding_ids(tokenizer_json: str, vocab_size: int) -> list[int]:
    """Ids of vocabulary-padding tokens: GGUF converters fill a vocabulary up to the embedding's row count with
    ordinary tokens spelled `[PAD<id>]` (Qwen2.5: 151665..151935). Their text is matchable, so without this a grammar
    that allows `[` could let the model pick an untrained row."""
    vocab = json.loads(tokenizer_json).get("model", {}).get("vocab", {})
    if not isinstance(vocab, dict):  # Unigram vocabularies are lists of [piece, score] and carry no such filler
        return []
    return sorted(i for token, i in vocab.items() if token == f"[PAD{i}]" and 0 <= i < vocab_size)


class TokenConstraint:
    """One request's matcher state: which token may come next, and what has been generated so far."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        usable_words: npt.NDArray[np.int32] | None = None,
    ) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._usable_words = usable_words  # bitmask of the ids that are not padding; None: all are usable
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._mask_valid = False  # the bitmask is for the current state (computed at most once per step)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _compute(self) -> npt.NDArray[np.int32]:
        if not self._mask_valid:
            # Writes every word of the buffer (it is exactly the size the tokenizer was built for).
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            if self._matcher.is_error():
                raise GrammarError(_client_message("grammar failed", self._matcher.get_error()))
            if self._usable_words is not None:
                np.bitwise_and(self._bitmask, self._usable_words, out=self._bitmask)
            self._mask_valid = True
        return self._bitmask

    def allowed_mask(self) -> npt.NDArray[np.bool_]:
        """bool [vocab_size]: True where the token may come next (EOS ids exactly when the grammar may end here)."""
        bits = np.unpackbits(self._compute().view(np.uint8), bitorder="little", count=self._vocab_size)
        return bits.view(np.bool_)

    def apply(self, logits: npt.NDArray[np.float32]) -> None:
        """Sets the logits of disallowed tokens to -inf, in place (one row of vocab_size floats)."""
        if logits.shape != (self._vocab_size,):
            raise ValueError(f"logits must have shape ({self._vocab_size},), got {logits.shape}")
        allowed = self.allowed_mask()
        allowed_ids = np.flatnonzero(allowed)
        if allowed_ids.size > _DENSE_FRACTION * self._vocab_size:
            np.copyto(logits, -np.inf, where=~allowed)
        else:
            kept = logits[allowed_ids]
            logits.fill(-np.inf)
            logits[allowed_ids] = kept

    def advance(self, token_id: int) -> None:
        """Consumes the sampled token; GrammarError if the grammar did not allow it."""
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_size:
            raise GrammarError(f"token {token_id} is outside the vocabulary")
        if self._usable_words is not None and not (int(self._usable_words[token_id >> 5]) >> (token_id & 31)) & 1:
            raise GrammarError(f"token {token_id} is a padding id")
        self._mask_valid = False
        if not self._matcher.consume_token(token_id):
            raise GrammarError(f"token {token_id} is not allowed by the grammar here")

    def is_finished(self) -> bool:
        """True when the grammar is complete and nothing more may follow (only EOS, or EOS was consumed)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def is_accepting(self) -> bool:
        """True when the grammar may end here (EOS is allowed), even if more could follow."""
        return self._matcher.is_accepting()

    def rollback(self, n_tokens: int) -> None:
        """Un-consumes the last n_tokens tokens (for speculative decoding: drafts the target rejected)."""
        if n_tokens < 0:
            raise ValueError("n_tokens must be >= 0")
        if n_tokens == 0:
            return
        self._mask_valid = False
        if not self._matcher.rollback(n_tokens):
            raise GrammarError(_client_message("grammar rollback failed", self._matcher.get_error()))

    def forced_bytes(self) -> bytes:
        """The bytes the grammar forces next whatever the model does (e.g. `{"name":"` after `{`); may be empty."""
        return self._matcher.compute_ff_bytes()


class GrammarCompiler:
    """Compiles grammar texts for one tokenizer, with an LRU cache of compiled grammars."""

    def __init__(
        self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256
    ) -> None:
        if not eos_token_ids:
            raise ValueError("eos_token_ids must not be empty")
        if cache_size < 1:
            raise ValueError("cache_size must be >= 1")
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        # n_vocab = the logits width: ids past the tokenizer's own tokens (padding rows of the embedding) exist in
        # the mask and are never allowed. llguidance raises if the tokenizer has more tokens than that.
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=self.vocab_size, eos_token=list(eos_token_ids))
        if self._tokenizer.vocab_size != self.vocab_size:
            raise ValueError(f"tokenizer has {self._tokenizer.vocab_size} ids, expected {self.vocab_size}")
        padding = _padding_ids(tokenizer_json, self.vocab_size)
        self.padding_ids = frozenset(padding)
        self._usable_words: npt.NDArray[np.int32] | None = None
        if padding:
            usable = np.ones(self.vocab_size, dtype=np.bool_)
            usable[padding] = False
            words = np.zeros((self.vocab_size + 31) // 32 * 32, dtype=np.bool_)
            words[: self.vocab_size] = usable
            self._usable_words = np.packbits(words, bitorder="little").view(np.int32)
        # verbose_errors off: the error texts go to clients and must not carry parser state or the grammar.
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._token_names = _token_names(tokenizer_json, self._tokenizer)
        self._cache_size = cache_size
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_model_dir(cls, version_dir: Path) -> GrammarCompiler:
        """The compiler for a built model version directory (its tokenizer.json and llmesh_model.json)."""
        metadata = ModelMetadata.load(version_dir)
        tokenizer_json = (version_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
        return cls(tokenizer_json, metadata.vocab_size, metadata.eos_token_ids)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        return self._tokenizer

    def cached_grammars(self) -> int:
        with self._lock:
            return len(self._compiled)

    def _check_lark_literals(self, grammar: str) -> None:
        # Quoted text never matches a named token, so the model's own token for it (how the tokenizer encodes that
        # text) would be refused; worse, llguidance offers it in the mask where the text is forced, then refuses it
        # when sampled. Refuse such a grammar up front, with the fix.
        lark = json.loads(grammar)["lark"]
        for literal in _LARK_STRING.findall(lark):
            for name in self._token_names:
                if name in literal:
                    raise GrammarError(
                        f"invalid lark grammar: {literal} spells the token {name}; "
                        f"name it unquoted as {name} (or <[id]>) instead"
                    )

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        ll_grammar, kind = _parse_grammar(grammar)
        if kind == "lark":
            self._check_lark_literals(grammar)
        matcher = llguidance.LLMatcher(self._tokenizer, ll_grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            prefix = "invalid lark grammar" if kind == "lark" else "invalid JSON schema"
            raise GrammarError(_client_message(prefix, matcher.get_error()))
        return matcher

    def constraint(self, grammar: str) -> TokenConstraint:
        """A fresh matcher for `grammar` (see the module docstring); GrammarError if it is refused."""
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
        if template is None:
            # Compiled outside the lock: a big grammar can take a while, and two threads compiling the same text
            # at once only waste work. Refused grammars are not cached (they are cheap to refuse again).
            template = self._compile(grammar)
            with self._lock:
                self._compiled[grammar] = template
                self._compiled.move_to_end(grammar)
                while len(self._compiled) > self._cache_size:
                    self._compiled.popitem(last=False)
        return TokenConstraint(template.deep_copy(), self.vocab_size, self.eos_token_ids, self._usable_words)
