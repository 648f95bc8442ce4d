"""The built model served by the real tritonserver (python backend, decoupled, gRPC streaming)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from llmesh.model_artifact import ChatTokenizer
from tests.fixtures.triton import TritonServer, run_tritonserver
from triton_models.config import BuildSettings
from triton_models.engine import Engine, EngineSampling, GenerationRequest
from triton_models.repository import ensure_model_repository

pytestmark = pytest.mark.slow

RESPONSE_TIMEOUT_S = 60.0


@dataclass
class Stream:
    """What one request produced: the token of every non-final response, and how it ended."""

    tokens: list[int] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    arrival: list[float] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)  # the choice of every token response
    ends: list[tuple[int, str]] = field(default_factory=list)  # (choice, finish reason) of every end
    logprobs: list[np.ndarray] = field(default_factory=list)  # per response: logprob, top_token_ids, top_logprobs
    top_ids: list[np.ndarray] = field(default_factory=list)
    top_logprobs: list[np.ndarray] = field(default_factory=list)


class StreamingClient:
    """A tritonclient gRPC stream; responses are sorted by request id as they arrive."""

    def __init__(self, server: TritonServer) -> None:
        self.server = server
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.events: queue.Queue[tuple[float, Any, InferenceServerException | None]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((time.monotonic(), result, error)))

    def send(
        self,
        request_id: str,
        ids: list[int],
        max_tokens: int,
        model: str = "",
        **optional: float | int | list[Any] | str,
    ) -> None:
        def tensor(name: str, datatype: str, value: np.ndarray) -> grpcclient.InferInput:
            t = grpcclient.InferInput(name, list(value.shape), datatype)
            t.set_data_from_numpy(value)
            return t

        inputs = [
            tensor("input_ids", "INT64", np.array([ids], dtype=np.int64).reshape(1, len(ids))),
            tensor("max_tokens", "INT32", np.array([[max_tokens]], dtype=np.int32)),
        ]
        types = {
            "temperature": ("FP32", np.float32),
            "top_p": ("FP32", np.float32),
            "top_k": ("INT32", np.int32),
            "seed": ("INT64", np.int64),
            "presence_penalty": ("FP32", np.float32),
            "frequency_penalty": ("FP32", np.float32),
            "repetition_penalty": ("FP32", np.float32),
            "logit_bias_ids": ("INT64", np.int64),
            "logit_bias_values": ("FP32", np.float32),
            "top_logprobs": ("INT32", np.int32),
            "stop_token_ids": ("INT64", np.int64),
            "n": ("INT32", np.int32),
            "grammar": ("BYTES", np.object_),
        }
        for name, value in optional.items():
            datatype, dtype = types[name]
            row = value if isinstance(value, list) else [value.encode() if isinstance(value, str) else value]
            inputs.append(tensor(name, datatype, np.array([row], dtype=dtype).reshape(1, len(row))))
        self.client.async_stream_infer(model or self.server.variant, inputs, request_id=request_id)

    def next_event(self) -> tuple[float, Any, InferenceServerException | None]:
        return self.events.get(timeout=RESPONSE_TIMEOUT_S)

    def collect(self, request_ids: list[str], n: int = 1) -> dict[str, Stream]:
        """Read until every request in `request_ids` has its final response, the n-th end of a request of n
        choices (an error counts as final, which is only unambiguous with one request in flight: errors carry no
        request id)."""
        streams = {rid: Stream() for rid in request_ids}
        open_ids = set(request_ids)
        while open_ids:
            arrived, result, error = self.next_event()
            if error is not None:
                assert len(open_ids) == 1, f"error with several requests in flight: {error}"
                rid = open_ids.pop()
                streams[rid].error = error.message()
                continue
            rid = result.get_response().id
            tokens = result.as_numpy("token_ids")
            reason = result.as_numpy("finish_reason")[0][0].decode()
            stream = streams[rid]
            stream.shapes.append(tokens.shape)
            stream.tokens += tokens.reshape(-1).tolist()
            stream.arrival.append(arrived)
            index = int(result.as_numpy("index")[0][0])
            stream.logprobs.append(result.as_numpy("logprob"))
            stream.top_ids.append(result.as_numpy("top_token_ids"))
            stream.top_logprobs.append(result.as_numpy("top_logprobs"))
            if tokens.size:
                stream.indexes.append(index)
            if reason:
                stream.finish_reason = reason
                stream.ends.append((index, reason))
                if len(stream.ends) == n:
                    open_ids.discard(rid)
        return streams

    def close(self, cancel_requests: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel_requests)
        self.client.close()


@pytest.fixture
def client(triton_server: TritonServer) -> Iterator[StreamingClient]:
    c = StreamingClient(triton_server)
    yield c
    c.close()


def chat(tokenizer: ChatTokenizer, question: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))


def test_streams_one_token_per_response(client: StreamingClient, chat_tokenizer: ChatTokenizer) -> None:
    client.send("france", chat(chat_tokenizer, "What is the capital of France?"), max_tokens=64)
    stream = client.collect(["france"])["france"]
    assert stream.error is None and stream.finish_reason == "stop"
    # Every token response holds exactly one token; the final response holds none.
    assert stream.shapes[:-1] == [(1, 1)] * len(stream.tokens) and stream.shapes[-1] == (1, 0)
    answer = chat_tokenizer.decode(stream.tokens)
    print(f"\nanswer: {answer!r}")
    assert "Paris" in answer


def test_max_tokens_gives_length(client: StreamingClient, chat_tokenizer: ChatTokenizer) -> None:
    client.send("story", chat(chat_tokenizer, "Write a long story about a dragon."), max_tokens=5)
    stream = client.collect(["story"])["story"]
    assert (stream.finish_reason, len(stream.tokens)) == ("length", 5)


@pytest.fixture(scope="module")
def delayed_server(
    model_repository: Path, build_settings: BuildSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """Triton with a 50 ms dynamic-batching delay. The shipped default is 0 (the engine batches continuously, so
    waiting only adds to time to first token); the delay is a serve-time setting: same graphs, new small folder."""
    settings = replace(build_settings, max_queue_delay_us=50_000)
    repository = ensure_model_repository(settings)
    assert repository != model_repository
    yield from run_tritonserver(repository, settings, tmp_path_factory.mktemp("tritonserver-delayed"))


def test_concurrent_requests_are_batched_and_match_the_engine(
    delayed_server: TritonServer, chat_tokenizer: ChatTokenizer, engine: Engine
) -> None:
    client = StreamingClient(delayed_server)
    questions = ["What is the capital of France?", "Name a color.", "Why do birds sing? Answer briefly."]
    prompts = [chat(chat_tokenizer, q) for q in questions]
    before = _batched_executions(delayed_server)
    try:
        for i, prompt in enumerate(prompts):  # one stream, sent back to back: within the 50 ms queue delay
            client.send(f"q{i}", prompt, max_tokens=24)
        streams = client.collect([f"q{i}" for i in range(len(prompts))])
    finally:
        client.close()
    assert _batched_executions(delayed_server) > before, "the dynamic batcher never formed a batch > 1"
    for i, prompt in enumerate(prompts):
        [expected] = engine.generate([GenerationRequest(prompt, EngineSampling(max_tokens=24))])
        assert (streams[f"q{i}"].tokens, streams[f"q{i}"].finish_reason) == (
            expected.token_ids,
            expected.finish_reason,
        )


def _batched_executions(server: TritonServer) -> int:
    """How many model executions so far had more than one request (Triton's per-batch-size statistics)."""
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(server.variant)
    return sum(int(b.compute_infer.count) for b in stats.model_stats[0].batch_stats if b.batch_size > 1)


def test_a_newcomer_joins_a_running_generation(client: StreamingClient, chat_tokenizer: ChatTokenizer) -> None:
    """Continuous batching through Triton: a short request sent while a long one streams finishes first."""
    client.send("long", chat(chat_tokenizer, "Count from 1 to 200."), max_tokens=150)
    for _ in range(5):  # the long one is decoding
        _, result, error = client.next_event()
        assert error is None and result.get_response().id == "long"
    client.send("short", chat(chat_tokenizer, "Name a color."), max_tokens=4)
    streams = client.collect(["long", "short"])
    assert streams["short"].finish_reason == "length" and len(streams["short"].tokens) == 4
    assert streams["short"].arrival[-1] < streams["long"].arrival[-1]
    assert streams["long"].finish_reason in ("stop", "length")


def test_int8_variant_is_served(client: StreamingClient, chat_tokenizer: ChatTokenizer) -> None:
    question = "What is the capital of France? Answer in one sentence."
    client.send("q", chat(chat_tokenizer, question), max_tokens=40, model="smollm2-135m-int8")
    stream = client.collect(["q"])["q"]
    assert stream.finish_reason == "stop" and "Paris" in chat_tokenizer.decode(stream.tokens)


def test_engine_metrics_are_exported(
    client: StreamingClient, chat_tokenizer: ChatTokenizer, triton_server: TritonServer
) -> None:
    import urllib.request

    client.send("m", chat(chat_tokenizer, "Name a color."), max_tokens=3)
    client.collect(["m"])
    time.sleep(0.2)  # gauges are refreshed when the engine goes idle
    text = urllib.request.urlopen(triton_server.metrics_url, timeout=10).read().decode()
    for name in (
        "kv_blocks_total",
        "kv_blocks_used",
        "prefix_hits_total",
        "generated_tokens_total",
        "process_max_rss_bytes",
    ):
        assert f'llmesh_engine_{name}{{variant="{triton_server.variant}"}}' in text, name


def test_sampling_with_seed_is_reproducible(client: StreamingClient, chat_tokenizer: ChatTokenizer) -> None:
    prompt = chat(chat_tokenizer, "Tell me a story about a cat.")
    runs = []
    for rid in ("s1", "s2"):
        client.send(rid, prompt, max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
        runs.append(client.collect([rid])[rid].tokens)
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_cancellation_stops_generation(
    triton_server: TritonServer, chat_tokenizer: ChatTokenizer, client: StreamingClient
) -> None:
    doomed = StreamingClient(triton_server)
    doomed.send("doomed", chat(chat_tokenizer, "Write a very long story about a dragon."), max_tokens=1500)
    for _ in range(3):
        _, result, error = doomed.next_event()
        assert error is None and result.as_numpy("finish_reason")[0][0] == b""
    doomed.close(cancel_requests=True)

    # The model instance is free again at once: a new request is answered without waiting for the ~1500
    # tokens (~45 s) the cancelled one asked for.
    started = time.monotonic()
    client.send("after", chat(chat_tokenizer, "What is the capital of France?"), max_tokens=16)
    stream = client.collect(["after"])["after"]
    assert stream.finish_reason in ("stop", "length")
    assert stream.arrival[0] - started < 5.0

    # And the model reports that it stopped generating for the cancelled request after a few tokens.
    deadline = time.monotonic() + 10
    while "request 'doomed' cancelled after" not in triton_server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(li for li in triton_server.log_text().splitlines() if "request 'doomed' cancelled after" in li)
    produced = int(line.split("cancelled after ")[1].split()[0])
    print(f"\n{line.strip()}")
    assert 3 <= produced < 30


@pytest.mark.parametrize(
    ("ids", "max_tokens", "message"),
    [
        ([], 5, "input_ids is empty"),
        ([1, 2, 3], 0, "max_tokens must be positive"),
        ([1] * 100, 2000, "exceeds the model's context length of 2048"),
        ([1, 99999], 5, "outside [0, 49152)"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(
    client: StreamingClient, chat_tokenizer: ChatTokenizer, ids: list[int], max_tokens: int, message: str
) -> None:
    client.send("bad", ids, max_tokens=max_tokens)
    bad = client.collect(["bad"])["bad"]
    assert bad.error is not None and bad.error.startswith("invalid request: ") and message in bad.error
    client.send("good", chat(chat_tokenizer, "Hi"), max_tokens=3)
    good = client.collect(["good"])["good"]
    assert good.error is None and good.finish_reason in ("stop", "length")


def test_two_sequences_in_one_request_are_rejected(client: StreamingClient, triton_server: TritonServer) -> None:
    inputs = [grpcclient.InferInput("input_ids", [2, 3], "INT64"), grpcclient.InferInput("max_tokens", [2, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.ones((2, 3), dtype=np.int64))
    inputs[1].set_data_from_numpy(np.full((2, 1), 4, dtype=np.int32))
    client.client.async_stream_infer(triton_server.variant, inputs, request_id="two")
    _, _, error = client.next_event()
    assert error is not None and "one sequence per request" in error.message()


# ---- the sampling controls (python_model.py's contract) ------------------------------------------------------


def test_n_choices_stream_with_their_indexes_and_two_ends(
    client: StreamingClient, chat_tokenizer: ChatTokenizer
) -> None:
    prompt = chat(chat_tokenizer, "Tell me a story about a cat.")
    client.send("pair", prompt, max_tokens=6, n=2, temperature=0.9, seed=7)
    pair = client.collect(["pair"], n=2)["pair"]
    client.send("lone", prompt, max_tokens=6, temperature=0.9, seed=7)
    lone = client.collect(["lone"])["lone"]
    assert pair.error is None and sorted(i for i, _ in pair.ends) == [0, 1]
    assert sorted(pair.indexes) == [0] * 6 + [1] * 6 and all(r == "length" for _, r in pair.ends)
    choice0 = [t for t, i in zip(pair.tokens, pair.indexes, strict=True) if i == 0]
    assert choice0 == lone.tokens  # choice 0 of a seeded request = the request of one with that seed
    # Nothing follows the last end: a third response would be read by the next request's collect.
    client.send("after", chat(chat_tokenizer, "Hi"), max_tokens=2)
    after = client.collect(["after"])["after"]
    assert after.error is None and after.finish_reason in ("stop", "length")


def test_logprob_outputs(client: StreamingClient, chat_tokenizer: ChatTokenizer) -> None:
    client.send("lp", chat(chat_tokenizer, "What is the capital of France?"), max_tokens=5, top_logprobs=3)
    stream = client.collect(["lp"])["lp"]
    assert stream.error is None and len(stream.tokens) == 5
    for k in range(5):
        logprob, top_ids, top_values = stream.logprobs[k], stream.top_ids[k], stream.top_logprobs[k]
        assert logprob.shape == (1, 1) and top_ids.shape == (1, 3) and top_values.shape == (1, 3)
        assert top_ids[0][0] == stream.tokens[k]  # greedy: the chosen token is the most likely one
        assert logprob[0][0] == pytest.approx(top_values[0][0]) and list(top_values[0]) == sorted(top_values[0])[::-1]
    assert stream.logprobs[-1].shape == (1, 0) and stream.top_ids[-1].shape == (1, 0)
    client.send("plain", chat(chat_tokenizer, "What is the capital of France?"), max_tokens=2)
    plain = client.collect(["plain"])["plain"]
    assert all(lp.shape == (1, 0) for lp in plain.logprobs) and all(t.shape == (1, 0) for t in plain.top_ids)


def test_stop_ids_bias_and_grammar(client: StreamingClient, chat_tokenizer: ChatTokenizer) -> None:
    prompt = chat(chat_tokenizer, "What is the capital of France?")
    client.send("free", prompt, max_tokens=8)
    free = client.collect(["free"])["free"]
    client.send("stopped", prompt, max_tokens=8, stop_token_ids=[free.tokens[2]])
    stopped = client.collect(["stopped"])["stopped"]
    assert stopped.finish_reason == "stop" and stopped.tokens == free.tokens[: free.tokens.index(free.tokens[2])]
    client.send("biased", prompt, max_tokens=8, logit_bias_ids=[free.tokens[0]], logit_bias_values=[-100.0])
    biased = client.collect(["biased"])["biased"]
    assert biased.error is None and biased.tokens[0] != free.tokens[0]
    grammar = (
        '{"json_schema": {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}}, '
        '"required": ["capital"], "additionalProperties": false}}'
    )
    client.send("json", prompt, max_tokens=30, grammar=grammar)
    constrained = client.collect(["json"])["json"]
    assert constrained.finish_reason == "stop", chat_tokenizer.decode(constrained.tokens)
    assert set(__import__("json").loads(chat_tokenizer.decode(constrained.tokens))) == {"capital"}


@pytest.mark.parametrize(
    ("optional", "message"),
    [
        ({"n": 0}, "n must be in [1, 8]"),
        ({"top_logprobs": 21}, "top_logprobs must be in [0, 20]"),
        ({"logit_bias_ids": [1, 2], "logit_bias_values": [1.0]}, "must come together"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"grammar": '{"json_schema": 3}'}, "json_schema must be"),
    ],
)
def test_bad_control_input_is_an_invalid_request(
    client: StreamingClient, optional: dict[str, Any], message: str
) -> None:
    client.send("bad", [1, 2, 3], max_tokens=3, **optional)
    bad = client.collect(["bad"])["bad"]
    assert bad.error is not None and bad.error.startswith("invalid request: ") and message in bad.error, bad.error
