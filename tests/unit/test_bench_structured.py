"""The structured-output benchmark's schema generator (benchmarks/engine/schemas.py) and answer check
(benchmarks/engine/structured.py): valid JSON Schemas, a function of the seed, within the token budget, covering
the keywords the benchmark claims to exercise."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator

from benchmarks.engine.schemas import TOKEN_BUDGET, answer_messages, estimated_tokens, generate_schema
from benchmarks.engine.structured import THROUGHPUT_MIN_TOKENS, check_answer, large_schemas, parse_args

SEEDS = range(300)


def _subschemas(schema: dict[str, Any], depth: int = 0) -> Iterator[tuple[dict[str, Any], int]]:
    yield schema, depth
    for child in schema.get("properties", {}).values():
        yield from _subschemas(child, depth + 1)
    if "items" in schema:
        yield from _subschemas(schema["items"], depth + 1)
    for child in schema.get("anyOf", []):
        yield from _subschemas(child, depth)


def test_schemas_are_valid_json_schemas_of_objects_within_the_budget() -> None:
    for seed in SEEDS:
        schema = generate_schema(seed)
        Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object"
        assert estimated_tokens(schema) <= TOKEN_BUDGET
        for sub, _ in _subschemas(schema):
            if sub.get("type") == "object":
                assert sub["additionalProperties"] is False
                assert sub["required"] and set(sub["required"]) <= set(sub["properties"])


def test_the_same_seed_gives_the_same_schema_and_seeds_differ() -> None:
    first = [json.dumps(generate_schema(seed)) for seed in SEEDS]
    again = [json.dumps(generate_schema(seed)) for seed in SEEDS]
    assert first == again
    assert len(set(first)) > 0.95 * len(first)


def test_the_schemas_cover_every_kind_of_value() -> None:
    seen: Counter[str] = Counter()
    for seed in SEEDS:
        for sub, depth in _subschemas(generate_schema(seed)):
            kind = sub.get("type") or ("enum" if "enum" in sub else "anyOf")
            seen[kind] += 1
            if kind == "object" and depth > 0:
                seen["nested object"] += 1
            if kind == "object" and set(sub["properties"]) - set(sub["required"]):
                seen["optional property"] += 1
            if kind == "array" and sub["minItems"] > 0 and sub["maxItems"] > sub["minItems"]:
                seen["bounded array"] += 1
            if kind in ("integer", "number") and sub["minimum"] < sub["maximum"]:
                seen[f"bounded {kind}"] += 1
            if kind == "string" and sub["maxLength"] > 0:
                seen["bounded string"] += 1
            if kind == "enum" and None in sub["enum"]:
                seen["enum with null"] += 1
    expected = ["nested object", "optional property", "bounded array", "bounded integer", "bounded number",
                "bounded string", "boolean", "null", "enum", "anyOf", "enum with null"]  # fmt: skip
    # Each at least in one schema in 20: the benchmark's 200 schemas exercise all of them many times.
    assert {k: seen[k] for k in expected if seen[k] < len(SEEDS) / 20} == {}


def test_the_prompt_shows_the_schema() -> None:
    schema = generate_schema(7)
    messages = answer_messages(schema)
    assert messages[-1]["role"] == "user"
    assert json.dumps(schema, separators=(",", ":")) in messages[-1]["content"]


def test_check_answer_accepts_valid_answers_and_says_why_others_fail() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    assert check_answer(schema, '{"n":3}') is None
    assert (check_answer(schema, '{"n":30}') or "").startswith("invalid:")
    assert (check_answer(schema, '{"n":3') or "").startswith("not JSON:")
    assert (check_answer(schema, '{"n":3,"m":1}') or "").startswith("invalid:")


def test_the_throughput_schemas_are_large_ones_and_fixed() -> None:
    # Their answers must outrun the timed batches' max_tokens, so both kinds of batch generate alike.
    found = large_schemas(8)
    assert found == large_schemas(8)
    assert all(estimated_tokens(s) >= THROUGHPUT_MIN_TOKENS for s in found)
    assert parse_args([]).throughput_max_tokens < THROUGHPUT_MIN_TOKENS
