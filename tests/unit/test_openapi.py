"""docs/openapi.yaml says what the gateway does: the same request fields, limits and error shape."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import openai_compat
from gateway.validation import MAX_STOP_SEQUENCES, RequestLimits

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return yaml.safe_load(DOC.read_text())  # type: ignore[no-any-return]


def test_documented_fields_are_the_parsed_ones(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for schema, fields in (
        ("ChatCompletionRequest", openai_compat.REQUEST_FIELDS),
        ("Message", openai_compat.MESSAGE_FIELDS),
    ):
        documented = schemas[schema]["x-llmesh-fields"]
        assert {k: set(v) for k, v in documented.items()} == {k: set(v) for k, v in fields.items()}, schema
        assert set(schemas[schema]["properties"]) == set().union(*fields.values()), schema
        assert schemas[schema]["additionalProperties"] is False


def test_documented_limits_are_the_defaults(doc: dict[str, Any]) -> None:
    limits = RequestLimits()
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["model"]["maxLength"] == limits.max_field_chars
    assert props["user"]["maxLength"] == limits.max_field_chars
    assert props["messages"]["maxItems"] == limits.max_messages
    assert props["max_tokens"]["maximum"] == limits.max_tokens_limit
    stop_list = props["stop"]["oneOf"][2]
    assert stop_list["maxItems"] == MAX_STOP_SEQUENCES and stop_list["items"]["maxLength"] == limits.max_field_chars
    assert props["metadata"]["maxProperties"] == openai_compat.MAX_METADATA_KEYS
    content_parts = doc["components"]["schemas"]["Message"]["properties"]["content"]["oneOf"][1]
    assert content_parts["maxItems"] == limits.max_content_parts
    description = doc["components"]["schemas"]["ChatCompletionRequest"]["description"]
    assert f"nests at most {limits.max_json_depth} levels" in description
    assert f"at most {limits.max_json_values} JSON values" in description
    assert f"longer than {openai_compat.MAX_INT_DIGITS} digits" in description


def test_every_error_is_the_openai_error_object(doc: dict[str, Any]) -> None:
    error = doc["components"]["schemas"]["ErrorResponse"]["properties"]["error"]
    assert error["required"] == ["message", "type", "param", "code"]
    kinds = {kind for _, kind, _ in openai_compat._ERROR_TYPES}
    assert kinds <= set(error["properties"]["type"]["enum"])
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert response == {"$ref": "#/components/responses/Error"}, (path, status)
