"""The gateway's error path (gateway/server.py): what a caller sees of an error, over gRPC and through Envoy."""

import asyncio
import json
from collections import namedtuple
from typing import Any

import grpc
import pytest

from gateway.server import ChatServicer
from gateway.validation import RequestLimits
from llmesh.errors import Unavailable
from llmesh.v1 import chat_pb2

Metadatum = namedtuple("Metadatum", "key value")


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, metadata: dict[str, str]) -> None:
        self._metadata = [Metadatum(k, v) for k, v in metadata.items()]
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.status: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> list[Metadatum]:
        return self._metadata

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted


class FailingPipeline:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def authenticate(self, authorization: str | None) -> Any:
        raise self.error


def call(error: BaseException, metadata: dict[str, str]) -> FakeContext:
    servicer = ChatServicer(FailingPipeline(error), RequestLimits())  # type: ignore[arg-type]
    context = FakeContext(metadata)
    with pytest.raises(Aborted):
        asyncio.run(servicer.CreateChatCompletion(chat_pb2.ChatCompletionRequest(), context))  # type: ignore[arg-type]
    return context


TRANSCODED = {"x-envoy-original-path": "/v1/llmesh/chat/completions", "x-request-id": "abc-1"}


def test_a_bug_is_internal_without_its_class_or_text(caplog: pytest.LogCaptureFixture) -> None:
    context = call(KeyError("secret-internal-detail"), TRANSCODED)
    assert context.status is not None
    code, details = context.status
    assert code == grpc.StatusCode.INTERNAL
    assert "KeyError" not in details and "secret" not in details and "chatcmpl-abc-1" in details
    body = json.loads(dict(context.trailing)["x-llmesh-error"])
    assert body["error"]["type"] == "server_error" and body["error"]["message"] == details
    assert "secret-internal-detail" in caplog.text  # the log keeps the whole story


def test_server_side_failure_hides_addresses() -> None:
    context = call(Unavailable("router unavailable: ipv4:127.0.0.1:50052: connection refused"), {})
    assert context.status is not None
    code, details = context.status
    assert code == grpc.StatusCode.UNAVAILABLE and "127.0.0.1" not in details
    # A native gRPC call (no x-envoy-original-path) gets no OpenAI body in its trailers.
    assert "x-llmesh-error" not in dict(context.trailing)


def test_bad_request_id_does_not_hide_the_error() -> None:
    context = call(Unavailable("key store unavailable"), {**TRANSCODED, "x-request-id": "x" * 1000})
    assert context.status is not None
    assert context.status[0] == grpc.StatusCode.UNAVAILABLE and "x" * 100 not in context.status[1]
