"""The grammar texts the router sends the engine, for each tool choice and response format; compiled with the
engine's GrammarCompiler against the real Qwen2.5 tokenizer when a built model is present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmesh import paths
from llmesh.errors import InvalidRequest
from llmesh.model_artifact import METADATA_FILE, TOKENIZER_FILE, ChatTokenizer, ModelMetadata
from llmesh.types import OutputSpec, ResponseFormat, ToolChoice, ToolSpec
from router.constraints import check_output, grammar_for
from router.tools import ToolCallParser

WEATHER = ToolSpec(
    "get_weather",
    "Current weather",
    json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        }
    ),
)
TIME = ToolSpec("get_time", "Time now", "")
QWEN_TAGS = frozenset({"<tool_call>", "</tool_call>"})


def test_free_text_and_auto_tools_are_unconstrained() -> None:
    assert grammar_for(OutputSpec()) == ""
    assert grammar_for(OutputSpec(tools=(WEATHER,))) == ""
    assert grammar_for(OutputSpec(tools=(WEATHER,), tool_choice=ToolChoice.NONE)) == ""


def test_json_formats() -> None:
    assert json.loads(grammar_for(OutputSpec(response_format=ResponseFormat.JSON_OBJECT))) == {"json_object": True}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    output = OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema=json.dumps(schema))
    assert json.loads(grammar_for(output)) == {"json_schema": schema}


def _lark(output: OutputSpec, tags: frozenset[str] = QWEN_TAGS) -> str:
    spec = json.loads(grammar_for(output, tags))
    assert list(spec) == ["lark"]
    return str(spec["lark"])


def test_required_is_one_or_more_calls_of_any_tool() -> None:
    lark = _lark(OutputSpec(tools=(WEATHER, TIME), tool_choice=ToolChoice.REQUIRED))
    assert lark.splitlines()[:2] == ['start: call ("\\n" call)*', "call: call_0 | call_1"]
    # Tags that are single tokens are named unquoted; the function name is fixed text.
    head = '"\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": "'
    assert f'call_0: <tool_call> {head} args_0 "}}\\n" </tool_call>' in lark
    args = json.loads(next(line for line in lark.splitlines() if line.startswith("args_0: %json ")).split(" ", 2)[2])
    assert args["required"] == ["city", "days"] and args["x-guidance"]["item_separator"] == ", "
    assert "args_1: %json " in lark  # get_time: any object


def test_required_without_parallel_calls_is_exactly_one_call() -> None:
    lark = _lark(OutputSpec(tools=(WEATHER, TIME), tool_choice=ToolChoice.REQUIRED, parallel_tool_calls=False))
    assert lark.splitlines()[0] == "start: call"


def test_a_named_function_is_exactly_one_call_of_it() -> None:
    lark = _lark(OutputSpec(tools=(WEATHER, TIME), tool_choice=ToolChoice.FUNCTION, tool_choice_function="get_time"))
    assert lark.splitlines()[:2] == ["start: call", "call: call_0"]
    assert "get_time" in lark and "get_weather" not in lark


def test_tags_that_are_not_tokens_are_quoted() -> None:
    lark = _lark(OutputSpec(tools=(TIME,), tool_choice=ToolChoice.REQUIRED), frozenset())
    assert 'call_0: "<tool_call>" ' in lark and ' "</tool_call>"' in lark


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            OutputSpec(tools=(WEATHER,), tool_choice=ToolChoice.REQUIRED, response_format=ResponseFormat.JSON_OBJECT),
            "cannot be combined",
        ),
        (OutputSpec(response_format=ResponseFormat.JSON_SCHEMA), "needs a schema"),
        (OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema="{oops"), "not valid JSON"),
        (OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema="[1]"), "JSON Schema"),
    ],
)
def test_impossible_formats_are_refused(output: OutputSpec, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_output(output)


# --- compiled by the engine's compiler, walked with real tokens -----------------------------------------------------


def _qwen_dir() -> Path:
    root = paths.cache_dir()
    if root.is_dir():
        for meta in sorted(root.rglob(METADATA_FILE)):
            if (meta.parent / TOKENIZER_FILE).is_file() and ModelMetadata.load(meta.parent).vocab_size == 151936:
                return meta.parent
    pytest.skip("no built Qwen2.5 model under the llmesh cache (run `llmesh build`)")


@pytest.fixture(scope="module")
def qwen() -> tuple[Any, ChatTokenizer]:
    version_dir = _qwen_dir()
    try:
        from triton_models.engine.grammar import GrammarCompiler
    except ImportError as exc:
        pytest.skip(f"the engine's grammar module is not available: {exc}")
    return GrammarCompiler.from_model_dir(version_dir), ChatTokenizer.from_model_dir(version_dir)


def _accepts(compiler: Any, grammar: str, ids: list[int]) -> bool:
    from triton_models.engine.grammar import GrammarError

    constraint = compiler.constraint(grammar)
    try:
        for token_id in ids:
            constraint.advance(token_id)
    except GrammarError:
        return False
    return bool(constraint.is_accepting())


def _call(name: str, arguments: dict[str, Any]) -> str:
    # What Qwen2.5's template shows the model (json.dumps spacing).
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def test_tool_call_grammars_compile_and_accept_the_template_format(qwen: tuple[Any, ChatTokenizer]) -> None:
    compiler, tokenizer = qwen
    tags = tokenizer.added_tokens
    required = grammar_for(OutputSpec(tools=(WEATHER, TIME), tool_choice=ToolChoice.REQUIRED), tags)
    one = grammar_for(
        OutputSpec(tools=(WEATHER, TIME), tool_choice=ToolChoice.REQUIRED, parallel_tool_calls=False), tags
    )
    named = grammar_for(
        OutputSpec(tools=(WEATHER, TIME), tool_choice=ToolChoice.FUNCTION, tool_choice_function="get_time"), tags
    )
    weather = _call("get_weather", {"city": "Paris", "days": 3})
    time = _call("get_time", {})
    both = weather + "\n" + time

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text)

    assert _accepts(compiler, required, ids(weather)) and _accepts(compiler, required, ids(both))
    assert _accepts(compiler, one, ids(weather)) and not _accepts(compiler, one, ids(both))
    assert _accepts(compiler, named, ids(time)) and not _accepts(compiler, named, ids(weather))
    # The parameters schema holds: a missing required argument or a wrong type is refused.
    assert not _accepts(compiler, required, ids(_call("get_weather", {"city": "Paris"})))
    assert not _accepts(compiler, required, ids(_call("get_weather", {"city": "Paris", "days": "3"})))
    assert not _accepts(compiler, required, ids(_call("get_news", {})))
    assert not _accepts(compiler, required, ids("Sure! " + weather))
    # What the grammar lets through, the router's parser turns into calls.
    parser = ToolCallParser(["get_weather", "get_time"])
    segments = parser.feed(tokenizer.decode(ids(both))) + parser.flush()
    assert [s.call.name for s in segments if s.call] == ["get_weather", "get_time"]
    assert "".join(s.text for s in segments) == ""


def test_json_grammars_compile(qwen: tuple[Any, ChatTokenizer]) -> None:
    compiler, tokenizer = qwen
    json_object = grammar_for(OutputSpec(response_format=ResponseFormat.JSON_OBJECT))
    assert _accepts(compiler, json_object, tokenizer.encode('{"a": 1}'))
    assert not _accepts(compiler, json_object, tokenizer.encode("[1]"))
    schema = grammar_for(OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema=WEATHER.parameters_json))
    assert _accepts(compiler, schema, tokenizer.encode('{"city": "Rome", "days": 2}'))
    assert not _accepts(compiler, schema, tokenizer.encode('{"city": "Rome"}'))


CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "where": {"type": "object", "properties": {"country": {"type": "string"}}},
        "tags": {"type": "array", "items": {"type": "object", "properties": {"t": {"type": "string"}}}},
        "extra": {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True},
    },
    "required": ["name"],
}


def test_strict_schemas_close_their_objects_and_others_stay_open() -> None:
    strict = OutputSpec(
        response_format=ResponseFormat.JSON_SCHEMA, json_schema=json.dumps(CITY), json_schema_strict=True
    )
    schema = json.loads(grammar_for(strict))["json_schema"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["where"]["additionalProperties"] is False
    assert schema["properties"]["tags"]["items"]["additionalProperties"] is False
    assert schema["properties"]["extra"]["additionalProperties"] is True  # the caller's explicit choice stays
    loose = OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema=json.dumps(CITY))
    assert json.loads(grammar_for(loose))["json_schema"] == CITY
    tool = ToolSpec("f", "", json.dumps(CITY), strict=True)
    lark = json.loads(grammar_for(OutputSpec(tools=(tool,), tool_choice=ToolChoice.REQUIRED)))["lark"]
    assert '"additionalProperties": false' in lark


def test_a_strict_schema_refuses_properties_it_does_not_list(qwen: tuple[Any, ChatTokenizer]) -> None:
    compiler, tokenizer = qwen
    strict = OutputSpec(
        response_format=ResponseFormat.JSON_SCHEMA, json_schema=json.dumps(CITY), json_schema_strict=True
    )
    loose = OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema=json.dumps(CITY))
    answer = tokenizer.encode('{"name": "Paris", "climate": "mild"}')
    assert _accepts(compiler, grammar_for(loose), answer)
    assert not _accepts(compiler, grammar_for(strict), answer)
    assert _accepts(compiler, grammar_for(strict), tokenizer.encode('{"name": "Paris"}'))
