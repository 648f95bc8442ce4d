"""Random JSON Schemas for structured-output checks: deterministic from a seed, small enough that a model fills one
in within ~150 tokens (compact JSON, Qwen2.5's tokenizer: one token per digit, ~3-4 characters per word token).

    generate_schema(seed) -> a JSON Schema (a dict) of an object with nested objects, arrays (minItems/maxItems),
                             enums, required and optional properties, bounded integers and numbers, strings with
                             maxLength, booleans and nulls (a nullable value, or a null-only property)
    answer_messages(schema) -> the chat messages that ask a model for an answer to it (the schema is in the prompt)

Shared by benchmarks/engine/structured.py and the structured-output tests. Every schema uses only keywords the
engine's grammar library (llguidance, triton_models/engine/grammar.py) implements, and every object says
`additionalProperties: false`, as OpenAI's strict `json_schema` response format requires.
"""

from __future__ import annotations

import json
import random
from typing import Any

__all__ = ["TOKEN_BUDGET", "answer_messages", "estimated_tokens", "generate_schema", "generate_schemas"]

# Upper end of what a filled-in answer may take, by estimated_tokens' count.
TOKEN_BUDGET = 150
_MAX_DEPTH = 2  # root object -> nested object/array -> scalars (or an array of scalars)

_NAMES = (
    "id", "name", "title", "age", "count", "price", "score", "rank", "level", "size", "color", "city", "kind",
    "status", "email", "owner", "tags", "notes", "active", "valid", "items", "parts", "author", "year", "label",
    "code", "weight", "height", "team", "role", "stock", "rating", "unit", "zone", "mode",
)  # fmt: skip
_WORDS = (
    "red", "green", "blue", "small", "large", "admin", "user", "guest", "open", "closed", "north", "south", "alpha",
    "beta", "draft", "final", "low", "high", "cat", "dog",
)  # fmt: skip


def _string(rng: random.Random) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": rng.choice((4, 8, 12, 16))}
    if rng.random() < 0.3:
        schema["minLength"] = 1
    return schema


def _integer(rng: random.Random) -> dict[str, Any]:
    low = rng.choice((-100, -10, 0, 0, 1, 1900))
    return {"type": "integer", "minimum": low, "maximum": low + rng.choice((5, 10, 100, 1000))}


def _number(rng: random.Random) -> dict[str, Any]:
    low = rng.choice((-1.5, 0, 0, 10))
    return {"type": "number", "minimum": low, "maximum": low + rng.choice((1, 2.5, 100))}


def _enum(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.7:
        values: list[Any] = rng.sample(_WORDS, rng.randint(2, 4))
    else:
        values = sorted(rng.sample(range(1, 50), rng.randint(2, 4)))
    if rng.random() < 0.2:
        values.append(None)
    return {"enum": values}


def _nullable(rng: random.Random) -> dict[str, Any]:
    # An optional value the OpenAI way: anyOf with null.
    inner = rng.choice((_string, _integer))(rng)
    return {"anyOf": [inner, {"type": "null"}]}


def _scalar(rng: random.Random) -> dict[str, Any]:
    kind = rng.choices(
        ("string", "integer", "number", "boolean", "enum", "nullable", "null"), weights=(5, 5, 2, 3, 3, 2, 1)
    )[0]
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    return {"string": _string, "integer": _integer, "number": _number, "enum": _enum, "nullable": _nullable}[kind](rng)


def _array(rng: random.Random, depth: int) -> dict[str, Any]:
    items = _object(rng, depth + 1, max_properties=2) if depth + 1 < _MAX_DEPTH and rng.random() < 0.3 else None
    if items is None:
        items = rng.choice((_string, _integer, _enum, lambda r: {"type": "boolean"}))(rng)
    min_items = rng.choice((0, 1, 1, 2))
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": min_items + rng.choice((1, 2))}


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth + 1 < _MAX_DEPTH and roll < 0.15:
        return _object(rng, depth + 1, max_properties=3)
    if roll < 0.3:
        return _array(rng, depth)
    return _scalar(rng)


def _object(rng: random.Random, depth: int, max_properties: int) -> dict[str, Any]:
    names = rng.sample(_NAMES, rng.randint(1 if depth else 2, max_properties))
    properties = {name: _value(rng, depth) for name in names}
    # At least one required property; the others are optional (the model may leave them out).
    required = [name for name in names if rng.random() < 0.7] or [names[0]]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def estimated_tokens(schema: dict[str, Any]) -> int:
    """A generous estimate of the tokens of the longest compact answer (Qwen2.5-like tokenizer): every property
    present, arrays at maxItems, strings at maxLength (~2 characters a token), one token per digit."""
    if "anyOf" in schema:
        return max(estimated_tokens(s) for s in schema["anyOf"])
    if "enum" in schema:
        return max(len(json.dumps(v)) // 3 + 1 for v in schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        keys = sum(len(name) // 4 + 3 for name in schema["properties"])  # quotes, colon, comma
        return 2 + keys + sum(estimated_tokens(s) for s in schema["properties"].values())
    if kind == "array":
        return 2 + schema["maxItems"] * (1 + estimated_tokens(schema["items"]))
    if kind == "string":
        return 2 + (int(schema["maxLength"]) + 1) // 2
    if kind == "integer":
        return 1 + max(len(str(int(schema["minimum"]))), len(str(int(schema["maximum"]))))
    if kind == "number":
        return 8  # digits and a few decimals; the schema cannot bound the decimals
    return 1  # boolean, null


def generate_schema(seed: int) -> dict[str, Any]:
    """A JSON Schema of an object, the same for the same seed, whose answer fits TOKEN_BUDGET (estimated_tokens)."""
    rng = random.Random(seed)
    while True:  # redraw from the same stream until it fits: still a function of the seed alone
        schema = _object(rng, 0, max_properties=6)
        if estimated_tokens(schema) <= TOKEN_BUDGET:
            return schema


def generate_schemas(count: int, first_seed: int = 0) -> list[dict[str, Any]]:
    return [generate_schema(first_seed + i) for i in range(count)]


def answer_messages(schema: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages that ask for one JSON object matching `schema` (the same prompt constrained or not)."""
    return [
        {"role": "system", "content": "You reply with a single JSON object and nothing else."},
        {
            "role": "user",
            "content": "Write an example JSON object that is valid against this JSON Schema. Use realistic values. "
            "Reply with the JSON only.\n\nSchema:\n" + json.dumps(schema, separators=(",", ":")),
        },
    ]
