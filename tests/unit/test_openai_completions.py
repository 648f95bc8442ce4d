"""POST /v1/completions without servers: parsing into ChatRequests with `prompt` (gateway/openai_completions.py),
the legacy response and SSE shapes (read back with the openai SDK's own models), and the gateway's
OpenAICompletions / GetModel / ListModels methods on a fake pipeline."""

from __future__ import annotations

import asyncio
import json
from collections import namedtuple
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from openai.types import Completion as OpenAICompletion
from openai.types import Model as OpenAIModel

from gateway.embeddings import Embeddings
from gateway.openai_completions import (
    DEFAULT_MAX_TOKENS,
    MAX_LOGPROBS,
    MAX_PROMPTS,
    REQUEST_FIELDS,
    ChoiceText,
    CompletionStream,
    completion_id,
    completion_json,
    legacy_logprobs,
    merge_choices,
    parse_request,
)
from gateway.pipeline import ChoiceOutput, Completion
from gateway.server import ChatServicer
from gateway.validation import ChatRequestFields, RequestLimits, validate
from llmesh.errors import InvalidRequest
from llmesh.minilm import EMBEDDING_MODEL
from llmesh.types import (
    ChatRequest,
    GenerateEvent,
    Principal,
    RouteInfo,
    RouteKind,
    Tier,
    TokenLogprob,
    TopLogprob,
    Usage,
    VariantInfo,
)
from llmesh.v1 import chat_pb2

ROUTE = RouteInfo("smollm2-135m-int8", "tier default", RouteKind.TIER_DEFAULT)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# ---- parsing -----------------------------------------------------------------------------------------------------


def test_a_prompt_becomes_a_chat_request_without_messages() -> None:
    parsed = parse_request(
        body(
            model="auto",
            prompt="Once upon a time",
            temperature=0.5,
            top_p=0.9,
            seed=7,
            stop=["\n"],
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logit_bias={"42": -100},
            logprobs=2,
            n=2,
            best_of=2,
            echo=False,
            suffix=None,
            user="u",
        )
    )
    assert not parsed.stream and parsed.n == 2 and len(parsed.prompts) == 1
    chat = validate(parsed.prompts[0], RequestLimits())
    assert chat.prompt == "Once upon a time" and chat.messages == ()
    sampling = chat.sampling
    assert sampling.max_tokens == DEFAULT_MAX_TOKENS
    assert (sampling.temperature, sampling.top_p, sampling.seed, sampling.stop) == (0.5, 0.9, 7, ("\n",))
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.5)
    assert sampling.logit_bias == ((42, -100.0),)
    assert sampling.logprobs and sampling.top_logprobs == 2 and sampling.n == 2
    assert chat.user == "u"


def test_a_list_of_prompts_gives_one_request_each_and_stream_options_are_read() -> None:
    parsed = parse_request(body(prompt=["a", "b"], max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert [f.prompt for f in parsed.prompts] == ["a", "b"]
    assert all(f.max_tokens == 5 for f in parsed.prompts)
    assert parsed.stream and parsed.include_usage


def test_logprobs_zero_means_the_chosen_tokens_only() -> None:
    chat = validate(parse_request(body(prompt="x", logprobs=0)).prompts[0], RequestLimits())
    assert chat.sampling.logprobs and chat.sampling.top_logprobs == 0
    assert not validate(parse_request(body(prompt="x")).prompts[0], RequestLimits()).sampling.logprobs


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"prompt": [1, 2, 3]}, "prompt", "token ids"),
        ({"prompt": [[1, 2]]}, "prompt", "token ids"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": []}, "prompt", "empty array"),
        ({}, "prompt", "missing"),
        ({"prompt": "x", "echo": True}, "echo", "not supported"),
        ({"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
        ({"prompt": "x", "logprobs": 6}, "logprobs", "[0, 5]"),
        ({"prompt": "x", "logprobs": True}, "logprobs", "integer"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
        ({"prompt": "x", "messages": []}, "messages", "unrecognized"),
        ({"prompt": "x", "stream_options": {"x": 1}}, "stream_options.x", "unrecognized"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "must be a number"),
    ],
)
def test_bad_requests_are_400_naming_the_field(fields: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body(**fields))
    assert caught.value.param == param
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"temperature": 3}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"n": 99}, "n")],
)
def test_values_go_through_the_chat_validation(fields: dict[str, Any], param: str) -> None:
    parsed = parse_request(body(prompt="x", **fields))
    with pytest.raises(InvalidRequest) as caught:
        validate(parsed.prompts[0], RequestLimits())
    assert caught.value.param == param


# ---- shaping -----------------------------------------------------------------------------------------------------

LOGPROBS = [
    TokenLogprob("Hel", -0.5, b"Hel", (TopLogprob("Hel", -0.5, b"Hel"), TopLogprob("He", -1.5, b"He"))),
    TokenLogprob("lo", float("-inf"), b"lo", ()),
]


def test_legacy_logprobs_shape() -> None:
    assert legacy_logprobs(LOGPROBS, offset=3) == {
        "tokens": ["Hel", "lo"],
        "token_logprobs": [-0.5, -9999.0],
        "top_logprobs": [{"Hel": -0.5, "He": -1.5}, {}],
        "text_offset": [3, 6],
    }


