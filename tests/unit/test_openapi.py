"""docs/openapi.yaml says what the gateway does: the same request fields, limits and error shape."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import openai_compat, validation
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


def test_documented_bounds_of_tools_sampling_and_formats_are_the_checked_ones(doc: dict[str, Any]) -> None:
    limits = RequestLimits()
    schemas = doc["components"]["schemas"]
    props = schemas["ChatCompletionRequest"]["properties"]
    assert props["n"]["maximum"] == limits.max_n and props["n"]["minimum"] == 1
    assert props["tools"]["maxItems"] == validation.MAX_TOOLS
    assert props["logit_bias"]["maxProperties"] == validation.MAX_LOGIT_BIAS
    bias = props["logit_bias"]["additionalProperties"]
    assert (bias["minimum"], bias["maximum"]) == (-validation.MAX_LOGIT_BIAS_VALUE, validation.MAX_LOGIT_BIAS_VALUE)
    assert props["top_logprobs"]["maximum"] == validation.MAX_TOP_LOGPROBS
    for penalty in ("presence_penalty", "frequency_penalty"):
        assert (props[penalty]["minimum"], props[penalty]["maximum"]) == (
            -validation.MAX_PENALTY,
            validation.MAX_PENALTY,
        )
    assert props["repetition_penalty"]["maximum"] == validation.MAX_REPETITION_PENALTY
    assert props["stop_token_ids"]["maxItems"] == validation.MAX_STOP_TOKEN_IDS
    name_pattern = f"^{validation.NAME_PATTERN.pattern}$"
    function = schemas["Tool"]["properties"]["function"]["properties"]
    assert function["name"]["pattern"] == name_pattern
    assert function["description"]["maxLength"] == limits.max_schema_chars
    assert f"at most {limits.max_schema_chars} characters" in function["parameters"]["description"]
    json_schema = props["response_format"]["oneOf"][2]["properties"]["json_schema"]["properties"]
    assert json_schema["name"]["pattern"] == name_pattern
    assert f"at most {limits.max_schema_chars} characters" in json_schema["schema"]["description"]
    message = schemas["Message"]["properties"]
    assert "tool" in message["role"]["enum"]
    assert message["tool_calls"]["maxItems"] == validation.MAX_TOOL_CALLS
    assert message["tool_call_id"]["maxLength"] == limits.max_field_chars
    finish = schemas["ChatCompletion"]["properties"]["choices"]["items"]["properties"]["finish_reason"]["enum"]
    assert set(finish) == {"stop", "length", "tool_calls"}


def test_the_doc_says_which_requests_bypass_the_response_cache(doc: dict[str, Any]) -> None:
    text = " ".join(doc["info"]["description"].split())
    assert "(n > 1), for logprobs, or that offer tools the model may call" in text and "bypass it" in text
    assert "prompt + n * max_tokens" in text


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
