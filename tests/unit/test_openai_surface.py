"""The OpenAI surface beyond plain text: tools and tool turns, response formats, penalties, logit_bias, logprobs,
n choices and stop token ids. Parsed (JSON and gRPC alike), shaped into OpenAI's JSON and SSE (which the openai
SDK's own models must read), kept apart in the response cache's key, bypassing that cache where it cannot answer,
and reserved against the token budget for every choice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway import openai_compat
from gateway.caching import GrpcCacheClient
from gateway.pipeline import CachedAnswer, ChoiceOutput, Reservation, cacheable
from gateway.router_client import GrpcRouterClient
from gateway.server import ChatServicer, _fields
from gateway.validation import RequestLimits, check_json_object_text, validate
from llmesh.convert import (
    logprobs_to_pb,
    messages_to_pb,
    output_from_pb,
    output_to_pb,
    prepared_to_pb,
    route_to_pb,
    tool_calls_to_pb,
    usage_to_pb,
)
from llmesh.errors import Internal, InvalidRequest
from llmesh.types import (
    ChatMessage,
    ChatRequest,
    GenerateEvent,
    OutputSpec,
    PreparedPrompt,
    Principal,
    ResponseFormat,
    RouteInfo,
    RouteKind,
    SamplingParams,
    Tier,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    ToolSpec,
    TopLogprob,
    Usage,
)
from llmesh.v1 import chat_pb2, common_pb2, router_pb2
from tests.unit.test_pipeline import PREPARED, PRINCIPAL, FakeCache, FakeQuotas, FakeRouter, pipeline

LIMITS = RequestLimits()
HI = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}
WEATHER_SCHEMA = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'


def body(**payload: object) -> bytes:
    return json.dumps(payload).encode()


def parsed(**payload: Any) -> ChatRequest:
    """Through both steps of the OpenAI route: parse_request, then validate."""
    return validate(openai_compat.parse_request(body(**{"messages": HI, **payload})).fields, LIMITS)


def refused(**payload: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parsed(**payload)
    return info.value


# --- requests ------------------------------------------------------------------------------------------------------


def test_a_request_with_every_new_field_is_served() -> None:
    request = parsed(
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
        ],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
        },
        logprobs=True,
        top_logprobs=5,
        presence_penalty=0.5,
        frequency_penalty=-1,
        repetition_penalty=1.2,
        logit_bias={"50256": -100, "7": 2.5},
        seed=3,
        n=2,
        stop=["END"],
        stop_token_ids=[2, 0],
    )
    assert request.messages == (
        ChatMessage("user", "weather in Paris?"),
        ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
        ChatMessage("tool", "sunny", (), "call_1", "get_weather"),
    )
    assert request.output == OutputSpec(
        tools=(ToolSpec("get_weather", "Weather of a city", WEATHER_SCHEMA, True),),
        tool_choice=ToolChoice.FUNCTION,
        tool_choice_function="get_weather",
        parallel_tool_calls=False,
        response_format=ResponseFormat.JSON_SCHEMA,
        json_schema='{"type":"object"}',
        json_schema_name="w",
        json_schema_strict=True,
    )
    assert request.sampling == SamplingParams(
        max_tokens=LIMITS.default_max_tokens,
        seed=3,
        stop=("END",),
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        repetition_penalty=1.2,
        logit_bias=((7, 2.5), (50256, -100.0)),
        logprobs=True,
        top_logprobs=5,
        n=2,
        stop_token_ids=(2, 0),
    )


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"tool_choice": "auto"}, OutputSpec(tool_choice=ToolChoice.AUTO)),
        ({"tool_choice": "none", "tools": [WEATHER]}, ToolChoice.NONE),
        ({"tool_choice": "required", "tools": [WEATHER]}, ToolChoice.REQUIRED),
        ({"response_format": {"type": "json_object"}}, OutputSpec(response_format=ResponseFormat.JSON_OBJECT)),
        ({"response_format": {"type": "text"}}, OutputSpec()),
        ({"tools": [{"type": "function", "function": {"name": "f-1_x"}}]}, OutputSpec(tools=(ToolSpec("f-1_x"),))),
    ],
)
def test_tool_choices_and_formats(payload: dict[str, Any], expected: OutputSpec | ToolChoice) -> None:
    output = parsed(**payload).output
    if isinstance(expected, ToolChoice):
        assert output.tool_choice is expected and output.tools[0].name == "get_weather"
    else:
        assert output == expected


def test_the_json_schema_description_is_accepted_and_the_message_name_of_other_roles_ignored() -> None:
    request = parsed(
        messages=[{"role": "user", "content": "hi", "name": "alice"}],
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {}, "description": "d"}},
    )
    assert request.messages == (ChatMessage("user", "hi"),)
    assert request.output.json_schema == "{}"


def test_a_tool_message_may_be_last_and_content_parts_serve_it() -> None:
    request = parsed(
        messages=[
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
            {
                "role": "tool",
                "tool_call_id": "c",
                "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "2"}],
            },
        ]
    )
    assert request.messages[-1] == ChatMessage("tool", "42", (), "c", "")
    assert request.messages[0].content == ""


OVER_300 = {str(i): 1 for i in range(301)}
DEEP = {"type": "object", "properties": {"a": {"type": "string"}}, "x": "y" * (64 * 1024)}


@pytest.mark.parametrize(
    ("payload", "param", "text"),
    [
        ({"tools": {"type": "function"}}, "tools", "must be an array"),
        ({"tools": [WEATHER] * 129}, "tools", "129 tools; the limit is 128"),
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type", "only 'function'"),
        ({"tools": [{"function": {"name": "f"}}]}, "tools[0].type", "only 'function'"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "must be an object"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", "missing"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "1 to 64"),
        ({"tools": [{"type": "function", "function": {"name": "f" * 65}}]}, "tools[0].function.name", "1 to 64"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name", "1 to 64"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "names are unique"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": ["x"]}}]},
            "tools[0].function.parameters",
            "must be an object",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]},
            "tools[0].function.parameters",
            "the limit is 65536",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]},
            "tools[0].function.description",
            "must be a string",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
            "tools[0].function.strict",
            "must be a boolean",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f", "colour": 1}}]}, "tools[0].function.colour", ""),
        ({"tool_choice": "sometimes"}, "tool_choice", "expected 'auto', 'none', 'required'"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]},
            "tool_choice",
            "not among",
        ),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "needs tools"),
        ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice.type", "only 'function'"),
        ({"tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name", "must be a string"),
        ({"tool_choice": 3}, "tool_choice", "must be an object"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "must be a boolean"),
        ({"response_format": "json"}, "response_format", "must be an object"),
        ({"response_format": {"type": "grammar"}}, "response_format.type", "'json_schema'"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "w"}}},
            "response_format.json_schema.schema",
            "missing",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
            "missing",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
            "response_format.json_schema.name",
            "1 to 64",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": [1]}}},
            "response_format.json_schema.schema",
            "must be an object",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": DEEP}}},
            "response_format.json_schema.schema",
            "the limit is 65536",
        ),
        ({"response_format": {"type": "json_object", "json_schema": {}}}, "response_format.json_schema", ""),
        ({"logprobs": "yes"}, "logprobs", "must be a boolean"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "in [0, 20]"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "in [0, 20]"),
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs set to true"),
        ({"logprobs": False, "top_logprobs": 3}, "top_logprobs", "needs logprobs set to true"),
        ({"presence_penalty": 2.5}, "presence_penalty", "in [-2, 2]"),
        ({"presence_penalty": "high"}, "presence_penalty", "must be a number"),
        ({"frequency_penalty": -3}, "frequency_penalty", "in [-2, 2]"),
        ({"frequency_penalty": True}, "frequency_penalty", "must be a number"),
        ({"repetition_penalty": 0}, "repetition_penalty", "in (0, 2]"),
        ({"repetition_penalty": 2.5}, "repetition_penalty", "in (0, 2]"),
        ({"logit_bias": [1]}, "logit_bias", "must be an object"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {"1.5": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "token id in [0, 2147483647]"),
        ({"logit_bias": {"99999999999": 1}}, "logit_bias", "token id in [0, 2147483647]"),
        ({"logit_bias": {"1": 101}}, "logit_bias", "in [-100, 100]"),
        ({"logit_bias": {"1": -100.5}}, "logit_bias", "in [-100, 100]"),
        ({"logit_bias": {"1": "x"}}, "logit_bias['1']", "must be a number"),
        ({"logit_bias": OVER_300}, "logit_bias", "301 entries; the limit is 300"),
        ({"seed": "x"}, "seed", "must be an integer"),
        ({"n": 0}, "n", "in [1, 4]"),
        ({"n": 5}, "n", "in [1, 4]"),
        ({"n": 2.5}, "n", "must be an integer"),
        ({"stop_token_ids": 2}, "stop_token_ids", "must be an array"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]", "token id in"),
        ({"stop_token_ids": [1, 2**31]}, "stop_token_ids[1]", "token id in"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids[0]", "must be an integer"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids", "65 ids; the limit is 64"),
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
        ({"function_call": {"name": "f"}}, "function_call", "use tool_choice"),
        ({"modalities": ["text", "audio"]}, "modalities", 'only null or ["text"]'),
    ],
)
def test_each_bad_value_is_a_400_naming_its_parameter(payload: dict[str, Any], param: str, text: str) -> None:
    exc = refused(**payload)
    assert exc.param == param, str(exc)
    assert text in str(exc)


@pytest.mark.parametrize(
    ("messages", "param", "text"),
    [
        ([{"role": "tool", "content": "4"}], "messages[0].tool_call_id", "missing"),
        ([{"role": "tool", "content": "4", "tool_call_id": 7}], "messages[0].tool_call_id", "must be a string"),
        ([{"role": "tool", "content": "4", "tool_call_id": "c" * 257}], "messages[0].tool_call_id", "the limit is 256"),
        ([{"role": "user", "content": "hi", "tool_call_id": "c"}], "messages[0].tool_call_id", "only to tool messages"),
        (
            [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
                }
            ],
            "messages[0].tool_calls",
            "only assistant messages",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}, HI[0]],
            "messages[0].tool_calls[0].function.arguments",
            "must be a string",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}, HI[0]],
            "messages[0].tool_calls[0].id",
            "must be a string",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"id": "", "function": {"name": "f", "arguments": "{}"}}]}, HI[0]],
            "messages[0].tool_calls[0].id",
            "missing",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f g", "arguments": "{}"}}]}, HI[0]],
            "messages[0].tool_calls[0].function.name",
            "1 to 64",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {}}]}, HI[0]],
            "messages[0].tool_calls[0].type",
            "only 'function'",
        ),
        ([{"role": "assistant", "tool_calls": [], "content": None}, HI[0]], "messages[0].content", "missing"),
        ([{"role": "assistant", "content": None}, HI[0]], "messages[0].content", "missing"),
        (
            [HI[0], {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}],
            "messages[1].role",
            "not the assistant",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "x" * 200_001}}],
                },
                HI[0],
            ],
            "messages",
            "the limit is 200000",
        ),
    ],
)
def test_tool_turns_are_checked(messages: list[dict[str, Any]], param: str, text: str) -> None:
    exc = refused(messages=messages)
    assert exc.param == param, str(exc)
    assert text in str(exc)


@pytest.mark.parametrize(
    ("number", "param", "text"),
    [
        ("9" * 30, "tools[0].function.parameters", "30-digit number; out of range"),
        ("1e999", "tools[0].function.parameters", "Infinity is not a JSON number"),
    ],
)
def test_schema_numbers_json_cannot_carry_are_refused(number: str, param: str, text: str) -> None:
    # A literal JSON allows but Python's json cannot write back: spliced into the body as text.
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "maximum": "N"}}}
    raw = body(messages=HI, tools=[tool]).replace(b'"N"', number.encode())
    with pytest.raises(InvalidRequest) as info:
        validate(openai_compat.parse_request(raw).fields, LIMITS)
    assert info.value.param == param and text in str(info.value)
    form = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"maximum": "N"}}}
    raw = body(messages=HI, response_format=form).replace(b'"N"', number.encode())
    with pytest.raises(InvalidRequest) as info:
        validate(openai_compat.parse_request(raw).fields, LIMITS)
    assert info.value.param == "response_format.json_schema.schema"


def test_n_is_bounded_by_the_configured_maximum() -> None:
    fields = openai_compat.parse_request(body(messages=HI, n=6)).fields
    assert validate(fields, RequestLimits(max_n=6)).sampling.n == 6
    with pytest.raises(InvalidRequest, match=r"in \[1, 5\]"):
        validate(fields, RequestLimits(max_n=5))


def test_schemas_are_bounded_by_the_configured_size_and_depth() -> None:
    small = RequestLimits(max_schema_chars=40)
    with pytest.raises(InvalidRequest) as info:
        check_json_object_text('{"type":"object","properties":{"a":{"type":"string"}}}', "p", small)
    assert "the limit is 40" in str(info.value) and info.value.param == "p"
    deep = '{"a":' * 40 + "{}" + "}" * 40
    with pytest.raises(InvalidRequest, match="nests deeper than 32 levels"):
        check_json_object_text(deep, "p", LIMITS)
    for bad, text in (("{", "not valid JSON"), ('{"a": NaN}', "not valid JSON"), ("[]", "must be a JSON object")):
        with pytest.raises(InvalidRequest, match=text):
            check_json_object_text(bad, "p", LIMITS)
    assert check_json_object_text('{"type": "object"}', "p", LIMITS) == '{"type": "object"}'


# --- the gRPC API: the same fields through the same checks -----------------------------------------------------------


def grpc_request(**overrides: Any) -> chat_pb2.ChatCompletionRequest:
    request = chat_pb2.ChatCompletionRequest(messages=[common_pb2.ChatMessage(role="user", content="hi")])
    for name, value in overrides.items():
        if name == "output":
            request.output.CopyFrom(value)
        elif name == "logit_bias":
            request.logit_bias.update(value)
        elif name == "messages":
            del request.messages[:]
            request.messages.extend(value)
        elif isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


def test_grpc_and_openai_requests_validate_to_the_same_chat_request() -> None:
    conversation = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    from_json = parsed(
        messages=conversation,
        tools=[WEATHER],
        tool_choice="required",
        response_format={"type": "json_object"},
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.25,
        frequency_penalty=0.5,
        repetition_penalty=1.5,
        logit_bias={"3": 1.5},
        n=3,
        stop_token_ids=[9],
    )
    from_grpc = validate(
        _fields(
            grpc_request(
                messages=messages_to_pb(from_json.messages),
                output=output_to_pb(from_json.output),
                logprobs=True,
                top_logprobs=2,
                presence_penalty=0.25,
                frequency_penalty=0.5,
                repetition_penalty=1.5,
                logit_bias={3: 1.5},
                n=3,
                stop_token_ids=[9],
            )
        ),
        LIMITS,
    )
    assert from_grpc == from_json


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {-5: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 200.0}}, "logit_bias"),
        ({"stop_token_ids": [-2]}, "stop_token_ids[0]"),
        ({"output": common_pb2.OutputSpec(tools=[common_pb2.Tool(name="a b")])}, "tools[0].function.name"),
        (
            {"output": common_pb2.OutputSpec(tools=[common_pb2.Tool(name="f", parameters_json="[1]")])},
            "tools[0].function.parameters",
        ),
        ({"output": common_pb2.OutputSpec(tool_choice="required")}, "tool_choice"),
        ({"output": common_pb2.OutputSpec(tool_choice="auto", tool_choice_function="f")}, "tool_choice"),
        ({"output": common_pb2.OutputSpec(response_format="json_schema")}, "response_format.json_schema.schema"),
        ({"output": common_pb2.OutputSpec(json_schema="{}")}, "response_format"),
        ({"messages": [common_pb2.ChatMessage(role="tool", content="4")]}, "messages[0].tool_call_id"),
        (
            {
                "messages": [
                    common_pb2.ChatMessage(
                        role="user", content="hi", tool_calls=[common_pb2.ToolCall(id="c", name="f")]
                    )
                ]
            },
            "messages[0].tool_calls",
        ),
        ({"prompt": "Once upon"}, "prompt"),
    ],
)
def test_grpc_requests_are_refused_like_openai_ones(overrides: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(_fields(grpc_request(**overrides)), LIMITS)
    assert info.value.param == param, str(info.value)


def test_a_raw_prompt_passes_through_without_messages() -> None:
    request = validate(_fields(grpc_request(messages=[], prompt="Once upon a time")), LIMITS)
    assert request.prompt == "Once upon a time" and request.messages == ()
    tools = common_pb2.OutputSpec(tools=[common_pb2.Tool(name="f")])
    with pytest.raises(InvalidRequest) as info:
        validate(_fields(grpc_request(messages=[], prompt="x", output=tools)), LIMITS)
    assert info.value.param == "tools"
    with pytest.raises(InvalidRequest) as info:
        validate(_fields(grpc_request(messages=[], prompt="x" * 200_001)), LIMITS)
    assert info.value.code == "context_length_exceeded"


def test_an_unknown_grpc_tool_choice_or_format_is_refused_by_name() -> None:
    with pytest.raises(InvalidRequest, match="tool_choice") as info:
        _fields(grpc_request(output=common_pb2.OutputSpec(tool_choice="sometimes")))
    assert info.value.param == "tool_choice"
    with pytest.raises(InvalidRequest, match="response_format") as info:
        _fields(grpc_request(output=common_pb2.OutputSpec(response_format="yaml")))
    assert info.value.param == "response_format"


# --- responses: JSON and SSE the openai SDK reads ---------------------------------------------------------------------

ROUTE = RouteInfo("small", "tier free default small", RouteKind.TIER_DEFAULT)
LOGPROBS = (
    TokenLogprob("Hi", -0.25, b"Hi", (TopLogprob("Hi", -0.25, b"Hi"), TopLogprob("Hello", -1.5, b"Hello"))),
    TokenLogprob("\u00e9", float("-inf"), "\u00e9".encode(), ()),
)
CALLS = (ToolCall("call_a", "get_weather", '{"city":"Paris"}'), ToolCall("call_b", "get_time", "{}"))


def test_a_completion_with_tool_calls_logprobs_and_two_choices_reads_as_openai_chat_completion() -> None:
    choices = (ChoiceOutput(0, "", "tool_calls", CALLS, ()), ChoiceOutput(1, "Hi\u00e9", "stop", (), LOGPROBS))
    raw = openai_compat.completion_json(
        "chatcmpl-1", 5, ROUTE, "", "tool_calls", Usage(9, 7), choices=choices, logprobs=True
    )
    completion = ChatCompletion.model_validate(json.loads(raw))
    first, second = completion.choices
    assert (first.index, first.finish_reason, first.message.content) == (0, "tool_calls", None)
    assert first.message.tool_calls is not None
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in first.message.tool_calls] == [  # type: ignore[union-attr]
        ("call_a", "function", "get_weather", '{"city":"Paris"}'),
        ("call_b", "function", "get_time", "{}"),
    ]
    assert (second.index, second.finish_reason, second.message.content) == (1, "stop", "Hi\u00e9")
    assert second.message.tool_calls is None
    assert second.logprobs is not None and second.logprobs.content is not None
    token, other = second.logprobs.content
    assert (token.token, token.logprob, token.bytes) == ("Hi", -0.25, list(b"Hi"))
    assert [(t.token, t.logprob) for t in token.top_logprobs] == [("Hi", -0.25), ("Hello", -1.5)]
    assert other.logprob == openai_compat.MIN_LOGPROB and other.bytes == list("\u00e9".encode())
    assert first.logprobs is not None and first.logprobs.content == []
    assert completion.usage is not None and completion.usage.total_tokens == 16


def test_without_logprobs_asked_the_choice_logprobs_are_null_and_plain_content_stays_a_string() -> None:
    raw = openai_compat.completion_json("id", 5, ROUTE, "Hello", "stop", Usage(3, 2))
    out = json.loads(raw)
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop", "logprobs": None}
    ]
    ChatCompletion.model_validate(out)
    unnamed = openai_compat.completion_json(
        "chatcmpl-x",
        5,
        ROUTE,
        "",
        "tool_calls",
        Usage(1, 1),
        choices=(ChoiceOutput(0, "ok", "tool_calls", (ToolCall("", "f", "{}"),)),),
    )
    message = json.loads(unnamed)["choices"][0]["message"]
    assert message["content"] == "ok" and message["tool_calls"][0]["id"] == "call_chatcmpl-x_0_0"


def stream_events() -> list[GenerateEvent]:
    """Two choices interleaved: 0 writes text with logprobs, 1 calls two tools (in two events); usage last."""
    return [
        GenerateEvent(route=ROUTE),
        GenerateEvent(delta="Hi", index=0, logprobs=LOGPROBS[:1]),
        GenerateEvent(index=1, tool_calls=CALLS[:1]),
        GenerateEvent(delta="\u00e9", index=0, logprobs=LOGPROBS[1:]),
        GenerateEvent(index=1, tool_calls=CALLS[1:], finish_reason="tool_calls"),
        GenerateEvent(index=0, finish_reason="stop", usage=Usage(9, 5)),
    ]


def sse_chunks(events: list[GenerateEvent], n: int = 2, include_usage: bool = True) -> list[dict[str, Any]]:
    shaper = openai_compat.ChatChunks("chatcmpl-1", 5, n, include_usage, logprobs=True)
    raw = [data for event in events for data in shaper.feed(event)]
    assert all(d.startswith(b"data: ") and d.endswith(b"\n\n") for d in raw)
    return [json.loads(d[len(b"data: ") :]) for d in raw]


def test_sse_chunks_per_choice_read_as_openai_chunks_and_accumulate_to_the_answer() -> None:
    chunks = sse_chunks(stream_events())
    parsed_chunks = [ChatCompletionChunk.model_validate(c) for c in chunks]
    # Each choice opens with its role; choice 0's first chunk names the route.
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in parsed_chunks[:2]] == [
        (0, "assistant"),
        (1, "assistant"),
    ]
    assert "llmesh_route" in chunks[0] and "llmesh_route" not in chunks[1]
    call_deltas = [c.choices[0].delta.tool_calls for c in parsed_chunks if c.choices and c.choices[0].delta.tool_calls]
    assert [[(d.index, d.id, d.function.name) for d in deltas] for deltas in call_deltas] == [  # type: ignore[union-attr]
        [(0, "call_a", "get_weather")],
        [(1, "call_b", "get_time")],
    ]
    finishes = [
        (c.choices[0].index, c.choices[0].finish_reason)
        for c in parsed_chunks
        if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [(1, "tool_calls"), (0, "stop")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 14

    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in parsed_chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    by_index = {c.index: c for c in final.choices}
    assert by_index[0].message.content == "Hi\u00e9" and by_index[0].finish_reason == "stop"
    assert by_index[0].logprobs is not None and [t.token for t in by_index[0].logprobs.content or []] == [
        "Hi",
        "\u00e9",
    ]
    calls = by_index[1].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "get_weather", '{"city":"Paris"}'),
        ("call_b", "get_time", "{}"),
    ]
    assert by_index[1].finish_reason == "tool_calls"


def test_sse_without_include_usage_has_no_usage_chunk_and_one_role_chunk_for_one_choice() -> None:
    events = [
        GenerateEvent(route=ROUTE),
        GenerateEvent(delta="a"),
        GenerateEvent(finish_reason="stop", usage=Usage(1, 1)),
    ]
    chunks = sse_chunks(events, n=1, include_usage=False)
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": "a"}, {}]
    assert all("usage" not in c for c in chunks)
    assert chunks[1]["choices"][0]["logprobs"] == {"content": [], "refusal": None}
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)


def test_a_cache_hit_stream_carries_its_layer_on_every_chunk() -> None:
    events = [
        GenerateEvent(route=ROUTE, cache="exact"),
        GenerateEvent(delta="a", cache="exact"),
        GenerateEvent(finish_reason="stop", usage=Usage(1, 1), cache="exact"),
    ]
    assert all(c["llmesh_cache"] == "exact" for c in sse_chunks(events, n=1))


# --- the pipeline: complete() per choice, cache bypass and key, quotas for n choices ---------------------------------


class ScriptedRouter(FakeRouter):
    def __init__(self, events: list[GenerateEvent]) -> None:
        super().__init__([])
        self.events = events
        self.requests: list[ChatRequest] = []

    async def generate(
        self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
    ) -> AsyncIterator[GenerateEvent]:
        self.generated += 1
        self.requests.append(request)
        for event in self.events:
            yield event


class BudgetQuotas(FakeQuotas):
    def __init__(self) -> None:
        super().__init__()
        self.budgets: list[tuple[int, int]] = []

    async def reserve(self, principal: Principal, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        self.budgets.append((prompt_tokens, max_tokens))
        return await super().reserve(principal, request_id, prompt_tokens, max_tokens)


def chat_request(**sampling: Any) -> ChatRequest:
    output = sampling.pop("output", OutputSpec())
    return ChatRequest("auto", (ChatMessage("user", "hi"),), SamplingParams(max_tokens=10, **sampling), output=output)


def test_complete_gathers_every_choice_and_settles_the_usage_of_all() -> None:
    quotas, cache = BudgetQuotas(), FakeCache()
    router = ScriptedRouter(stream_events())
    request = chat_request(n=2, logprobs=True)
    done = asyncio.run(pipeline(router, quotas, cache).complete(PRINCIPAL, request, "r1"))
    assert done.choices == (
        ChoiceOutput(0, "Hi\u00e9", "stop", (), LOGPROBS),
        ChoiceOutput(1, "", "tool_calls", CALLS, ()),
    )
    assert (done.text, done.finish_reason, done.usage) == ("Hi\u00e9", "stop", Usage(9, 5))
    assert quotas.budgets == [(len(PREPARED.input_ids), 2 * 10)], "the reservation covers every choice"
    assert quotas.settled == [("r1", 14)], "settled with the usage of all choices"
    assert cache.calls == [], "n > 1 bypasses the response cache"


def test_a_choice_that_never_finishes_or_an_unasked_choice_is_an_internal_error() -> None:
    unfinished = [GenerateEvent(route=ROUTE), GenerateEvent(index=0, finish_reason="stop", usage=Usage(1, 1))]
    with pytest.raises(Internal, match="before the answer was complete"):
        asyncio.run(pipeline(ScriptedRouter(unfinished)).complete(PRINCIPAL, chat_request(n=2), "r1"))
    extra = [GenerateEvent(route=ROUTE), GenerateEvent(index=1, delta="x")]
    with pytest.raises(Internal, match="choice 1 of a request for 1"):
        asyncio.run(pipeline(ScriptedRouter(extra)).complete(PRINCIPAL, chat_request(), "r1"))


TOOLS = (ToolSpec("f"),)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (chat_request(), True),
        (chat_request(n=2), False),
        (chat_request(logprobs=True), False),
        (chat_request(output=OutputSpec(tools=TOOLS)), False),
        (chat_request(output=OutputSpec(tools=TOOLS, tool_choice=ToolChoice.REQUIRED)), False),
        (chat_request(output=OutputSpec(tools=TOOLS, tool_choice=ToolChoice.NONE)), True),
        (chat_request(output=OutputSpec(response_format=ResponseFormat.JSON_OBJECT)), True),
        (chat_request(presence_penalty=1.0, logit_bias=((1, 2.0),)), True),
    ],
)
def test_which_requests_the_response_cache_may_answer(request_: ChatRequest, expected: bool) -> None:
    assert cacheable(request_) is expected
    cache = FakeCache(hit=None)
    events = [GenerateEvent(route=ROUTE), GenerateEvent(delta="a")]
    events += [GenerateEvent(index=i, finish_reason="stop") for i in range(1, request_.sampling.n)]
    events.append(GenerateEvent(finish_reason="stop", usage=Usage(7, 1)))
    asyncio.run(pipeline(ScriptedRouter(events), FakeQuotas(), cache).complete(PRINCIPAL, request_, "r1"))
    assert (cache.calls == ["cache.Lookup", "cache.Store"]) is expected
    assert (cache.calls == []) is not expected


def test_a_bypassed_request_is_never_served_a_cached_answer() -> None:
    cache = FakeCache(hit=CachedAnswer(("cached",), "stop", Usage(7, 1)))
    router = ScriptedRouter(stream_events())
    done = asyncio.run(pipeline(router, FakeQuotas(), cache).complete(PRINCIPAL, chat_request(n=2), "r1"))
    assert done.cache == "" and router.generated == 1 and cache.calls == []


def test_an_answer_with_tool_calls_is_not_stored_even_when_the_request_looked_cacheable() -> None:
    cache = FakeCache()
    events = [
        GenerateEvent(route=ROUTE),
        GenerateEvent(tool_calls=CALLS[:1]),
        GenerateEvent(finish_reason="stop", usage=Usage(7, 3)),
    ]
    asyncio.run(pipeline(ScriptedRouter(events), FakeQuotas(), cache).complete(PRINCIPAL, chat_request(), "r1"))
    assert cache.stored == [None], "the single-flight waiters are released, nothing is stored"


def test_a_single_choice_reserves_max_tokens() -> None:
    quotas = BudgetQuotas()
    asyncio.run(pipeline(FakeRouter(["a"]), quotas).complete(PRINCIPAL, chat_request(), "r1"))
    assert quotas.budgets == [(len(PREPARED.input_ids), 10)]
    assert quotas.settled == [("r1", len(PREPARED.input_ids) + 1)]


KEY_BASE = chat_request()
KEY_VARIANTS = {
    "max_tokens": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, max_tokens=11)),
    "temperature": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, temperature=0.5)),
    "top_p": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, top_p=0.5)),
    "seed": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, seed=1)),
    "stop": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, stop=("x",))),
    "presence_penalty": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, presence_penalty=0.5)),
    "frequency_penalty": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, frequency_penalty=0.5)),
    "repetition_penalty": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, repetition_penalty=1.3)),
    "logit_bias": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, logit_bias=((5, 10.0),))),
    "logprobs": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, logprobs=True)),
    "top_logprobs": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, logprobs=True, top_logprobs=2)),
    "n": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, n=2)),
    "stop_token_ids": replace(KEY_BASE, sampling=replace(KEY_BASE.sampling, stop_token_ids=(3,))),
    "tools": replace(KEY_BASE, output=OutputSpec(tools=TOOLS, tool_choice=ToolChoice.NONE)),
    "tool_schema": replace(
        KEY_BASE, output=OutputSpec(tools=(ToolSpec("f", "", '{"type":"object"}'),), tool_choice=ToolChoice.NONE)
    ),
    "parallel_tool_calls": replace(KEY_BASE, output=OutputSpec(parallel_tool_calls=False)),
    "response_format": replace(KEY_BASE, output=OutputSpec(response_format=ResponseFormat.JSON_OBJECT)),
    "json_schema": replace(
        KEY_BASE,
        output=OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema="{}", json_schema_name="a"),
    ),
    "json_schema_name": replace(
        KEY_BASE,
        output=OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema="{}", json_schema_name="b"),
    ),
    "prompt": replace(KEY_BASE, messages=(), prompt="Once upon"),
    "tool_turns": replace(
        KEY_BASE,
        messages=(ChatMessage("assistant", "", CALLS[:1]), ChatMessage("tool", "sunny", (), "call_a")),
    ),
}


def test_the_cache_key_changes_with_every_field_that_changes_the_answer() -> None:
    base = GrpcCacheClient._key(PRINCIPAL, ROUTE, KEY_BASE).SerializeToString(deterministic=True)
    assert base == GrpcCacheClient._key(PRINCIPAL, ROUTE, chat_request()).SerializeToString(deterministic=True)
    keys = {
        name: GrpcCacheClient._key(PRINCIPAL, ROUTE, request).SerializeToString(deterministic=True)
        for name, request in KEY_VARIANTS.items()
    }
    assert all(key != base for key in keys.values()), [name for name, key in keys.items() if key == base]
    assert len(set(keys.values())) == len(keys), "every variation is a key of its own"


# --- the server: the gRPC messages and the OpenAI body of one answer ------------------------------------------------


class Metadatum:
    def __init__(self, key: str, value: str) -> None:
        self.key, self.value = key, value


class Context:
    def __init__(self) -> None:
        self.initial: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> list[Metadatum]:
        return [Metadatum("authorization", "Bearer k"), Metadatum("x-request-id", "req-1")]

    async def send_initial_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.initial = metadata

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


class ServedPipeline:
    """The real ChatPipeline behind a fixed principal."""

    def __init__(self, events: list[GenerateEvent]) -> None:
        self.inner = pipeline(ScriptedRouter(events), FakeQuotas())
        self.validate = self.inner.validate
        self.complete = self.inner.complete
        self.stream = self.inner.stream

    async def authenticate(self, authorization: str | None) -> Principal:
        return PRINCIPAL


def servicer(events: list[GenerateEvent]) -> ChatServicer:
    return ChatServicer(ServedPipeline(events), LIMITS)  # type: ignore[arg-type]


def test_grpc_completion_has_every_choice_and_choice_0_in_its_flat_fields() -> None:
    request = grpc_request(n=2, logprobs=True)
    reply: chat_pb2.ChatCompletion = asyncio.run(servicer(stream_events()).CreateChatCompletion(request, Context()))  # type: ignore[arg-type]
    assert (reply.text, reply.finish_reason) == ("Hi\u00e9", "stop")
    assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == [
        (0, "Hi\u00e9", "stop"),
        (1, "", "tool_calls"),
    ]
    assert [(t.id, t.name, t.arguments) for t in reply.choices[1].tool_calls] == [
        (c.id, c.name, c.arguments) for c in CALLS
    ]
    assert [lp.token for lp in reply.choices[0].logprobs] == ["Hi", "\u00e9"]
    assert reply.choices[0].logprobs[0].top_logprobs[1].token == "Hello"


def test_grpc_stream_chunks_carry_index_tool_calls_and_logprobs() -> None:
    async def read() -> list[chat_pb2.ChatCompletionChunk]:
        stream = servicer(stream_events()).StreamChatCompletion(grpc_request(n=2, logprobs=True), Context())  # type: ignore[arg-type]
        return [chunk async for chunk in stream]

    chunks = asyncio.run(read())
    assert [c.index for c in chunks] == [0, 0, 1, 0, 1, 0]
    assert [t.name for c in chunks for t in c.tool_calls] == ["get_weather", "get_time"]
    assert [lp.token for c in chunks if c.index == 0 for lp in c.logprobs] == ["Hi", "\u00e9"]
    assert chunks[-1].usage.total_tokens == 14 and chunks[4].finish_reason == "tool_calls"


def openai_call(payload: dict[str, Any], events: list[GenerateEvent]) -> list[Any]:
    async def read() -> list[Any]:
        request = chat_pb2.OpenAIHttpRequest()
        request.body.data = body(**payload)
        return [b async for b in servicer(events).OpenAIChatCompletions(request, Context())]  # type: ignore[arg-type]

    return asyncio.run(read())


def test_openai_route_answers_n_choices_with_tool_calls_and_logprobs() -> None:
    bodies = openai_call({"messages": HI, "n": 2, "logprobs": True, "top_logprobs": 1}, stream_events())
    assert len(bodies) == 1 and bodies[0].content_type == "application/json"
    completion = ChatCompletion.model_validate(json.loads(bodies[0].data))
    assert [c.finish_reason for c in completion.choices] == ["stop", "tool_calls"]
    assert completion.choices[1].message.tool_calls is not None and completion.choices[1].message.content is None


def test_openai_route_streams_sse_per_choice_ending_with_done() -> None:
    payload = {"messages": HI, "n": 2, "logprobs": True, "stream": True, "stream_options": {"include_usage": True}}
    bodies = openai_call(payload, stream_events())
    assert bodies[0].content_type == "text/event-stream" and bodies[-1].data == openai_compat.SSE_DONE
    chunks = [ChatCompletionChunk.model_validate_json(b.data[len(b"data: ") :]) for b in bodies[:-1]]
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


# --- the router client: the output spec and raw prompt go out, choices, logprobs and tool calls come back -------------


class FakeGenerateCall:
    def __init__(self, chunks: list[router_pb2.GenerateChunk]) -> None:
        self.chunks = list(chunks)

    async def read(self) -> Any:
        return self.chunks.pop(0) if self.chunks else grpc.aio.EOF

    def cancel(self) -> None:
        pass


class FakeRouterStub:
    def __init__(self, chunks: list[router_pb2.GenerateChunk]) -> None:
        self.chunks = chunks
        self.prepares: list[router_pb2.PrepareRequest] = []
        self.generates: list[router_pb2.GenerateRequest] = []

    async def Prepare(self, message: router_pb2.PrepareRequest, timeout: float) -> router_pb2.PrepareResponse:
        self.prepares.append(message)
        return router_pb2.PrepareResponse(prepared=prepared_to_pb(PREPARED), context_length=2048)

    def Generate(self, message: router_pb2.GenerateRequest, timeout: float) -> FakeGenerateCall:
        self.generates.append(message)
        return FakeGenerateCall(self.chunks)


def test_the_router_client_sends_the_output_spec_and_prompt_and_reads_choices_back() -> None:
    output = OutputSpec(tools=(ToolSpec("get_weather", "", WEATHER_SCHEMA),), tool_choice=ToolChoice.REQUIRED)
    request = replace(chat_request(n=2, logprobs=True, top_logprobs=1), output=output)
    raw = replace(chat_request(), messages=(), prompt="Once upon")
    chunks = [
        router_pb2.GenerateChunk(route=route_to_pb(ROUTE)),
        router_pb2.GenerateChunk(delta="Hi", index=0, logprobs=logprobs_to_pb(LOGPROBS[:1])),
        router_pb2.GenerateChunk(index=1, tool_calls=tool_calls_to_pb(CALLS[:1]), finish_reason="tool_calls"),
        router_pb2.GenerateChunk(index=0, finish_reason="stop", usage=usage_to_pb(Usage(9, 3))),
    ]
    stub = FakeRouterStub(chunks)

    async def scenario() -> list[GenerateEvent]:
        client = GrpcRouterClient("127.0.0.1:1")
        client._stub = stub  # type: ignore[assignment]
        try:
            await client.prepare(Tier.FREE, request)
            await client.prepare(Tier.FREE, raw)
            return [e async for e in client.generate("r1", Tier.FREE, request, PREPARED)]
        finally:
            await client.close()

    events = asyncio.run(scenario())
    assert output_from_pb(stub.prepares[0].output) == output and stub.prepares[0].sampling.n == 2
    assert stub.prepares[1].prompt == "Once upon" and not stub.prepares[1].messages
    sent = stub.generates[0]
    assert output_from_pb(sent.output) == output and sent.sampling.logprobs and sent.sampling.top_logprobs == 1
    assert events[1] == GenerateEvent(delta="Hi", index=0, logprobs=LOGPROBS[:1])
    assert events[2] == GenerateEvent(index=1, tool_calls=CALLS[:1], finish_reason="tool_calls")
    assert events[3].usage == Usage(9, 3) and events[3].index == 0


def test_an_answer_cut_short_is_charged_one_token_per_logprob_or_per_delta_and_call() -> None:
    class Failing(ScriptedRouter):
        async def generate(
            self, request_id: str, tier: Tier, request: ChatRequest, prepared: PreparedPrompt | None = None
        ) -> AsyncIterator[GenerateEvent]:
            async for event in super().generate(request_id, tier, request, prepared):
                yield event
            raise ConnectionError("replica died")

    three_tokens = LOGPROBS + LOGPROBS[:1]
    events = [
        GenerateEvent(route=ROUTE),
        GenerateEvent(delta="abc", logprobs=three_tokens),
        GenerateEvent(index=1, tool_calls=CALLS[:1]),
        GenerateEvent(index=1, delta="x"),
    ]
    quotas = FakeQuotas()
    with pytest.raises(ConnectionError):
        asyncio.run(pipeline(Failing(events), quotas).complete(PRINCIPAL, chat_request(n=2, logprobs=True), "r1"))
    assert quotas.settled == [("r1", len(PREPARED.input_ids) + 3 + 1 + 1)]
