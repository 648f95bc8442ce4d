"""Grammar-constrained decoding (triton_models/engine/grammar.py): masks, ending, errors, cache, rollback.

Two tokenizers: a tiny byte-level BPE trained here (always runs) and the real ones of the built models (SmolLM2's
49k and Qwen2.5's 152k vocabularies; skipped when no model is built). Generations are driven by random logits
(numpy RNG) through `apply`, and every finished text must parse as JSON and validate against its schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmesh import paths
from llmesh.model_artifact import METADATA_FILE, TOKENIZER_FILE, ModelMetadata
from triton_models.engine.grammar import GrammarCompiler, GrammarError, TokenConstraint

END = "<|end|>"
CALL = "<|call|>"
N_FILLER = 3  # "[PAD<id>]" tokens at the end of the tiny vocabulary
PADDING = 13  # logits rows past the tokenizer's tokens, as in Qwen (151936 logits, fewer tokens)

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "active": {"type": "boolean"},
        "nothing": {"type": "null"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "floor": {"type": "integer", "minimum": -2, "maximum": 40},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": -10, "maximum": 10},
                    "y": {"type": "integer", "minimum": 3, "maximum": 99999},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "minItems": 0,
            "maxItems": 2,
        },
    },
    "required": ["name", "age", "score", "active", "nothing", "role", "tags", "address", "points"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": NESTED_SCHEMA,
    "optional-properties": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, "two", None]}},
        "required": [],
        "additionalProperties": False,
    },
    "top-level-array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 5, "maximum": 9},
        "minItems": 2,
        "maxItems": 4,
    },
    "nullable": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
}


# ---- tokenizers --------------------------------------------------------------------------------------------------


def _training_corpus() -> Iterator[str]:
    rng = np.random.default_rng(7)
    words = ["name", "age", "score", "true", "false", "null", "admin", "user", "guest", "city", "tags", "points"]
    for _ in range(300):
        obj = {str(rng.choice(words)): [int(rng.integers(-50, 500)), float(rng.normal()), str(rng.choice(words))]}
        yield json.dumps(obj, separators=(",", ":"))
        yield json.dumps(obj)


@pytest.fixture(scope="module")
def tiny_tokenizer_json() -> str:
    """A ~400-token byte-level BPE (every byte reachable) with two special tokens, trained on JSON-ish text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[END, CALL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    # GGUF-style vocabulary filler, as in Qwen's built tokenizer: ordinary tokens spelled "[PAD<id>]".
    vocab = spec["model"]["vocab"]
    first = max(vocab.values()) + 1
    for token_id in range(first, first + N_FILLER):
        vocab[f"[PAD{token_id}]"] = token_id
    return json.dumps(spec)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_json: str) -> tuple[GrammarCompiler, Tokenizer]:
    tokenizer = Tokenizer.from_str(tiny_tokenizer_json)
    eos = tokenizer.token_to_id(END)
    assert eos is not None
    compiler = GrammarCompiler(tiny_tokenizer_json, tokenizer.get_vocab_size() + PADDING, [eos])
    return compiler, tokenizer


def _built_model_dirs() -> dict[int, Path]:
    found: dict[int, Path] = {}
    root = paths.cache_dir()
    if root.is_dir():
        for meta_file in sorted(root.rglob(METADATA_FILE)):
            if (meta_file.parent / TOKENIZER_FILE).is_file():
                found.setdefault(ModelMetadata.load(meta_file.parent).vocab_size, meta_file.parent)
    return found


SMOLLM2_VOCAB = 49152
QWEN_VOCAB = 151936


def _real(vocab_size: int) -> tuple[GrammarCompiler, Tokenizer]:
    version_dir = _built_model_dirs().get(vocab_size)
    if version_dir is None:
        pytest.skip(f"no built model with a {vocab_size}-id vocabulary under the llmesh cache (run `llmesh build`)")
    return GrammarCompiler.from_model_dir(version_dir), Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))


@pytest.fixture(scope="module", params=[SMOLLM2_VOCAB, QWEN_VOCAB], ids=["smollm2-49k", "qwen2.5-152k"])
def real(request: pytest.FixtureRequest) -> tuple[GrammarCompiler, Tokenizer]:
    return _real(request.param)


@pytest.fixture(scope="module")
def qwen() -> tuple[GrammarCompiler, Tokenizer]:
    return _real(QWEN_VOCAB)


# ---- driving a constraint ----------------------------------------------------------------------------------------


