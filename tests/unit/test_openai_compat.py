import json
import math

import pytest

from gateway import openai_compat
from gateway.validation import RequestLimits
from llmesh import errors
from llmesh.errors import InvalidRequest
from llmesh.types import ChatMessage, RouteInfo, RouteKind, Usage


def body(**payload: object) -> bytes:
    return json.dumps(payload).encode()


def test_parses_openai_request() -> None:
    parsed = openai_compat.parse_request(
        body(
            model="auto",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            max_tokens=12,
            temperature=0,
            seed=7,
            stop="END",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert parsed.stream and parsed.include_usage
    f = parsed.fields
    assert f.messages == [ChatMessage("system", "be brief"), ChatMessage("user", "hi")]
    assert (f.max_tokens, f.temperature, f.seed, list(f.stop)) == (12, 0, 7, ["END"])


def test_max_completion_tokens_wins() -> None:
    parsed = openai_compat.parse_request(body(messages=[], max_tokens=5, max_completion_tokens=9))
    assert parsed.fields.max_tokens == 9


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8"),
        (b"[1, 2]", "request body must be an object, got an array"),
        (body(messages="hi"), "messages must be an array, got a string"),
        (body(messages=[{"role": "user"}]), "messages[0].content is missing"),
        (body(messages=[{"role": 3, "content": "x"}]), "messages[0].role must be a string, got a number"),
        (body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only 'text'"),
        (body(messages=[], max_tokens="ten"), "max_tokens must be an integer, got a string"),
        (body(messages=[], max_tokens=True), "must be a number"),
        (body(messages=[], n="2"), "n must be an integer, got a string"),
        (body(messages=[], stream="yes"), "stream must be a boolean, got a string"),
    ],
)
def test_bad_json_is_invalid_request(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        openai_compat.parse_request(raw)
    assert message in str(info.value)


def test_completion_json_shape() -> None:
    out = json.loads(
        openai_compat.completion_json(
            "id1", 5, RouteInfo("small", "tier free default", RouteKind.TIER_DEFAULT), "Hello", "stop", Usage(3, 2)
        )
    )
    assert out["object"] == "chat.completion"
    assert out["model"] == "small"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert out["llmesh_route"] == {"variant": "small", "reason": "tier free default", "kind": "tier_default"}


def test_sse_chunk_framing() -> None:
    raw = openai_compat.sse_chunk("id1", 5, "small", {"content": "Hi"})
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    chunk = json.loads(raw[len(b"data: ") :])
    assert chunk["choices"][0]["delta"] == {"content": "Hi"}
    assert chunk["choices"][0]["finish_reason"] is None
    usage_only = json.loads(openai_compat.sse_chunk("id1", 5, "small", None, usage=Usage(1, 1))[6:])
    assert usage_only["choices"] == [] and usage_only["usage"]["total_tokens"] == 2


HI = [{"role": "user", "content": "hi"}]


def raw_body(text: str) -> bytes:
    """A body as a hostile client could write it (lone surrogate escapes, huge literals)."""
    return text.encode()


def refused(raw: bytes, limits: RequestLimits | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        openai_compat.parse_request(raw, limits)
    return info.value


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "seed", "n", "temperature", "top_p"])
def test_huge_integer_literals_are_refused_by_name(field: str) -> None:
    exc = refused(raw_body('{"messages": [{"role": "user", "content": "hi"}], "' + field + '": ' + "9" * 5000 + "}"))
    assert f"{field} is a 5000-digit number; out of range" in str(exc)
    assert exc.param == field


def test_huge_integer_in_an_ignored_place_does_not_crash() -> None:
    exc = refused(raw_body('{"messages": [{"role": "user", "content": "hi"}], "metadata": {"a": %s}}' % ("9" * 5000)))
    assert "must be a string, got a number" in str(exc)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_are_refused(literal: str) -> None:
    exc = refused(raw_body('{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal + "}"))
    assert f"holds {literal}, which is not a JSON number" in str(exc)


def test_float_overflow_reaches_range_check_as_infinity() -> None:
    parsed = openai_compat.parse_request(raw_body('{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}'))
    assert parsed.fields.top_p == math.inf  # validate() refuses it: not finite


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages": [{"role": "user", "content": "a\\ud800"}]}', "messages[0].content"),
        ('{"messages": [{"role": "user", "content": "hi"}], "model": "\\udfff"}', "model"),
        ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["x\\ud800"]}', "stop[0]"),
        ('{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}', "messages[0].name"),
        ('{"messages": [{"role": "user", "content": "hi"}], "metadata": {"\\ud800": "x"}}', "a key in metadata"),
        ('{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages[0].role"),
    ],
)
def test_lone_surrogates_are_refused_anywhere(body: str, param: str) -> None:
    exc = refused(raw_body(body))
    assert "is not valid Unicode: it holds a lone UTF-16 surrogate" in str(exc)
    assert param in str(exc)
    assert "\\ud800" in str(exc) or "\\udfff" in str(exc)


def test_surrogate_pair_is_fine() -> None:
    parsed = openai_compat.parse_request(raw_body('{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'))
    assert parsed.fields.messages == [ChatMessage("user", "\U0001f600")]


@pytest.mark.parametrize("depth", [40, 5000, 200_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    exc = refused(
        raw_body('{"messages": [{"role": "user", "content": "hi"}], "metadata": %s}' % ("[" * depth + "]" * depth))
    )
    assert "nests deeper than 32 levels" in str(exc)


def test_body_size_and_value_count_are_bounded() -> None:
    small = RequestLimits(max_body_bytes=100)
    assert "the limit is 100" in str(refused(body(messages=HI, user="x" * 200), small))
    many = json.dumps({"messages": HI, "metadata": {"a": "x"}, "store": False, "stop": [0] * 30_000}).encode()
    assert "more than 20000 JSON values" in str(refused(many))


def test_duplicate_keys_are_refused() -> None:
    exc = refused(raw_body('{"messages": [], "messages": [{"role": "user", "content": "hi"}]}'))
    assert "repeats the key 'messages'" in str(exc)


NULLABLE = [
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "n", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "tools",
    "tool_choice", "functions", "function_call", "logit_bias", "logprobs", "top_logprobs", "frequency_penalty",
    "presence_penalty", "response_format", "modalities", "audio", "prediction", "web_search_options",
    "reasoning_effort", "verbosity", "prompt_cache_key", "safety_identifier",
]  # fmt: skip


@pytest.mark.parametrize("field", NULLABLE)
def test_null_means_default(field: str) -> None:
    parsed = openai_compat.parse_request(body(messages=HI, **{field: None}))
    assert parsed.fields == openai_compat.parse_request(body(messages=HI)).fields
    assert not parsed.stream and not parsed.include_usage


@pytest.mark.parametrize(
    "field", ["name", "refusal", "annotations", "tool_calls", "tool_call_id", "function_call", "audio"]
)
def test_null_message_fields_are_accepted(field: str) -> None:
    parsed = openai_compat.parse_request(body(messages=[{"role": "user", "content": "hi", field: None}]))
    assert parsed.fields.messages == [ChatMessage("user", "hi")]


def test_stream_options_null_include_usage() -> None:
    parsed = openai_compat.parse_request(body(messages=HI, stream=True, stream_options={"include_usage": None}))
    assert parsed.stream and not parsed.include_usage


def test_neutral_values_are_accepted() -> None:
    neutral = {
        "tools": [], "tool_choice": "none", "logit_bias": {}, "logprobs": False, "top_logprobs": 0,
        "frequency_penalty": 0, "presence_penalty": 0.0, "response_format": {"type": "text"}, "modalities": ["text"],
        "store": False, "service_tier": "auto", "parallel_tool_calls": True, "metadata": {"team": "a"},
    }  # fmt: skip
    assert openai_compat.parse_request(body(messages=HI, **neutral)).fields.messages == [ChatMessage("user", "hi")]


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
        ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type", "unsupported_parameter"),
        ({"response_format": {"type": "grammar"}}, "response_format.type", "unsupported_parameter"),
        ({"audio": {"voice": "x"}}, "audio", "unsupported_parameter"),
        ({"prediction": {"type": "content"}}, "prediction", "unsupported_parameter"),
        ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
        ({"verbosity": "low"}, "verbosity", "unsupported_parameter"),
        ({"temprature": 0}, "temprature", "unknown_parameter"),
        ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages[0].colour", "unknown_parameter"),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]},
            "messages[0].tool_calls[0].function",
            None,
        ),
        ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages[0].audio", None),
    ],
)
def test_fields_llmesh_cannot_honour_are_refused_by_name(payload: dict[str, object], param: str, code: str) -> None:
    exc = refused(body(**{"messages": HI, **payload}))
    assert exc.param == param
    assert param.split(".")[-1] in str(exc)
    if code:
        assert exc.code == code


