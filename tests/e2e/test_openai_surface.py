"""OpenAI's chat surface end to end through Envoy with the real openai SDK, plain and streaming: JSON mode, JSON
schema (strict), every tool_choice, multi-turn tool use, logprobs, penalties, logit_bias, seed, n, stop strings and
stop token ids, a 400 naming each unsupported parameter, and the typed gRPC API with the same features.

A tritonserver of its own serves Qwen2.5-Coder-0.5B (its chat template has a tool format) and SmolLM2-135M int8 (no
tool format). The mesh in front of it runs without the response cache: seeded and greedy answers here must come from
the engine each time (a cache hit would make the seed and penalty comparisons pass trivially). Most requests pin the
Qwen 0.5B with a paid key (the paid tier's default, and a paid key may pin any served variant), greedy where the test
allows and with few tokens: the suite runs on two CPU cores.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from control.process import http_ok_probe
from llmesh.model_artifact import ChatTokenizer
from llmesh.types import Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.fixtures.mesh import RunningMesh, run_mesh
from tests.fixtures.triton import TRITON_START_TIMEOUT_S, TritonServer, run_tritonserver
from triton_models.config import BuildSettings
from triton_models.repository import ensure_model_repository

pytestmark = pytest.mark.slow

QWEN, SMOL = "qwen2.5-coder-0.5b", "smollm2-135m-int8"


@pytest.fixture(scope="module")
def surface_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    settings = BuildSettings(variants=(QWEN, SMOL))
    repository = ensure_model_repository(settings)
    for server in run_tritonserver(repository, settings, tmp_path_factory.mktemp("surface-triton")):
        server.process.wait_ready(
            http_ok_probe(f"{server.http_url}/v2/models/{SMOL}/ready"), timeout=TRITON_START_TIMEOUT_S
        )
        yield server


@pytest.fixture(scope="module")
def surface_mesh(
    surface_triton: TritonServer, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningMesh]:
    yield from run_mesh(surface_triton, redis_url, tmp_path_factory, "surface-mesh", cache_enabled=False)


@pytest.fixture(scope="module")
def paid_surface_key(surface_mesh: RunningMesh) -> str:
    return surface_mesh.create_key(Tier.PAID)


@pytest.fixture(scope="module")
def client(surface_mesh: RunningMesh, paid_surface_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{surface_mesh.http_base}/v1", api_key=paid_surface_key, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def qwen_tokenizer(surface_triton: TritonServer) -> ChatTokenizer:
    return ChatTokenizer.from_model_dir(Path(surface_triton.model_repository) / QWEN / "1")


@pytest.fixture(scope="module")
def qwen_token_ids(qwen_tokenizer: ChatTokenizer) -> dict[bytes, int]:
    """Each token's exact bytes -> its id in the Qwen vocabulary (the first id, for the rare duplicate)."""
    ids: dict[bytes, int] = {}
    for token_id in range(qwen_tokenizer.vocab_size):
        spelled = qwen_tokenizer.token_bytes(token_id)
        if spelled:
            ids.setdefault(spelled, token_id)
    return ids


# ---- one request, plain or streamed, read back into the same shape ----


@dataclass
class Answer:
    """One choice of an answer, the same whether it came whole or as a stream of chunks."""

    text: str = ""
    finish_reason: str | None = None
    # Tool calls as (id, name, arguments text), in index order.
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    # Each generated token as (token, logprob, [(alternative, logprob), ...]).
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None
    finish_reasons_seen: int = 0


@dataclass
class Reply:
    choices: dict[int, Answer]
    completion_tokens: int | None
    model: str

    @property
    def only(self) -> Answer:
        assert set(self.choices) == {0}, self.choices
        return self.choices[0]


def _logprob_entries(content: Any) -> list[tuple[str, float, list[tuple[str, float]]]]:
    return [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in content or []]