def sample(
    constraint: TokenConstraint, eos_ids: frozenset[int], rng: np.random.Generator, max_steps: int = 1000
) -> tuple[list[int], bool]:
    """Random-logits sampling through `constraint`; the ids (EOS left out) and whether it ended on EOS.

    Checks at every step that apply() leaves exactly the allowed tokens finite and that EOS is allowed exactly
    when the matcher accepts.
    """
    ids: list[int] = []
    for _ in range(max_steps):
        allowed = constraint.allowed_mask()
        assert allowed.shape == (constraint.vocab_size,)
        assert allowed.any(), "the grammar allows nothing"
        logits = rng.standard_normal(constraint.vocab_size).astype(np.float32)
        constraint.apply(logits)
        np.testing.assert_array_equal(np.isfinite(logits), allowed)
        assert all(allowed[e] == constraint.is_accepting() for e in eos_ids)
        probs = np.exp(logits - logits.max())
        token = int(rng.choice(constraint.vocab_size, p=probs / probs.sum()))
        if token in eos_ids:
            constraint.advance(token)
            assert constraint.is_finished()
            return ids, True
        constraint.advance(token)
        ids.append(token)
        if constraint.is_finished():
            assert {int(i) for i in np.flatnonzero(constraint.allowed_mask())} <= eos_ids
            return ids, False
    raise AssertionError(f"no end after {max_steps} tokens")


def generate_json(
    compiler: GrammarCompiler, tokenizer: Tokenizer, grammar: dict[str, Any], seed: int
) -> tuple[Any, str]:
    """A sampled value under `grammar` and its text."""
    constraint = compiler.constraint(json.dumps(grammar))
    ids, _ = sample(constraint, compiler.eos_token_ids, np.random.default_rng(seed))
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return json.loads(text), text


# ---- tiny tokenizer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_samples_validate_against_schema(tiny: tuple[GrammarCompiler, Tokenizer], name: str) -> None:
    compiler, tokenizer = tiny
    schema = SCHEMAS[name]
    for seed in range(15):
        value, _ = generate_json(compiler, tokenizer, {"json_schema": schema}, seed)
        jsonschema.validate(value, schema)


def _feed(compiler: GrammarCompiler, tokenizer: Tokenizer, grammar: dict[str, Any], text: str) -> TokenConstraint:
    constraint = compiler.constraint(json.dumps(grammar))
    for token in tokenizer.encode(text).ids:
        constraint.advance(token)
    return constraint