def test_completion_is_openais_shape() -> None:
    choices = [ChoiceText(1, " world", "length", LOGPROBS), ChoiceText(0, "Hello", "stop", LOGPROBS)]
    data = completion_json("cmpl-1", 1700000000, "smollm2-135m-int8", choices, Usage(4, 6), True, ROUTE)
    parsed = OpenAICompletion.model_validate_json(data)
    assert parsed.object == "text_completion" and parsed.id == "cmpl-1" and parsed.model == "smollm2-135m-int8"
    assert [(c.index, c.text, c.finish_reason) for c in parsed.choices] == [
        (0, "Hello", "stop"),
        (1, " world", "length"),
    ]
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == ["Hel", "lo"] and logprobs.text_offset == [0, 3]
    assert parsed.usage is not None and parsed.usage.total_tokens == 10
    plain = json.loads(completion_json("cmpl-1", 1, "m", choices, Usage(1, 1), False))
    assert all(c["logprobs"] is None for c in plain["choices"])


def test_choices_of_several_prompts_are_numbered_prompt_by_prompt() -> None:
    def done(texts: list[str], usage: Usage) -> Completion:
        return Completion(
            texts[0], "stop", usage, ROUTE, choices=tuple(ChoiceOutput(i, t, "stop") for i, t in enumerate(texts))
        )

    choices, usage = merge_choices([done(["a0", "a1"], Usage(3, 4)), done(["b0", "b1"], Usage(5, 6))], n=2)
    assert [(c.index, c.text) for c in choices] == [(0, "a0"), (1, "a1"), (2, "b0"), (3, "b1")]
    assert usage == Usage(8, 10)


def sse_payloads(chunks: list[bytes]) -> list[Any]:
    out = []
    for chunk in b"".join(chunks).split(b"\n\n"):
        if chunk:
            assert chunk.startswith(b"data: ")
            text = chunk[len(b"data: ") :].decode()
            out.append(text if text == "[DONE]" else json.loads(text))
    return out


def completion_chunk(payload: dict[str, Any]) -> OpenAICompletion:
    """A stream chunk read with the SDK's model. Its finish_reason is null until a choice's last chunk, as OpenAI
    sends it; the SDK reads stream chunks without validation, and its model has no null there: checked apart."""
    choices = [{**choice, "finish_reason": choice["finish_reason"] or "stop"} for choice in payload["choices"]]
    for choice in payload["choices"]:
        assert choice["finish_reason"] in (None, "stop", "length")
    return OpenAICompletion.model_validate({**payload, "choices": choices})


def test_stream_chunks_are_completions_with_text_deltas() -> None:
    stream = CompletionStream("cmpl-9", 1, n=1, include_usage=True, with_logprobs=True)
    chunks: list[bytes] = []
    for prompt, events in enumerate(
        [
            [
                GenerateEvent(route=ROUTE),
                GenerateEvent(delta="Hel", logprobs=(LOGPROBS[0],)),
                GenerateEvent(delta="lo"),
            ],
            [GenerateEvent(route=ROUTE), GenerateEvent(delta="x", finish_reason="length", usage=Usage(2, 1))],
        ]
    ):
        stream.start_prompt(prompt)
        for event in events:
            chunks += stream.feed(event)
    chunks += stream.finish()
    payloads = sse_payloads(chunks)
    parsed = [completion_chunk(p) for p in payloads]
    assert [(c.choices[0].index, c.choices[0].text) for c in parsed[:3]] == [(0, "Hel"), (0, "lo"), (1, "x")]
    assert parsed[0].choices[0].logprobs is not None and parsed[0].choices[0].logprobs.text_offset == [0]
    assert parsed[2].choices[0].finish_reason == "length" and payloads[0]["choices"][0]["finish_reason"] is None
    assert parsed[-1].choices == [] and parsed[-1].usage is not None and parsed[-1].usage.total_tokens == 3
    assert payloads[0]["llmesh_route"]["variant"] == ROUTE.variant


def test_completion_ids_take_openais_prefix() -> None:
    assert completion_id("chatcmpl-abc") == "cmpl-abc"


# ---- the gateway's methods on a fake pipeline ----------------------------------------------------------------------

Metadatum = namedtuple("Metadatum", "key value")


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.initial: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> list[Metadatum]:
        return [Metadatum("x-request-id", "rid-1")]

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        pass

    async def send_initial_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.initial = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted


