import math

import pytest

from gateway.validation import ChatRequestFields, RequestLimits, validate
from llmesh.errors import InvalidRequest

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