def ask(client: openai.OpenAI, *, stream: bool = False, model: str = QWEN, **params: Any) -> Reply:
    """A chat completion with `params` (the SDK's keyword arguments), plain or streamed (with usage asked for)."""
    params.setdefault("temperature", 0)
    if not stream:
        completion = client.chat.completions.create(model=model, **params)
        choices = {}
        for choice in completion.choices:
            made = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]  # type: ignore[union-attr]
            logprobs = _logprob_entries(choice.logprobs.content) if choice.logprobs is not None else None
            choices[choice.index] = Answer(
                choice.message.content or "", choice.finish_reason, made, logprobs, finish_reasons_seen=1
            )
        usage = completion.usage.completion_tokens if completion.usage else None
        return Reply(choices, usage, completion.model)
    chunks = client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True}, **params)
    answers: dict[int, Answer] = {}
    # index of a choice -> index of a tool call -> [id, name, arguments so far]
    calls: dict[int, dict[int, list[str]]] = {}
    completion_tokens = None
    models = set()
    for chunk in chunks:
        models.add(chunk.model)
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            answer = answers.setdefault(choice.index, Answer())
            answer.text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(choice.index, {}).setdefault(delta.index, ["", "", ""])
                call[0] += delta.id or ""
                if delta.function is not None:
                    call[1] += delta.function.name or ""
                    call[2] += delta.function.arguments or ""
            if choice.logprobs is not None and choice.logprobs.content is not None:
                answer.logprobs = (answer.logprobs or []) + _logprob_entries(choice.logprobs.content)
            if choice.finish_reason is not None:
                answer.finish_reason = choice.finish_reason
                answer.finish_reasons_seen += 1
    for index, by_position in calls.items():
        answers[index].tool_calls = [tuple(by_position[i]) for i in sorted(by_position)]  # type: ignore[misc]
    assert len(models) == 1, models
    return Reply(answers, completion_tokens, models.pop())


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


BOTH = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


# ---- response_format ----


@BOTH
def test_json_mode_answers_a_json_object(client: openai.OpenAI, stream: bool) -> None:
    reply = ask(
        client,
        stream=stream,
        messages=user("Describe a cat as JSON with the keys name and age."),
        response_format={"type": "json_object"},
        max_tokens=64,
    )
    answer = reply.only
    assert reply.model == QWEN
    assert answer.finish_reason == "stop", answer
    assert isinstance(json.loads(answer.text), dict), answer.text


PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "active": {"type": "boolean"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "skills": {
            "type": "array",
            "items": {"type": "string", "enum": ["python", "rust", "go", "sql"]},
            "minItems": 1,
            "maxItems": 2,
        },
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "active", "role", "skills", "address"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
# The text tempts the model out of the schema: an age above the maximum, a role and three skills it does not allow.
PERSON_PROMPT = (
    "Alice is 130 years old, a superuser, scores 7.5, is active, knows python, rust, go and java, and lives in "
    "Paris, zip 75001. Give her record as JSON."
)


@BOTH
def test_strict_json_schema_answer_validates(client: openai.OpenAI, stream: bool) -> None:
    reply = ask(client, stream=stream, messages=user(PERSON_PROMPT), response_format=PERSON_FORMAT, max_tokens=160)
    answer = reply.only
    assert answer.finish_reason == "stop", answer
    record = json.loads(answer.text)
    jsonschema.validate(record, PERSON_SCHEMA)


@BOTH
def test_json_schema_cut_short_is_length(client: openai.OpenAI, stream: bool) -> None:
    reply = ask(client, stream=stream, messages=user(PERSON_PROMPT), response_format=PERSON_FORMAT, max_tokens=3)
    answer = reply.only
    assert answer.finish_reason == "length", answer
    assert reply.completion_tokens == 3
    assert answer.text.lstrip().startswith("{"), answer.text


class CityFacts(BaseModel):
    name: str
    country: Literal["France", "Japan", "Peru"]
    is_capital: bool


def test_sdk_parse_fills_a_pydantic_model(client: openai.OpenAI) -> None:
    # The SDK turns the model into a strict json_schema response_format and parses the answer back into it.
    completion = client.chat.completions.parse(
        model=QWEN,
        messages=[{"role": "user", "content": "Tell me about Tokyo as JSON."}],
        response_format=CityFacts,
        max_tokens=48,
        temperature=0,
    )
    [choice] = completion.choices
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, CityFacts), choice.message
    assert choice.message.parsed.country == "Japan", choice.message.parsed


