"""The grammar text that constrains decoding, built from a request's OutputSpec.

The engine (triton_models.engine.grammar) takes a JSON object text with exactly one of
  {"json_object": true}            response_format json_object
  {"json_schema": {...}}           response_format json_schema
  {"lark": "..."}                  tool_choice "required" or a named function: one or more tool calls
and compiles it with llguidance for the variant's tokenizer; a schema it cannot honour comes back as an
"invalid request: ..." error. Free text and tool_choice "auto" are not constrained.

Tool calls are constrained to the exact text Qwen2.5's template shows the model: `<tool_call>` then
`\n{"name": "<name>", "arguments": <arguments>}\n` then `</tool_call>`, the arguments being JSON that follows the
function's parameters schema, written with json.dumps' separators (", " and ": ", as the template's tojson renders
past calls). Tags that are a single added token in the variant's vocabulary are named as that token (unquoted):
llguidance refuses such a token when a quoted string spells it.
"""

from __future__ import annotations

import json
from collections.abc import Set
from typing import Any

from llmesh.errors import InvalidRequest
from llmesh.types import OutputSpec, ResponseFormat, ToolChoice, ToolSpec
from router.tools import CLOSE_TAG, OPEN_TAG, parse_schema

# The arguments' JSON, spaced as the chat template renders a past call's arguments.
_ARGUMENT_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def check_output(output: OutputSpec) -> None:
    """Refuse format settings that cannot be honoured together (tools are checked in router.tools)."""
    forced_tools = output.tools and output.tool_choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION)
    if forced_tools and output.response_format is not ResponseFormat.TEXT:
        raise InvalidRequest(
            f"response_format {output.response_format.value!r} cannot be combined with tool_choice "
            f"{output.tool_choice.value!r}: the answer cannot be both a JSON document and tool calls"
        )
    if output.response_format is ResponseFormat.JSON_SCHEMA:
        if not output.json_schema:
            raise InvalidRequest("response_format json_schema needs a schema")
        _json_schema(output)


def _json_schema(output: OutputSpec) -> Any:
    try:
        schema = json.loads(output.json_schema)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"response_format json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest("response_format json_schema must be a JSON Schema (an object)")
    return closed_objects(schema) if output.json_schema_strict else schema


def closed_objects(schema: Any) -> Any:
    """OpenAI's strict mode: objects have exactly the properties the schema lists. OpenAI refuses a strict schema
    whose objects leave `additionalProperties` out; llmesh closes them instead (an explicit value is kept). Without
    it a model may keep adding properties of its own until max_tokens (the 1.5B did, for a pydantic model)."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _lark_string(text: str) -> str:
    # A Lark string literal: JSON's escapes are Lark's.
    return json.dumps(text, ensure_ascii=False)


def _tag(tag: str, added_tokens: Set[str]) -> str:
    return tag if tag in added_tokens else _lark_string(tag)


def tool_call_lark(tools: tuple[ToolSpec, ...], one_call: bool, added_tokens: Set[str]) -> str:
    """A Lark grammar for tool calls of `tools`: one call, or one or more separated by newlines."""
    lines = ["start: call" if one_call else 'start: call ("\\n" call)*']
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    open_tag, close_tag = _tag(OPEN_TAG, added_tokens), _tag(CLOSE_TAG, added_tokens)
    for i, tool in enumerate(tools):
        head = '\n{"name": ' + json.dumps(tool.name, ensure_ascii=False) + ', "arguments": '
        schema = parse_schema(tool.parameters_json, f"tool {tool.name!r} parameters")
        if tool.strict:
            schema = closed_objects(schema)
        # Ours last: the caller's schema does not choose the whitespace or leniency.
        body = {**schema, "x-guidance": _ARGUMENT_STYLE}
        lines.append(f"call_{i}: {open_tag} {_lark_string(head)} args_{i} {_lark_string('}' + chr(10))} {close_tag}")
        lines.append(f"args_{i}: %json {json.dumps(body, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def grammar_for(output: OutputSpec, added_tokens: Set[str] = frozenset()) -> str:
    """The engine's grammar text for `output` ("" = unconstrained). `added_tokens`: the variant's added tokens'
    texts (tool-call tags that are single tokens are named as tokens). Call check_output first."""
    if output.tools and output.tool_choice is ToolChoice.FUNCTION:
        tool = next(t for t in output.tools if t.name == output.tool_choice_function)
        return json.dumps({"lark": tool_call_lark((tool,), True, added_tokens)}, ensure_ascii=False)
    if output.tools and output.tool_choice is ToolChoice.REQUIRED:
        lark = tool_call_lark(output.tools, not output.parallel_tool_calls, added_tokens)
        return json.dumps({"lark": lark}, ensure_ascii=False)
    if output.response_format is ResponseFormat.JSON_OBJECT:
        return json.dumps({"json_object": True})
    if output.response_format is ResponseFormat.JSON_SCHEMA:
        return json.dumps({"json_schema": _json_schema(output)}, ensure_ascii=False)
    return ""