def test_json_object_allows_any_object_only(tiny: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = tiny
    grammar = {"json_object": True}
    assert _feed(compiler, tokenizer, grammar, '{"k": [1, {"z": null}], "t": "x"}').is_finished()
    for not_object in ("[1]", '"s"', "7"):
        with pytest.raises(GrammarError, match="not allowed"):
            _feed(compiler, tokenizer, grammar, not_object)


def test_compact_whitespace_is_default_and_flexible_allows_spaces(tiny: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = tiny
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert _feed(compiler, tokenizer, {"json_schema": schema}, '{"a": 1}').is_accepting()
    with pytest.raises(GrammarError, match="not allowed"):
        _feed(compiler, tokenizer, {"json_schema": schema}, '{"a":1}')
    flexible = _feed(compiler, tokenizer, {"json_schema": schema, "whitespace": "flexible"}, '{ "a": 1 }')
    assert flexible.is_accepting()


def test_eos_only_when_the_grammar_may_end(tiny: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = tiny
    (eos,) = compiler.eos_token_ids
    grammar = {"json_schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}}
    constraint = compiler.constraint(json.dumps(grammar))
    assert not constraint.allowed_mask()[eos]
    for token in tokenizer.encode("[1, 2").ids:
        constraint.advance(token)
    assert not constraint.allowed_mask()[eos]
    assert not constraint.is_finished()
    with pytest.raises(GrammarError):
        constraint.advance(eos)

    done = _feed(compiler, tokenizer, grammar, "[1, 2]")
    mask = done.allowed_mask()
    assert mask[eos] and done.is_finished()
    assert np.flatnonzero(mask).tolist() == [eos]
    done.advance(eos)
    assert done.is_finished()


def test_padding_ids_past_the_tokenizer_are_never_allowed(tiny: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = tiny
    assert compiler.vocab_size == tokenizer.get_vocab_size() + PADDING
    constraint = compiler.constraint(json.dumps({"lark": "start: /[a-z ]*/"}))
    mask = constraint.allowed_mask()
    assert mask.shape == (compiler.vocab_size,)
    assert not mask[tokenizer.get_vocab_size() :].any()
    assert mask.sum() > 10  # the dense path of apply(): most tokens allowed
    logits = np.zeros(compiler.vocab_size, dtype=np.float32)
    constraint.apply(logits)
    np.testing.assert_array_equal(np.isfinite(logits), mask)
    assert (logits[mask] == 0).all()
    with pytest.raises(GrammarError, match="outside the vocabulary"):
        constraint.advance(compiler.vocab_size)
    with pytest.raises(ValueError, match="shape"):
        constraint.apply(np.zeros(compiler.vocab_size - 1, dtype=np.float32))


def test_pad_filler_tokens_are_never_allowed(tiny: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = tiny
    filler = [i for i in range(tokenizer.get_vocab_size()) if tokenizer.id_to_token(i) == f"[PAD{i}]"]
    assert len(filler) == N_FILLER and compiler.padding_ids == frozenset(filler)
    constraint = compiler.constraint(json.dumps({"lark": r"start: /[\[\]A-Z0-9]+/"}))
    mask = constraint.allowed_mask()
    assert mask[tokenizer.encode("[").ids[0]]
    assert not mask[filler].any()
    with pytest.raises(GrammarError, match="padding"):
        constraint.advance(filler[0])


def test_disallowed_token_raises_and_fresh_constraints_are_independent(
    tiny: tuple[GrammarCompiler, Tokenizer],
) -> None:
    compiler, tokenizer = tiny
    grammar = json.dumps({"json_schema": {"type": "boolean"}})
    first = compiler.constraint(grammar)
    with pytest.raises(GrammarError, match="not allowed"):
        first.advance(tokenizer.encode("7").ids[0])
    second = compiler.constraint(grammar)  # the cached grammar is copied, not shared
    for token in tokenizer.encode("true").ids:
        second.advance(token)
    assert second.is_finished()


def test_compiled_grammars_are_cached_lru(tiny_tokenizer_json: str, tiny: tuple[GrammarCompiler, Tokenizer]) -> None:
    _, tokenizer = tiny
    compiler = GrammarCompiler(tiny_tokenizer_json, tokenizer.get_vocab_size(), [0], cache_size=2)
    grammars = [json.dumps({"json_schema": {"enum": [i]}}) for i in range(3)]
    compiler.constraint(grammars[0])
    compiler.constraint(grammars[0])
    assert compiler.cached_grammars() == 1
    compiler.constraint(grammars[1])
    compiler.constraint(grammars[0])  # now most recent: grammars[1] is the one evicted next
    compiler.constraint(grammars[2])
    assert compiler.cached_grammars() == 2
    assert list(compiler._compiled) == [grammars[0], grammars[2]]


def test_rollback_restores_the_earlier_mask(tiny: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = tiny
    constraint = compiler.constraint(json.dumps({"json_schema": NESTED_SCHEMA}))
    before = constraint.allowed_mask().copy()
    prefix = tokenizer.encode('{"name": "ab", "age": 1').ids
    for token in prefix[:3]:
        constraint.advance(token)
    middle = constraint.allowed_mask().copy()
    for token in prefix[3:]:
        constraint.advance(token)
    constraint.rollback(len(prefix) - 3)
    np.testing.assert_array_equal(constraint.allowed_mask(), middle)
    constraint.rollback(3)
    np.testing.assert_array_equal(constraint.allowed_mask(), before)
    constraint.rollback(0)


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"json_schema": {"type": "integer"}, "lark": "start: \\"a\\""}', "exactly one of"),
        ("{}", "exactly one of"),
        ('{"regex": "a+"}', "unknown grammar keys: regex"),
        ('{"json_object": true, "whitespace": "pretty"}', "whitespace must be one of"),
        ('{"json_object": false}', "json_object must be true"),
        ('{"json_schema": 5}', "json_schema must be"),
        ('{"json_schema": {"type": "objekt"}}', "invalid JSON schema: Invalid type"),
        ('{"json_schema": {"type": "string", "pattern": "(ab"}}', "invalid JSON schema"),
        ('{"json_schema": {"$ref": "#/$defs/missing"}}', "invalid JSON schema"),
        ('{"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}', "invalid JSON schema"),
        ('{"lark": "start: undefined_rule"}', "invalid lark grammar"),
        ('{"lark": ""}', "lark must be a non-empty string"),
    ],
)
def test_bad_grammars_raise_grammar_error(tiny: tuple[GrammarCompiler, Tokenizer], grammar: str, message: str) -> None:
    compiler, _ = tiny
    cached = compiler.cached_grammars()
    with pytest.raises(GrammarError, match=message) as raised:
        compiler.constraint(grammar)
    assert "\n" not in str(raised.value) and len(str(raised.value)) <= 320
    assert compiler.cached_grammars() == cached  # refusals are not cached


def test_lark_tool_call_with_special_and_text_tags(tiny: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = tiny
    call_id = tokenizer.token_to_id(CALL)
    args = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    body = json.dumps(
        {
            "type": "object",
            "properties": {"name": {"const": "f"}, "arguments": args},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False},
        }
    )
    # A special token is named unquoted (<|call|>); quoting its text is refused, with the fix in the message.
    special = compiler.constraint(json.dumps({"lark": f'start: <|call|> "\\n" %json {body}'}))
    assert np.flatnonzero(special.allowed_mask()).tolist() == [call_id]
    by_id = compiler.constraint(json.dumps({"lark": f'start: <[{call_id}]> "\\n" %json {body}'}))
    with pytest.raises(GrammarError, match=r"spells the token <\|call\|>; name it unquoted"):
        compiler.constraint(json.dumps({"lark": f'start: "x<|call|>\\n" %json {body}'}))
    for constraint in (special, by_id):
        ids, _ = sample(constraint, compiler.eos_token_ids, np.random.default_rng(3))
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        assert decoded.startswith(CALL + "\n")
        call = json.loads(decoded[len(CALL) + 1 :])
        assert call["name"] == "f"
        jsonschema.validate(call["arguments"], args)


# ---- property: generated schemas ---------------------------------------------------------------------------------

_leaf_schemas = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-1000, 1000),
        st.integers(0, 500),
    ),
    st.builds(
        lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
        st.integers(-100, 100),
        st.integers(1, 50),
    ),
    st.builds(
        lambda values: {"enum": values},
        st.lists(
            st.one_of(st.text("abcxyz", min_size=1, max_size=4), st.integers(-9, 99), st.none()),
            min_size=1,
            max_size=4,
            unique=True,
        ),
    ),
)


def _object_schema(properties: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.dictionaries(st.sampled_from(["a", "b", "c", "id", "x_y"]), children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: _object_schema(props, required)
        )
    )
    arrays = st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
    )
    return st.one_of(objects, arrays)