# ---- tools ----

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "description": "An IANA time zone, e.g. Europe/Paris"}},
    "required": ["timezone"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a time zone.",
        "parameters": TIME_PARAMETERS,
    },
}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
WEATHER_QUESTION = "What is the weather like in Paris right now?"


def assert_valid_calls(answer: Answer, names: set[str], finish_reason: str = "tool_calls") -> None:
    assert answer.finish_reason == finish_reason, answer
    assert answer.tool_calls, answer
    # The calls' markup is parsed into tool_calls, not left in the content.
    assert "<tool_call>" not in answer.text, answer.text
    for call_id, name, arguments in answer.tool_calls:
        assert call_id, answer.tool_calls
        assert name in names, answer.tool_calls
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def unparsed_call(text: str, tools: set[str]) -> Any:
    """A tool call written as the whole answer's text (bare or in a ```json fence, without `<tool_call>` tags), as
    the 0.5B writes one under tool_choice "auto"; None if the text is something else."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and value.get("name") in tools and "arguments" in value else None


@BOTH
def test_tool_choice_auto_calls_the_tool_or_answers(client: openai.OpenAI, stream: bool) -> None:
    reply = ask(
        client, stream=stream, messages=user(WEATHER_QUESTION), tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=48
    )
    answer = reply.only
    if answer.tool_calls:
        assert_valid_calls(answer, {"get_weather"})
    else:
        # The model may answer in words instead (allowed by "auto"): then it is text, neither tool-call markup nor a
        # call written as JSON text (the caller asked for tool_calls, and would get the call as prose).
        assert answer.finish_reason in ("stop", "length") and answer.text.strip(), answer
        assert "<tool_call>" not in answer.text, answer.text
        assert unparsed_call(answer.text, {"get_weather"}) is None, f"a tool call left as text: {answer.text!r}"


@BOTH
def test_tool_choice_none_answers_in_text(client: openai.OpenAI, stream: bool) -> None:
    reply = ask(
        client, stream=stream, messages=user(WEATHER_QUESTION), tools=[WEATHER_TOOL], tool_choice="none", max_tokens=24
    )
    answer = reply.only
    assert answer.tool_calls == [], answer
    assert answer.finish_reason in ("stop", "length") and answer.text.strip(), answer
    assert "<tool_call>" not in answer.text, answer.text


def test_tool_choice_required_calls_a_tool_and_streams_the_same_call(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {
        "messages": user(WEATHER_QUESTION),
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        # Room for several calls: parallel calls are allowed.
        "max_tokens": 112,
    }
    plain = ask(client, **params)
    # The greedy 0.5B, made to call, may go on calling (the same tool again) until max_tokens: "length" is then
    # right, as long as every call it finished is a valid one.
    finish = "length" if plain.completion_tokens == params["max_tokens"] else "tool_calls"
    assert_valid_calls(plain.only, {"get_weather"}, finish)
    assert json.loads(plain.only.tool_calls[0][2])["city"] == "Paris", plain.only.tool_calls
    streamed = ask(client, stream=True, **params).only
    assert_valid_calls(streamed, {"get_weather"}, finish)
    # Greedy: the same calls, assembled from the deltas (ids are made per answer).
    assert [(n, json.loads(a)) for _, n, a in streamed.tool_calls] == [
        (n, json.loads(a)) for _, n, a in plain.only.tool_calls
    ]
    assert streamed.finish_reasons_seen == 1


@BOTH
def test_tool_call_cut_by_max_tokens_leaves_no_markup_in_the_content(client: openai.OpenAI, stream: bool) -> None:
    # Room for one call (about 28 tokens) and part of a second: the finished call is returned, the unfinished one
    # is not turned into text.
    reply = ask(
        client,
        stream=stream,
        messages=user(WEATHER_QUESTION),
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=40,
    )
    answer = reply.only
    assert answer.finish_reason == "length", answer
    assert "<tool_call>" not in answer.text and "get_weather" not in answer.text, answer.text
    for _, name, arguments in answer.tool_calls:
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)


@BOTH
def test_named_tool_choice_calls_that_function(client: openai.OpenAI, stream: bool) -> None:
    reply = ask(
        client,
        stream=stream,
        messages=user(WEATHER_QUESTION),
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=48,
    )
    answer = reply.only
    assert_valid_calls(answer, {"get_time"})


@BOTH
def test_parallel_tool_calls_false_makes_exactly_one_call(client: openai.OpenAI, stream: bool) -> None:
    reply = ask(
        client,
        stream=stream,
        messages=user("What is the weather like in Paris, in London and in Tokyo?"),
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
    )
    answer = reply.only
    assert_valid_calls(answer, {"get_weather"})
    assert len(answer.tool_calls) == 1, answer.tool_calls


@BOTH
def test_multi_turn_tool_result_gets_a_text_answer(client: openai.OpenAI, stream: bool) -> None:
    messages: list[dict[str, Any]] = [
        *user(WEATHER_QUESTION),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_weather_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_weather_1", "content": '{"temperature": 18, "condition": "sunny"}'},
    ]
    reply = ask(client, stream=stream, messages=messages, tools=[WEATHER_TOOL], max_tokens=40)
    answer = reply.only
    assert answer.tool_calls == [], answer
    assert answer.finish_reason in ("stop", "length"), answer
    # The answer uses the tool's result.
    assert "18" in answer.text, answer.text


def test_tools_on_a_model_without_a_tool_format_are_400_naming_it(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, stream=stream, model=SMOL, messages=user(WEATHER_QUESTION), tools=[WEATHER_TOOL], max_tokens=8)
        assert SMOL in refused.value.message, refused.value.message


# ---- penalties ----

REPEAT = user("Repeat the word 'hello' 30 times, separated by spaces.")
POEM = user("Write a short poem about the sea.")


@pytest.fixture(scope="module")
def repeat_baseline(client: openai.OpenAI) -> str:
    answer = ask(client, messages=REPEAT, max_tokens=40).only
    assert answer.finish_reason == "length", answer
    return answer.text


def most_repeated_count(text: str) -> int:
    return Counter(text.lower().replace(",", " ").split()).most_common(1)[0][1]


@BOTH
def test_frequency_penalty_cuts_repeats(client: openai.OpenAI, repeat_baseline: str, stream: bool) -> None:
    baseline = most_repeated_count(repeat_baseline)
    assert baseline >= 10, repeat_baseline
    penalized = ask(client, stream=stream, messages=REPEAT, max_tokens=40, frequency_penalty=2.0).only
    assert most_repeated_count(penalized.text) < baseline, (repeat_baseline, penalized.text)


def test_presence_penalty_changes_the_greedy_answer(client: openai.OpenAI) -> None:
    # A free-text prompt: "hello" x 30 is too sure a choice for a once-per-token penalty to move.
    plain = ask(client, messages=POEM, max_tokens=24).only.text
    assert ask(client, messages=POEM, max_tokens=24, presence_penalty=0.0).only.text == plain
    penalized = ask(client, messages=POEM, max_tokens=24, presence_penalty=2.0).only.text
    assert penalized != plain, plain


def test_repetition_penalty_cuts_repeats(client: openai.OpenAI, repeat_baseline: str) -> None:
    penalized = ask(client, messages=REPEAT, max_tokens=40, extra_body={"repetition_penalty": 1.8}).only
    assert most_repeated_count(penalized.text) < most_repeated_count(repeat_baseline), penalized.text


def test_penalties_out_of_range_are_400(client: openai.OpenAI) -> None:
    for param, params in (
        ("frequency_penalty", {"frequency_penalty": 2.5}),
        ("presence_penalty", {"presence_penalty": -3}),
        ("repetition_penalty", {"extra_body": {"repetition_penalty": 0}}),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, messages=REPEAT, max_tokens=4, **params)
        assert names(refused.value, param)


# ---- logit_bias ----

CAPITAL = user("What is the capital of France? Answer with one word.")


def first_token_id(text: str, token_ids: dict[bytes, int], tokenizer: ChatTokenizer) -> int:
    """The id of a one-token answer's token (exact bytes), else the first id of its encoding."""
    return token_ids.get(text.encode(), tokenizer.encode(text)[0])