def test_metadata_is_bounded_like_openai() -> None:
    assert "17 keys; the limit is 16" in str(refused(body(messages=HI, metadata={str(i): "x" for i in range(17)})))
    assert "a metadata value is 513 characters" in str(refused(body(messages=HI, metadata={"k": "v" * 513})))
    assert "must be a string" in str(refused(body(messages=HI, metadata={"k": 1})))


def test_content_parts_are_bounded() -> None:
    parts = [{"type": "text", "text": "a"}] * 65
    assert "65 parts; the limit is 64" in str(refused(body(messages=[{"role": "user", "content": parts}])))


def test_error_messages_quote_at_most_a_short_prefix() -> None:
    exc = refused(body(messages=HI, **{"x" * 10_000: 1}))
    assert len(str(exc)) < 200 and "(10000 characters)" in str(exc)
    exc = refused(body(messages=[{"role": "user", "content": [{"type": "y" * 10_000}]}]))
    assert len(str(exc)) < 200


def test_error_json_is_openai_shaped_ascii() -> None:
    exc = InvalidRequest("temperature must be a finite number, got 'é'", param="temperature")
    raw = openai_compat.error_json(exc, "chatcmpl-1")
    assert raw.isascii()
    assert json.loads(raw) == {
        "error": {
            "message": "temperature must be a finite number, got 'é'",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    assert json.loads(openai_compat.error_json(errors.Unauthenticated("missing API key"), "r"))["error"]["type"] == (
        "authentication_error"
    )


def test_server_side_errors_hide_internal_detail() -> None:
    unavailable = errors.Unavailable("router unavailable: failed to connect to ipv4:127.0.0.1:50052: refused")
    text = openai_compat.caller_message(unavailable, "chatcmpl-9")
    assert "127.0.0.1" not in text and "50052" not in text and "chatcmpl-9" in text
    internal = errors.Internal("model x on 10.0.0.3:8001 failed: KeyError 'y'")
    text = openai_compat.caller_message(internal, "chatcmpl-9")
    assert "10.0.0.3" not in text and "KeyError" not in text and "chatcmpl-9" in text


def test_sse_error_has_no_class_name() -> None:
    raw = openai_compat.sse_error(errors.Unavailable("replica went away"), "chatcmpl-2")
    error = json.loads(raw[len(b"data: ") :])["error"]
    assert error["type"] == "service_unavailable_error" and "InvalidRequest" not in raw.decode()
    assert set(error) == {"message", "type", "param", "code"}


def test_both_max_token_fields_are_bounded() -> None:
    exc = refused(body(messages=HI, max_completion_tokens=4, max_tokens=10**20))
    assert exc.param == "max_tokens" and "must be in [1, 1024]" in str(exc)
    assert "max_tokens must be an integer" in str(refused(body(messages=HI, max_completion_tokens=4, max_tokens="x")))
    assert openai_compat.parse_request(body(messages=HI, max_completion_tokens=4, max_tokens=9)).fields.max_tokens == 4
