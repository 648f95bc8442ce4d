import json

import pytest

from gateway import openai_compat
from llmesh.errors import InvalidRequest
from llmesh.types import RouteInfo, RouteKind, Usage


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
    assert f.messages == [("system", "be brief"), ("user", "hi")]
    assert (f.max_tokens, f.temperature, f.seed, list(f.stop)) == (12, 0, 7, ["END"])


def test_max_completion_tokens_wins() -> None:
    parsed = openai_compat.parse_request(body(messages=[], max_tokens=5, max_completion_tokens=9))
    assert parsed.fields.max_tokens == 9


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8"),
        (b"[1, 2]", "request body must be of type dict"),
        (body(messages="hi"), "messages must be of type list"),
        (body(messages=[{"role": "user"}]), "messages[0].content is missing"),
        (body(messages=[{"role": 3, "content": "x"}]), "messages[0].role must be of type str"),
        (body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only 'text'"),
        (body(messages=[], max_tokens="ten"), "max_tokens must be of type int"),
        (body(messages=[], max_tokens=True), "must be a number"),
        (body(messages=[], n=2), "n must be 1"),
        (body(messages=[], stream="yes"), "stream must be of type bool"),
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