@BOTH
def test_logit_bias_bans_and_forces_tokens(
    client: openai.OpenAI, qwen_tokenizer: ChatTokenizer, qwen_token_ids: dict[bytes, int], stream: bool
) -> None:
    first = ask(client, messages=CAPITAL, max_tokens=1).only.text
    assert first, "the greedy answer's first token is empty"
    banned = first_token_id(first, qwen_token_ids, qwen_tokenizer)
    avoided = ask(client, stream=stream, messages=CAPITAL, max_tokens=1, logit_bias={str(banned): -100}).only
    assert avoided.text and avoided.text != first, (first, avoided.text)
    # A one-token word the answer would not start with.
    forced_id = qwen_token_ids[b"Berlin"]
    forced = ask(client, stream=stream, messages=CAPITAL, max_tokens=1, logit_bias={str(forced_id): 100}).only
    assert forced.text == qwen_tokenizer.decode([forced_id]), (forced_id, forced.text)


# ---- seed ----


def seeded(client: openai.OpenAI, seed: int, stream: bool = False) -> str:
    return ask(client, stream=stream, messages=POEM, temperature=1.0, seed=seed, max_tokens=16).only.text


def test_seed_repeats_the_sampled_answer(client: openai.OpenAI) -> None:
    first = seeded(client, 1234)
    assert seeded(client, 1234) == first
    assert seeded(client, 1234, stream=True) == first
    # Other seeds sample other answers (two tries, so one coincidence cannot fail the test).
    others = [seeded(client, 99), seeded(client, 7)]
    assert any(other != first for other in others), (first, others)


