"""Structured outputs on the real Qwen2.5-Coder-0.5B engine (in-process): grammar-constrained answers validate.

A property-based test draws JSON Schemas (hypothesis strategies composed here: nested objects, arrays with
minItems/maxItems, enums, required and optional properties, bounded integers and numbers, bounded strings,
booleans, nulls) and asks the model for an answer to each with the grammar {"json_schema": schema}: every answer
that finishes with "stop" must parse and validate (jsonschema, Draft 2020-12); "length" is the only other way to
end, and it may not be more than a third of them. Fixed tests: {"json_object": true} gives a JSON object, a tiny
max_tokens gives "length", and an unconstrained request batched beside a constrained one gets exactly the tokens
it gets alone (greedy; the 0.5B is served without speculative decoding, so no lone-row padding is involved).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from benchmarks.engine.schemas import answer_messages
from llmesh.model_artifact import ChatTokenizer
from triton_models.config import BuildSettings
from triton_models.engine import Engine, EngineSampling, GenerationRequest, GenerationResult
from triton_models.repository import ensure_model_repository

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b"
MAX_TOKENS = 128

NAMES = ("id", "name", "age", "city", "tags", "score", "kind", "owner", "items", "active", "year", "color")
WORDS = ("red", "green", "blue", "admin", "user", "open", "closed", "north", "south")


@pytest.fixture(scope="module")
def version_dir() -> Path:
    return ensure_model_repository(BuildSettings(variants=(MODEL,))) / MODEL / "1"


@pytest.fixture(scope="module")
def engine(version_dir: Path) -> Iterator[Engine]:
    served = Engine.from_model_dir(version_dir)
    yield served
    served.close()


@pytest.fixture(scope="module")
def tokenizer(version_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_model_dir(version_dir)


# ---- schemas ---------------------------------------------------------------------------------------------------

strings = st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 10))
integers = st.builds(
    lambda low, width: {"type": "integer", "minimum": low, "maximum": low + width},
    st.integers(-50, 2000),
    st.integers(0, 100),
)
numbers = st.builds(
    lambda low, width: {"type": "number", "minimum": low, "maximum": low + width},
    st.sampled_from([-2.5, -1, 0, 0.5, 10]),
    st.sampled_from([0.5, 1, 3, 100]),
)
enums = st.builds(
    lambda values: {"enum": values},
    st.lists(st.sampled_from(WORDS) | st.integers(0, 99) | st.none(), min_size=1, max_size=4, unique=True),
)
nullables = st.builds(lambda inner: {"anyOf": [inner, {"type": "null"}]}, strings | integers)
scalars = st.one_of(
    strings, integers, numbers, enums, nullables, st.just({"type": "boolean"}), st.just({"type": "null"})
)


def arrays(items: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda item, low, extra: {"type": "array", "items": item, "minItems": low, "maxItems": low + extra},
        items,
        st.integers(0, 2),
        st.integers(0, 2),
    )


def objects(values: st.SearchStrategy[dict[str, Any]], max_size: int) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        properties = draw(st.dictionaries(st.sampled_from(NAMES), values, min_size=1, max_size=max_size))
        required = draw(st.lists(st.sampled_from(sorted(properties)), min_size=1, unique=True))
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    return build()


values = st.recursive(scalars, lambda children: arrays(children) | objects(children, 3), max_leaves=5)
schemas = objects(values, 4)


# ---- helpers ---------------------------------------------------------------------------------------------------


def ask(
    engine: Engine, tokenizer: ChatTokenizer, schema: dict[str, Any], max_tokens: int = MAX_TOKENS
) -> GenerationResult:
    prompt = tokenizer.encode_chat(answer_messages(schema))
    grammar = json.dumps({"json_schema": schema})
    [result] = engine.generate([GenerationRequest(prompt, EngineSampling(max_tokens, grammar=grammar))])
    return result


# ---- tests -----------------------------------------------------------------------------------------------------


def test_every_constrained_answer_that_stops_validates(engine: Engine, tokenizer: ChatTokenizer) -> None:
    endings: list[str] = []

    # No shrinking: each example is a model run, and the failing schema and answer are in the message anyway.
    @settings(
        max_examples=15,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(schemas)
    def check(schema: dict[str, Any]) -> None:
        Draft202012Validator.check_schema(schema)
        result = ask(engine, tokenizer, schema)
        assert result.error is None, result.error
        assert result.finish_reason in ("stop", "length")
        endings.append(result.finish_reason)
        if result.finish_reason == "stop":
            text = tokenizer.decode(result.token_ids)
            errors = [e.message for e in Draft202012Validator(schema).iter_errors(json.loads(text))]
            assert errors == [], (text, json.dumps(schema))

    check()
    assert len(endings) == 15
    assert endings.count("length") <= len(endings) / 3, endings


def test_json_object_gives_a_json_object(engine: Engine, tokenizer: ChatTokenizer) -> None:
    prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "Describe a cat (name, age, colour) as a JSON object. Reply with JSON only."}]
    )
    sampling = EngineSampling(MAX_TOKENS, grammar=json.dumps({"json_object": True}))
    [result] = engine.generate([GenerationRequest(prompt, sampling)])
    assert result.finish_reason == "stop", tokenizer.decode(result.token_ids)
    assert isinstance(json.loads(tokenizer.decode(result.token_ids)), dict)


def test_a_tiny_max_tokens_ends_with_length(engine: Engine, tokenizer: ChatTokenizer) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    result = ask(engine, tokenizer, schema, max_tokens=3)
    assert result.error is None
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 3
    assert tokenizer.decode(result.token_ids).startswith('{"')  # the grammar's start, cut off


def test_an_unconstrained_neighbour_gets_the_tokens_it_gets_alone(engine: Engine, tokenizer: ChatTokenizer) -> None:
    assert engine.draft is None  # plain decoding: no lone-row padding for speculative verification
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "year": {"type": "integer"}},
        "required": ["city", "year"],
        "additionalProperties": False,
    }
    prompt = tokenizer.encode_chat(answer_messages(schema))
    plain = GenerationRequest(prompt, EngineSampling(48))
    constrained = GenerationRequest(prompt, EngineSampling(48, grammar=json.dumps({"json_schema": schema})))
    [alone] = engine.generate([plain])
    beside_first, _ = engine.generate([plain, constrained])
    _, beside_second = engine.generate([constrained, plain])
    assert alone.finish_reason is not None and alone.error is None
    assert beside_first.token_ids == alone.token_ids
    assert beside_second.token_ids == alone.token_ids
    # The neighbour really was different: the grammar changed the constrained answer (no code fence, compact).
    [constrained_alone] = engine.generate([constrained])
    assert constrained_alone.token_ids != alone.token_ids
