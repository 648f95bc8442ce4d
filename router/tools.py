"""Tool calls: the chat template's view of tools and tool turns, and parsing the calls out of streamed output.

The format is Hermes-style, as Qwen2.5's template teaches it: each call is
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. Parsing works on text, so it does not matter whether
the tags arrive as their own tokens (Qwen2.5's added `<tool_call>`, which the detokenizer keeps) or spelled out.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmesh.errors import InvalidRequest
from llmesh.types import ChatMessage, OutputSpec, ToolCall, ToolChoice, ToolSpec

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_schema(text: str, what: str) -> dict[str, Any]:
    """A JSON Schema given as JSON text ("" = any object); InvalidRequest naming `what` when it is not one."""
    if not text:
        return {"type": "object"}
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{what} must be a JSON object (a JSON Schema)")
    return schema


def template_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """Tools as chat templates expect them (OpenAI's shape), parameters parsed."""
    rendered = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = parse_schema(tool.parameters_json, f"tool {tool.name!r} parameters")
        rendered.append({"type": "function", "function": function})
    return rendered


def _arguments_value(arguments: str) -> Any:
    """A past call's arguments for the template: parsed (Qwen2.5's template applies tojson to them), or the text
    as it is when it is not JSON (the caller's history, rendered rather than refused)."""
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return arguments


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: role and content, plus tool calls and tool-turn fields when set."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": _arguments_value(call.arguments)},
                }
                for call in message.tool_calls
            ]
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.name:
            item["name"] = message.name
        rendered.append(item)
    return rendered


def offers_tools(output: OutputSpec) -> bool:
    """Tools are rendered into the prompt and parsed from the answer (tool_choice "none" does neither)."""
    return bool(output.tools) and output.tool_choice is not ToolChoice.NONE


def check_tools(output: OutputSpec) -> None:
    """Refuse tool settings that cannot be honoured, whatever the variant."""
    names = [tool.name for tool in output.tools]
    if any(not name for name in names):
        raise InvalidRequest("every tool needs a function name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidRequest(f"tool names must be unique; repeated: {', '.join(duplicates)}")
    if output.tool_choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION) and not output.tools:
        raise InvalidRequest(f"tool_choice {output.tool_choice.value!r} needs tools")
    if output.tool_choice is ToolChoice.FUNCTION and output.tool_choice_function not in names:
        raise InvalidRequest(
            f"tool_choice names function {output.tool_choice_function!r}, which is not among the tools"
        )
    for tool in output.tools:
        parse_schema(tool.parameters_json, f"tool {tool.name!r} parameters")


@dataclass(frozen=True)
class Segment:
    """A stretch [start, end) of the parser's input: `text` to show (may be "" when withheld), or a `call`."""

    start: int
    end: int
    text: str = ""
    call: ToolCall | None = None