def test_seeded_answer_is_the_same_beside_other_requests(client: openai.OpenAI) -> None:
    alone = seeded(client, 4321)
    others = ["Name three fruits.", "What is 7 times 8?", "Describe a forest in one sentence."]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = pool.submit(seeded, client, 4321)
        noise = [pool.submit(ask, client, messages=user(q), temperature=1.0, max_tokens=16) for q in others]
        beside = together.result()
        assert beside == alone, f"alone: {alone!r}; beside 3 other requests: {beside!r}"
        for other in noise:
            assert other.result().only.text


# ---- n ----

STORY = user("Write a long story about a robot exploring the ocean.")


def test_n_choices_sampled_with_a_seed(client: openai.OpenAI) -> None:
    reply = ask(client, messages=STORY, n=3, temperature=1.0, seed=42, max_tokens=8)
    assert sorted(reply.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.text for c in reply.choices.values()), reply.choices
    assert reply.completion_tokens == 3 * 8
    # Sampled: the three are not all the same.
    assert len({c.text for c in reply.choices.values()}) > 1, reply.choices


def test_n_streamed_gives_each_choice_its_own_finish(client: openai.OpenAI) -> None:
    reply = ask(client, stream=True, messages=STORY, n=2, temperature=1.0, seed=42, max_tokens=6)
    assert sorted(reply.choices) == [0, 1]
    for answer in reply.choices.values():
        assert answer.text and answer.finish_reason == "length" and answer.finish_reasons_seen == 1, answer
    assert reply.completion_tokens == 2 * 6


def test_n_above_the_limit_is_400(client: openai.OpenAI, surface_mesh: RunningMesh) -> None:
    limit = surface_mesh.settings.gateway.max_n
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, stream=stream, messages=STORY, n=limit + 1, max_tokens=4)
        assert names(refused.value, "n") and str(limit) in refused.value.message, refused.value.message