json_schemas = st.recursive(_leaf_schemas, _extend, max_leaves=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=json_schemas, seed=st.integers(0, 2**32 - 1))
def test_property_every_finished_sample_validates(
    tiny: tuple[GrammarCompiler, Tokenizer], schema: dict[str, Any], seed: int
) -> None:
    compiler, tokenizer = tiny
    value, _ = generate_json(compiler, tokenizer, {"json_schema": schema}, seed)
    jsonschema.validate(value, schema)


# ---- real tokenizers -----------------------------------------------------------------------------------------------


def test_real_tokenizer_samples_validate(real: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = real
    assert compiler.vocab_size == tokenizer.get_vocab_size() or compiler.vocab_size > tokenizer.get_vocab_size()
    for seed in range(3):
        value, _ = generate_json(compiler, tokenizer, {"json_schema": NESTED_SCHEMA}, seed)
        jsonschema.validate(value, NESTED_SCHEMA)


def test_real_tokenizer_tool_call(real: tuple[GrammarCompiler, Tokenizer]) -> None:
    """Qwen's tool-call format; `<tool_call>` is one (non-special) token in Qwen's vocabulary, several in SmolLM2's."""
    compiler, tokenizer = real
    args = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    call = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": args},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }
    body = json.dumps(call)
    tag_id = tokenizer.token_to_id("<tool_call>")
    if tag_id is None:  # SmolLM2: the tag is plain text, quoted
        grammars = [f'start: "<tool_call>\\n" %json {body} "\\n</tool_call>"']
    else:  # Qwen: the tags are added tokens, named unquoted or by id; quoting them is refused
        end_id = tokenizer.token_to_id("</tool_call>")
        grammars = [
            f'start: <tool_call> "\\n" %json {body} "\\n" </tool_call>',
            f'start: <[{tag_id}]> "\\n" %json {body} "\\n" <[{end_id}]>',
        ]
        with pytest.raises(GrammarError, match="name it unquoted as <tool_call>"):
            compiler.constraint(json.dumps({"lark": f'start: "<tool_call>\\n" %json {body}'}))
    for seed, lark in enumerate(grammars):
        constraint = compiler.constraint(json.dumps({"lark": lark}))
        first = np.flatnonzero(constraint.allowed_mask())
        if tag_id is not None:
            assert first.tolist() == [tag_id]  # the model's own single token for the tag
        ids, _ = sample(constraint, compiler.eos_token_ids, np.random.default_rng(seed))
        if tag_id is not None:
            assert ids[0] == tag_id
        text = tokenizer.decode(ids, skip_special_tokens=False)
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        parsed = json.loads(text[len("<tool_call>\n") : -len("\n</tool_call>")])
        assert parsed["name"] == "get_weather"
        jsonschema.validate(parsed["arguments"], args)


def test_qwen_padding_ids_are_disallowed(qwen: tuple[GrammarCompiler, Tokenizer]) -> None:
    compiler, tokenizer = qwen
    assert compiler.vocab_size == QWEN_VOCAB
    mask = compiler.constraint(json.dumps({"lark": "start: /[a-z]+/"})).allowed_mask()
    assert mask.shape == (QWEN_VOCAB,)
    # ids the tokenizer does not give out for text (Qwen's [PAD...] rows past its last real token)
    last_real = max(i for i, t in tokenizer.get_added_tokens_decoder().items() if not t.content.startswith("[PAD"))
    assert not mask[last_real + 1 :].any()