class FakePipeline:
    """Answers every prompt with its own text reversed, one choice per n."""

    def __init__(self) -> None:
        self.requests: list[tuple[ChatRequest, str]] = []

    async def authenticate(self, authorization: str | None) -> Principal:
        return Principal("k1", Tier.PAID)

    def validate(self, fields: ChatRequestFields, principal: Principal | None = None) -> ChatRequest:
        return validate(fields, RequestLimits())

    async def list_models(self, principal: Principal) -> list[VariantInfo]:
        return [VariantInfo("smollm2-135m-int8", "SmolLM2", 2048, (Tier.PAID,))]

    async def stream(
        self, principal: Principal, request: ChatRequest, request_id: str, headers: Any = None
    ) -> AsyncIterator[GenerateEvent]:
        self.requests.append((request, request_id))
        if headers is not None:
            headers.append(("x-ratelimit-remaining", "3"))
        yield GenerateEvent(route=ROUTE)
        for index in range(request.sampling.n):
            yield GenerateEvent(delta=request.prompt[::-1], index=index, finish_reason="stop")
        yield GenerateEvent(usage=Usage(len(request.prompt), request.sampling.n))

    async def complete(self, principal: Principal, request: ChatRequest, request_id: str, headers: Any = None) -> Any:
        texts: dict[int, str] = {}
        usage = None
        async for event in self.stream(principal, request, request_id, headers):
            texts[event.index] = texts.get(event.index, "") + event.delta
            usage = event.usage or usage
        assert usage is not None
        choices = tuple(ChoiceOutput(i, t, "stop") for i, t in sorted(texts.items()))
        return Completion(choices[0].text, "stop", usage, ROUTE, "", choices)


def servicer(pipeline: FakePipeline, embeddings: bool = True) -> ChatServicer:
    embed = Embeddings(client=None) if embeddings else None  # type: ignore[arg-type]
    return ChatServicer(pipeline, RequestLimits(), embed)  # type: ignore[arg-type]


async def collect(method: Any, request: Any, context: FakeContext) -> list[bytes]:
    return [item.data async for item in method(request, context)]


def http(payload: dict[str, Any]) -> chat_pb2.OpenAIHttpRequest:
    request = chat_pb2.OpenAIHttpRequest()
    request.body.data = json.dumps(payload).encode()
    return request


def test_completions_method_answers_every_prompt_and_choice() -> None:
    pipeline = FakePipeline()
    context = FakeContext()
    bodies = asyncio.run(
        collect(servicer(pipeline).OpenAICompletions, http({"prompt": ["abc", "xy"], "n": 2}), context)
    )
    parsed = OpenAICompletion.model_validate_json(b"".join(bodies))
    assert [(c.index, c.text) for c in parsed.choices] == [(0, "cba"), (1, "cba"), (2, "yx"), (3, "yx")]
    assert parsed.usage is not None and parsed.usage.prompt_tokens == 5 and parsed.usage.completion_tokens == 4
    assert sorted(rid for _, rid in pipeline.requests) == ["chatcmpl-rid-1", "chatcmpl-rid-1-1"]
    assert all(r.prompt and not r.messages for r, _ in pipeline.requests)
    assert parsed.id == "cmpl-rid-1" and context.initial == (("x-ratelimit-remaining", "3"),)


def test_completions_method_streams_then_done() -> None:
    context = FakeContext()
    payload = {"prompt": "abc", "stream": True, "stream_options": {"include_usage": True}}
    payloads = sse_payloads(asyncio.run(collect(servicer(FakePipeline()).OpenAICompletions, http(payload), context)))
    assert payloads[-1] == "[DONE]"
    chunks = [completion_chunk(p) for p in payloads[:-1]]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "cba"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 4


def test_get_model_finds_listed_models_and_404s_others() -> None:
    service = servicer(FakePipeline())
    listed: chat_pb2.ModelList = asyncio.run(service.ListModels(chat_pb2.ListModelsRequest(), FakeContext()))  # type: ignore[arg-type]
    assert [m.id for m in listed.data] == ["auto", "smollm2-135m-int8", EMBEDDING_MODEL]
    for model in listed.data:
        found: chat_pb2.Model = asyncio.run(service.GetModel(chat_pb2.GetModelRequest(id=model.id), FakeContext()))  # type: ignore[arg-type]
        assert found == model
        OpenAIModel.model_validate({"id": found.id, "object": found.object, "created": 0, "owned_by": found.owned_by})
    context = FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(service.GetModel(chat_pb2.GetModelRequest(id="gpt-4"), context))  # type: ignore[arg-type]
    assert context.status is not None and context.status[0] is grpc.StatusCode.NOT_FOUND
    without: chat_pb2.ModelList = asyncio.run(
        servicer(FakePipeline(), embeddings=False).ListModels(chat_pb2.ListModelsRequest(), FakeContext())  # type: ignore[arg-type]
    )
    assert EMBEDDING_MODEL not in [m.id for m in without.data]


def test_docs_list_the_parsed_fields() -> None:
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml").read_text())
    schema = doc["components"]["schemas"]["CompletionRequest"]
    documented = {k: set(v) for k, v in schema["x-llmesh-fields"].items()}
    assert documented == {k: set(v) for k, v in REQUEST_FIELDS.items()}
    assert set(schema["properties"]) == set().union(*REQUEST_FIELDS.values())
    assert schema["properties"]["prompt"]["oneOf"][1]["maxItems"] == MAX_PROMPTS
    assert schema["properties"]["logprobs"]["maximum"] == MAX_LOGPROBS
    assert "/v1/models/{id}" in doc["paths"] and "404" in doc["paths"]["/v1/models/{id}"]["get"]["responses"]