# ---- stop strings and stop token ids ----

COUNT = user("Count from 1 to 10, separated by commas.")


@pytest.fixture(scope="module")
def count_baseline(client: openai.OpenAI) -> str:
    text = ask(client, messages=COUNT, max_tokens=24).only.text
    assert "5" in text and "," in text, text
    return text


@BOTH
def test_stop_string_ends_the_answer_before_it(client: openai.OpenAI, count_baseline: str, stream: bool) -> None:
    answer = ask(client, stream=stream, messages=COUNT, stop=["5"], max_tokens=24).only
    assert answer.finish_reason == "stop", answer
    assert "5" not in answer.text and answer.text and count_baseline.startswith(answer.text), answer.text


@BOTH
def test_stop_token_ids_end_the_answer_at_that_token(
    client: openai.OpenAI, count_baseline: str, qwen_token_ids: dict[bytes, int], stream: bool
) -> None:
    comma = qwen_token_ids[b","]
    answer = ask(client, stream=stream, messages=COUNT, max_tokens=24, extra_body={"stop_token_ids": [comma]}).only
    assert answer.finish_reason == "stop", answer
    assert answer.text and "," not in answer.text and count_baseline.startswith(answer.text), answer.text


# ---- logprobs ----


@BOTH
def test_logprobs_one_per_token_with_sorted_alternatives(client: openai.OpenAI, stream: bool) -> None:
    reply = ask(
        client,
        stream=stream,
        messages=user("Write a long story about a dragon who learns to paint."),
        logprobs=True,
        top_logprobs=3,
        max_tokens=8,
    )
    answer = reply.only
    assert answer.finish_reason == "length", answer
    assert answer.logprobs is not None and len(answer.logprobs) == reply.completion_tokens == 8, answer
    assert "".join(token for token, _, _ in answer.logprobs) == answer.text
    for token, logprob, alternatives in answer.logprobs:
        assert logprob <= 0
        assert len(alternatives) == 3, alternatives
        assert [lp for _, lp in alternatives] == sorted((lp for _, lp in alternatives), reverse=True), alternatives
        assert all(lp <= 0 for _, lp in alternatives)
        # Greedy: the chosen token is the most likely one.
        assert alternatives[0][0] == token and alternatives[0][1] == pytest.approx(logprob, abs=1e-3), (
            token,
            logprob,
            alternatives,
        )


# ---- parameters llmesh cannot honour, and bad values ----


def names(error: openai.BadRequestError, param: str) -> bool:
    """The 400 names `param`: as its `param` field (or a part of it, `logit_bias.100`), or as a word of its message."""
    named = error.param or ""
    return (
        named == param
        or named.startswith((f"{param}.", f"{param}["))
        or bool(re.search(rf"\b{param}\b", error.message))
    )