def _longest_tag_prefix_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (a tag may be arriving)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ToolCallParser:
    """One choice's output split into visible text and tool calls, as it streams.

    Text inside `<tool_call>...</tool_call>` never shows; a block that holds a call of a known tool (a JSON object
    with a "name" among `tool_names` and object "arguments") becomes a ToolCall, any other block stays text.
    Whitespace next to calls (the newlines between them) is withheld; with `forced`, all text is. Offsets are in the
    input's characters, so the caller can tell which tokens ended up where.
    """

    def __init__(self, tool_names: Sequence[str], forced: bool = False) -> None:
        self._names = frozenset(tool_names)
        # Small models often answer a tool request with the call's JSON alone, without the tags (Qwen2.5-Coder-0.5B
        # nearly always does: a bare or ```json-fenced {"name": ..., "arguments": ...}). An answer that opens like
        # that is held back whole; at its end it becomes calls when all of it is calls of offered tools, else text.
        self._bare: str | None = None  # the held answer, while it may be bare calls
        self._opened = False  # the answer's opening is decided (bare calls or not)
        self._opening = ""  # its first characters until then
        # Calls forced by a grammar (tool_choice "required" or a function): the answer has no text, so what is not
        # a complete call (a block cut short by max_tokens) is withheld too.
        self._forced = forced
        self._buffer = ""  # undecided input, starting at offset self._start
        self._start = 0
        self._inside = False  # the buffer starts with OPEN_TAG
        self._spaces = ""  # whitespace held back after text or a call (dropped if a call follows)
        self._spaces_start = 0
        self.calls_made = 0

    def feed(self, text: str) -> list[Segment]:
        if self._bare is not None:
            self._bare += text
            return []
        if not self._opened and not self._forced:
            self._opening += text
            head = self._opening.lstrip()
            if not head or (len(head) < 3 and "```".startswith(head)):
                return []  # not decided yet
            self._opened = True
            text, self._opening = self._opening, ""
            if head.startswith(("{", "[", "```")):
                self._bare = text
                return []
        self._buffer += text
        out: list[Segment] = []
        while True:
            if self._inside:
                close = self._buffer.find(CLOSE_TAG)
                if close < 0:
                    return out
                block_end = close + len(CLOSE_TAG)
                block = self._buffer[:block_end]
                call = self._parse(block[len(OPEN_TAG) : close])
                if call is not None:
                    # The whitespace before a call is dropped with it.
                    start = self._spaces_start if self._spaces else self._start
                    out.append(Segment(start, self._start + block_end, call=call))
                    self._spaces = ""
                    self.calls_made += 1
                else:
                    out.extend(self._visible(block, self._start))
                self._advance(block_end)
                self._inside = False
                self._spaces_start = self._start
                continue
            begin = self._buffer.find(OPEN_TAG)
            if begin >= 0:
                out.extend(self._visible(self._buffer[:begin], self._start))
                self._advance(begin)
                self._inside = True
                continue
            keep = _longest_tag_prefix_suffix(self._buffer, OPEN_TAG)
            cut = len(self._buffer) - keep
            out.extend(self._visible(self._buffer[:cut], self._start))
            self._advance(cut)
            return out

    def flush(self) -> list[Segment]:
        """The end of the choice: an unfinished block is text; whitespace after the last call is dropped."""
        if not self._opened and self._opening:
            self._opened = True
            opening, self._opening = self._opening, ""
            return [*self.feed(opening), *self.flush()]
        if self._bare is not None:
            held, self._bare = self._bare, None
            calls = self._bare_calls(held)
            if calls:
                start, self._start = self._start, self._start + len(held)
                self.calls_made += len(calls)
                # The first call spans the whole answer (its tokens' logprobs are withheld with it).
                return [Segment(start, self._start, call=calls[0])] + [
                    Segment(self._start, self._start, call=call) for call in calls[1:]
                ]
            return [*self.feed(held), *self.flush()]
        out = self._visible(self._buffer, self._start)
        self._advance(len(self._buffer))
        self._inside = False
        if self._spaces:
            out.append(Segment(self._spaces_start, self._start, text="" if self.calls_made else self._spaces))
            self._spaces = ""
        return out

    def _advance(self, length: int) -> None:
        self._buffer = self._buffer[length:]
        self._start += length

    def _visible(self, text: str, start: int) -> list[Segment]:
        """Text to show, with trailing whitespace held back (it is dropped if a call comes next)."""
        if not text:
            return []
        if self._forced:
            return [Segment(start, start + len(text))]
        stripped = text.rstrip()
        if not stripped:
            if not self._spaces:
                self._spaces_start = start
            self._spaces += text
            return []
        out: list[Segment] = []
        head = self._spaces + stripped
        out.append(Segment(self._spaces_start if self._spaces else start, start + len(stripped), text=head))
        self._spaces = text[len(stripped) :]
        self._spaces_start = start + len(stripped)
        return out

    def _bare_calls(self, answer: str) -> list[ToolCall]:
        """The calls a whole answer holds when it is nothing but calls of offered tools: one call object, a list of
        them, or either in one ``` fence (with or without a language); else none."""
        body = answer.strip()
        if body.startswith("```"):
            if not body.endswith("```") or len(body) < 6:
                return []
            body = body[3:-3]
            first_line, _, rest = body.partition("\n")
            body = rest if first_line.strip().isalpha() or not first_line.strip() else body
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return []
        items = value if isinstance(value, list) else [value]
        calls = [self._parse(json.dumps(item)) for item in items]
        if not items or any(call is None for call in calls):
            return []
        return [call for call in calls if call is not None]

    def _parse(self, inner: str) -> ToolCall | None:
        try:
            value = json.loads(inner)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, Mapping):
            return None
        name, arguments = value.get("name"), value.get("arguments", {})
        if isinstance(arguments, str):
            # Some models write the arguments as a JSON string; accept it when it holds an object.
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(name, str) or name not in self._names or not isinstance(arguments, Mapping):
            return None
        return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))
