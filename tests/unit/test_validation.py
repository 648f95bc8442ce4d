import math

import pytest

from gateway.config import GatewaySettings
from gateway.validation import ChatRequestFields, RequestLimits, check_request_id, validate
from llmesh.errors import MAX_MESSAGE_CHARS, InvalidRequest

LIMITS = RequestLimits(default_max_tokens=64, max_tokens_limit=512, max_messages=4, max_prompt_chars=100)


def fields(**overrides: object) -> ChatRequestFields:
    base: dict[str, object] = {"messages": [("user", "hi")]}
    base.update(overrides)
    return ChatRequestFields(**base)  # type: ignore[arg-type]


def test_defaults_applied() -> None:
    req = validate(fields(), LIMITS)
    assert req.sampling.max_tokens == 64
    assert req.sampling.temperature == 1.0
    assert req.sampling.top_p == 1.0
    assert req.sampling.seed is None
    assert req.model == ""


def test_developer_role_is_system() -> None:
    req = validate(fields(messages=[("developer", "be brief"), ("user", "hi")]), LIMITS)
    assert req.messages[0].role == "system"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"messages": []}, "at least one message"),
        ({"messages": [("robot", "hi")]}, "messages[0].role is 'robot'"),
        ({"messages": [("user", "x")] * 5}, "limit is 4"),
        ({"messages": [("user", "x" * 101)]}, "101 characters"),
        ({"messages": [("user", "hi"), ("assistant", "hello")]}, "last message"),
        ({"max_tokens": 0}, "at least 1, got 0"),
        ({"max_tokens": -3}, "at least 1, got -3"),
        ({"max_tokens": 513}, "at most 512"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "must not be empty"),
    ],
)
def test_rejections_say_what_is_wrong(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=None) as info:
        validate(fields(**overrides), LIMITS)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "param", "message"),
    [
        ({"model": "m" * 257}, "model", "model is 257 characters long; the limit is 256"),
        ({"user": "u" * 300}, "user", "user is 300 characters long"),
        ({"stop": ["s" * 257]}, "stop[0]", "stop[0] is 257 characters long"),
        ({"seed": 2**63}, "seed", "64-bit signed integer"),
        ({"seed": -(2**63) - 1}, "seed", "64-bit signed integer"),
        ({"temperature": math.inf}, "temperature", "finite number in [0, 2]"),
        ({"temperature": 10**400}, "temperature", "finite number"),
        ({"top_p": -math.inf}, "top_p", "finite number in (0, 1]"),
        ({"max_tokens": 10**30}, "max_tokens", "at most 512"),
        (
            {"messages": [("user", "a\ud800b")]},
            "messages[0].content",
            "lone UTF-16 surrogate ('\\ud800') at character 1",
        ),
        ({"model": "\udfff"}, "model", "not valid Unicode"),
        ({"stop": ["\ud800"]}, "stop[0]", "not valid Unicode"),
        ({"user": "\ud800"}, "user", "not valid Unicode"),
    ],
)
def test_every_value_is_bounded(overrides: dict[str, object], param: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(fields(**overrides), LIMITS)
    assert message in str(info.value)
    assert info.value.param == param


def test_seed_at_int64_edges_is_fine() -> None:
    assert validate(fields(seed=2**63 - 1), LIMITS).sampling.seed == 2**63 - 1
    assert validate(fields(seed=-(2**63)), LIMITS).sampling.seed == -(2**63)


def test_errors_quote_only_a_short_escaped_prefix() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(fields(messages=[("\x1b[31m" + "r" * 100_000, "hi")]), LIMITS)
    text = str(info.value)
    assert len(text) < 200 and "\x1b" not in text and "\\x1b" in text and "(100005 characters)" in text


def test_messages_too_long_carries_openai_code() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(fields(messages=[("user", "x" * 101)]), LIMITS)
    assert info.value.code == "context_length_exceeded"


@pytest.mark.parametrize("value", ["", "r" * 129, "has space", "new\nline", "ünï"])
def test_request_id_is_bounded(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_request_id(value, LIMITS)
    assert info.value.param == "x-request-id" and len(str(info.value)) < 200


def test_request_id_of_envoy_and_tracers_is_fine() -> None:
    for value in ("1dbc47d0-0561-4dc6-941d-60c3ce8b9078", "req_01H:abc.def", "b64+/id==", "r" * 128):
        assert check_request_id(value, LIMITS) == value


def test_limits_come_from_gateway_settings() -> None:
    settings = GatewaySettings(max_field_chars=10, max_body_bytes=99, max_json_depth=4, max_messages=3)
    limits = RequestLimits.of(settings)
    assert (limits.max_field_chars, limits.max_body_bytes, limits.max_json_depth, limits.max_messages) == (10, 99, 4, 3)
    limits = RequestLimits.of(GatewaySettings(max_n=8, max_schema_chars=1000))
    assert (limits.max_n, limits.max_schema_chars) == (8, 1000)
    defaults = RequestLimits.of(GatewaySettings())
    assert (defaults.max_n, defaults.max_schema_chars) == (RequestLimits().max_n, RequestLimits().max_schema_chars)


def test_mesh_error_messages_are_capped() -> None:
    exc = InvalidRequest("x" * 100_000)
    assert len(str(exc)) <= MAX_MESSAGE_CHARS and str(exc).endswith("(truncated)")