UNSUPPORTED: list[tuple[str, dict[str, Any]]] = [
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("prediction", {"prediction": {"type": "content", "content": "Paris"}}),
    ("web_search_options", {"web_search_options": {}}),
    ("reasoning_effort", {"reasoning_effort": "low"}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("functions", {"functions": [{"name": "get_weather", "parameters": WEATHER_PARAMETERS}]}),
    ("function_call", {"function_call": {"name": "get_weather"}}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ("logit_bias", {"logit_bias": {"100": 500}}),
    ("logit_bias", {"logit_bias": {"not-a-token": 1}}),
    ("logit_bias", {"logit_bias": {"100": "high"}}),
    ("response_format", {"response_format": {"type": "xml"}}),
    ("tool_choice", {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
]


@pytest.mark.parametrize(("param", "params"), UNSUPPORTED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(UNSUPPORTED)])
def test_unsupported_or_bad_parameter_is_400_naming_it(
    client: openai.OpenAI, param: str, params: dict[str, Any]
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, stream=stream, messages=CAPITAL, max_tokens=4, **params)
        assert refused.value.status_code == 400
        assert names(refused.value, param), (refused.value.param, refused.value.message)


# ---- the typed gRPC API ----


def grpc_metadata(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def test_grpc_json_schema_with_n_and_logprobs(surface_mesh: RunningMesh, paid_surface_key: str) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
            "population_millions": {"type": "number", "minimum": 0, "maximum": 50},
        },
        "required": ["city", "population_millions"],
        "additionalProperties": False,
    }
    request = chat_pb2.ChatCompletionRequest(
        model=QWEN,
        messages=[common_pb2.ChatMessage(role="user", content="Name a big city and its population as JSON.")],
        max_tokens=48,
        temperature=1.0,
        seed=7,
        n=2,
        logprobs=True,
        top_logprobs=2,
        output=common_pb2.OutputSpec(
            response_format="json_schema",
            json_schema=json.dumps(schema),
            json_schema_name="city",
            json_schema_strict=True,
        ),
    )
    with grpc.insecure_channel(surface_mesh.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        unary = stub.CreateChatCompletion(request, metadata=grpc_metadata(paid_surface_key), timeout=180)
        chunks = list(stub.StreamChatCompletion(request, metadata=grpc_metadata(paid_surface_key), timeout=180))
    assert unary.model == QWEN
    assert [c.index for c in unary.choices] == [0, 1]
    assert unary.text == unary.choices[0].text and unary.finish_reason == unary.choices[0].finish_reason
    generated = 0
    for choice in unary.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.text), schema)
        assert choice.logprobs and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs), choice
        assert "".join(t.token for t in choice.logprobs) == choice.text
        generated += len(choice.logprobs)
    assert unary.usage.completion_tokens == generated
    # The stream: both choices, each ending with its own finish_reason, with the same (seeded) texts.
    streamed: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    logprob_tokens: dict[int, int] = {}
    for chunk in chunks:
        streamed[chunk.index] = streamed.get(chunk.index, "") + chunk.delta
        logprob_tokens[chunk.index] = logprob_tokens.get(chunk.index, 0) + len(chunk.logprobs)
        if chunk.finish_reason:
            finishes.setdefault(chunk.index, []).append(chunk.finish_reason)
    assert finishes == {0: ["stop"], 1: ["stop"]}, finishes
    assert streamed == {c.index: c.text for c in unary.choices}
    assert sum(logprob_tokens.values()) == generated


def test_grpc_required_single_tool_call(surface_mesh: RunningMesh, paid_surface_key: str) -> None:
    request = chat_pb2.ChatCompletionRequest(
        model=QWEN,
        messages=[common_pb2.ChatMessage(role="user", content=WEATHER_QUESTION)],
        max_tokens=64,
        temperature=0,
        output=common_pb2.OutputSpec(
            tools=[
                common_pb2.Tool(
                    name="get_weather",
                    description="Get the current weather in a city.",
                    parameters_json=json.dumps(WEATHER_PARAMETERS),
                )
            ],
            tool_choice="required",
            parallel_tool_calls=False,
        ),
    )
    with grpc.insecure_channel(surface_mesh.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        unary = stub.CreateChatCompletion(request, metadata=grpc_metadata(paid_surface_key), timeout=180)
        chunks = list(stub.StreamChatCompletion(request, metadata=grpc_metadata(paid_surface_key), timeout=180))
    [choice] = unary.choices
    assert choice.finish_reason == "tool_calls" and unary.finish_reason == "tool_calls", choice
    assert "<tool_call>" not in choice.text, choice.text
    [call] = choice.tool_calls
    assert call.id and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    # Streamed: the call comes once, complete, and the stream ends with "tool_calls".
    [streamed_call] = [c for chunk in chunks for c in chunk.tool_calls]
    assert (streamed_call.name, json.loads(streamed_call.arguments)) == (call.name, json.loads(call.arguments))
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["tool_calls"]
    assert "<tool_call>" not in "".join(c.delta for c in chunks)
