"""triton_models.python_model against a fake triton_python_backend_utils (no tritonserver)."""

from __future__ import annotations

import importlib
import sys
import time
import types
from typing import Any

import numpy as np
import pytest

from tests.unit.test_scheduler import make_engine
from triton_models.engine import STOPPED_MESSAGE


class FakeTritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str) -> None:
        self.message, self.code = message, code


class FakeModelException(Exception):
    pass


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor] | None = None, error: FakeTritonError | None = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class FakeLogger:
    lines: list[str] = []

    @classmethod
    def log_info(cls, m: str) -> None:
        cls.lines.append(m)

    log_warn = log_error = log_info


class FakeSender:
    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[FakeResponse, int]] = []
        self.fail_after = fail_after

    def send(self, response: FakeResponse, flags: int = 0) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise FakeModelException("stream closed")
        self.sent.append((response, flags))

    def is_cancelled(self) -> bool:
        return False


class FakeRequest:
    def __init__(self, rid: str, sender: FakeSender, params: str = "{}", **inputs: np.ndarray) -> None:
        self.rid, self.sender, self.inputs, self.params = rid, sender, inputs, params

    def parameters(self) -> str:
        return self.params

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def request_id(self) -> str:
        return self.rid


FINAL = 1


@pytest.fixture
def pm(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TritonError = FakeTritonError
    fake.TritonModelException = FakeModelException
    fake.Tensor = FakeTensor
    fake.InferenceResponse = FakeResponse
    fake.Logger = FakeLogger
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    fake.get_input_tensor_by_name = lambda r, n: FakeTensor(n, r.inputs[n]) if n in r.inputs else None
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    sys.modules.pop("triton_models.python_model", None)
    return importlib.import_module("triton_models.python_model")


def request(rid: str, ids: list[int], max_tokens: int, sender: FakeSender | None = None) -> FakeRequest:
    return FakeRequest(
        rid,
        sender or FakeSender(),
        input_ids=np.array([ids], dtype=np.int64).reshape(1, len(ids)),
        max_tokens=np.array([[max_tokens]], dtype=np.int32),
    )


def model(pm: Any, engine: Any) -> Any:
    m = pm.TritonPythonModel()
    m.logger, m.model_name, m.engine = FakeLogger, "test", engine
    return m


def drain(engine: Any) -> None:
    """What the model's engine thread does: step until every submitted request is finished."""
    while engine.has_work():
        engine.step()


def test_bad_and_good_requests_in_one_batch(pm: Any, engine: Any) -> None:
    bad, good = request("bad", [], 3), request("good", [1, 2, 3], 3)
    model(pm, engine).execute([bad, good])
    [(err, flags)] = bad.sender.sent  # rejected inside execute(), before the engine sees it
    assert flags == FINAL and err.error.code == "INVALID_ARG" and err.error.message.startswith("invalid request: ")
    drain(engine)
    assert [f for _, f in good.sender.sent] == [0, 0, 0, FINAL]
    assert good.sender.sent[-1][0].outputs["finish_reason"][0][0] == b"length"


def test_execute_returns_before_generation(pm: Any, engine: Any) -> None:
    r = request("r", [1, 2, 3], 3)
    model(pm, engine).execute([r])
    assert r.sender.sent == [] and engine.has_work()
    drain(engine)
    assert len(r.sender.sent) == 4


def test_failed_send_only_ends_that_stream(pm: Any, engine: Any) -> None:
    broken, fine = request("broken", [1, 2, 3], 5, FakeSender(fail_after=1)), request("fine", [1, 2, 3], 5)
    model(pm, engine).execute([broken, fine])
    drain(engine)
    assert len(broken.sender.sent) == 1
    assert [f for _, f in fine.sender.sent] == [0] * 5 + [FINAL]


def test_engine_failure_ends_every_open_stream_with_an_error(pm: Any, engine: Any) -> None:
    a, b = request("a", [1, 2], 3), request("b", [3, 4], 3)
    model(pm, engine).execute([a, b])
    forward = engine.runner.forward

    def explode(*args: Any) -> None:
        raise RuntimeError("onnxruntime exploded")

    engine.runner.forward = explode
    try:
        drain(engine)
    finally:
        engine.runner.forward = forward
    for r in (a, b):
        [(err, flags)] = r.sender.sent
        assert flags == FINAL and err.error.message == "generation failed: onnxruntime exploded"


def test_priority_parameter(pm: Any) -> None:
    assert pm._priority(FakeRequest("x", FakeSender(), params='{"llmesh_priority": 1}')) == 1
    assert pm._priority(FakeRequest("x", FakeSender(), params="{}")) == 3
    assert pm._priority(FakeRequest("x", FakeSender(), params='{"llmesh_priority": "high"}')) == 3


def test_validate_config_names_problems(pm: Any) -> None:
    with pytest.raises(ValueError, match=r"decoupled must be true.*input 'seed' is missing"):
        pm.validate_config(
            {
                "name": "m",
                "max_batch_size": 8,
                "input": [
                    {"name": "input_ids", "data_type": "TYPE_INT64"},
                    {"name": "max_tokens", "data_type": "TYPE_INT32"},
                    {"name": "temperature", "data_type": "TYPE_FP32", "optional": True},
                    {"name": "top_p", "data_type": "TYPE_FP32", "optional": True},
                    {"name": "top_k", "data_type": "TYPE_INT32", "optional": True},
                ],
                "output": [
                    {"name": "token_ids", "data_type": "TYPE_INT64"},
                    {"name": "finish_reason", "data_type": "TYPE_STRING"},
                ],
            }
        )


class FakeMetrics:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.updates, self.closed = fail, 0, False

    def update(self, engine: Any) -> None:
        self.updates += 1
        if self.fail:
            raise RuntimeError("metric export broke")

    def close(self) -> None:
        self.closed = True


def started(pm: Any, metrics: FakeMetrics, **overrides: Any) -> tuple[Any, Any]:
    """A model whose engine thread runs (TritonPythonModel._start) over a fake-model engine of its own."""
    engine, _ = make_engine()
    m = model(pm, engine)
    m.metrics = metrics
    for name, value in overrides.items():
        setattr(m, name, value)
    m._start()
    return m, engine


def wait_final(*requests: FakeRequest, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(r.sender.sent and r.sender.sent[-1][1] == FINAL for r in requests):
        assert time.monotonic() < deadline, "no final response"
        time.sleep(0.01)


def test_engine_thread_streams_and_a_failing_metrics_export_does_not_stop_it(pm: Any) -> None:
    FakeLogger.lines.clear()
    m, _ = started(pm, FakeMetrics(fail=True))
    a, b = request("a", [1, 2, 3], 4), request("b", [4, 5], 4)
    m.execute([a, b])
    wait_final(a, b)
    for r in (a, b):
        assert [f for _, f in r.sender.sent][-1] == FINAL and r.sender.sent[-1][0].error is None
    assert m.metrics.updates > 0 and any("metrics update failed" in line for line in FakeLogger.lines)
    m.finalize()
    assert not m._thread.is_alive() and m.metrics.closed


def test_unloading_ends_open_requests_and_refuses_new_ones(pm: Any) -> None:
    models: list[Any] = []

    def after_step(worked: bool) -> None:
        if worked:  # unload after the first step that did something, while the request is still generating
            models[0]._stop.set()

    m, engine = started(pm, FakeMetrics(), _after_step=after_step)
    models.append(m)
    r = request("r", [1, 2, 3], 100)
    m.execute([r])
    m._thread.join(10)
    assert not m._thread.is_alive()
    *tokens, (final, flags) = r.sender.sent
    assert len(tokens) >= 1 and flags == FINAL
    assert final.error.code == "INTERNAL" and final.error.message == STOPPED_MESSAGE
    late = request("late", [1, 2], 3)
    m.execute([late])
    [(err, flags)] = late.sender.sent
    assert flags == FINAL and err.error.code == "INTERNAL" and err.error.message.startswith("generation failed: ")
    m.finalize()
    assert not engine.has_work()


# ---- the sampling controls' inputs and outputs --------------------------------------------------------------


def controls_request(rid: str, ids: list[int], max_tokens: int, **inputs: Any) -> FakeRequest:
    """A request with extra inputs given as (value, dtype) or arrays; scalars become [1, 1], lists [1, K]."""
    r = request(rid, ids, max_tokens)
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            r.inputs[name] = value
        else:
            data, dtype = value
            r.inputs[name] = np.array([data if isinstance(data, list) else [data]], dtype=dtype)
    return r


def test_rendered_config_passes_validation(pm: Any) -> None:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from triton_models.catalogue import SMOLLM2_VARIANTS
    from triton_models.config import BuildSettings
    from triton_models.repository import render_config

    settings = BuildSettings(variants=SMOLLM2_VARIANTS)
    config = text_format.Parse(render_config(settings, settings.variant), model_config_pb2.ModelConfig())
    as_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
    pm.validate_config(as_dict)
    assert {i["name"] for i in as_dict["input"]} == set(pm.EXPECTED_INPUTS)
    assert {o["name"] for o in as_dict["output"]} == set(pm.EXPECTED_OUTPUTS)
    del as_dict["output"][-1]
    with pytest.raises(ValueError, match="output 'top_logprobs' is missing"):
        pm.validate_config(as_dict)


def test_every_control_input_reaches_the_engine(pm: Any) -> None:
    r = controls_request(
        "r",
        [1, 2],
        7,
        presence_penalty=(0.5, np.float32),
        frequency_penalty=(-0.25, np.float32),
        repetition_penalty=(1.5, np.float32),
        logit_bias_ids=([3, 9], np.int64),
        logit_bias_values=([2.0, -100.0], np.float32),
        top_logprobs=(4, np.int32),
        stop_token_ids=([11, 12], np.int64),
        n=(3, np.int32),
        grammar=np.array([[b'{"json_object": true}']], dtype=np.object_),
    )
    parsed = pm.parse_request(r)
    s = parsed.sampling
    assert parsed.n == 3 and s.max_tokens == 7
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.25, 1.5)
    assert s.logit_bias == ((3, 2.0), (9, -100.0)) and s.top_logprobs == 4
    assert s.stop_token_ids == frozenset({11, 12}) and s.grammar == '{"json_object": true}'
    plain = pm.parse_request(request("p", [1, 2], 3)).sampling
    assert plain.plain and plain.top_logprobs is None and plain.stop_token_ids == frozenset()


def test_n_choices_stream_with_their_index_and_the_last_end_is_final(pm: Any) -> None:
    engine, _ = make_engine()
    r = controls_request("r", [1, 2, 3], 4, n=(2, np.int32), temperature=(1.0, np.float32), seed=(5, np.int64))
    model(pm, engine).execute([r])
    drain(engine)
    tokens = [(resp.outputs["index"][0][0], flags) for resp, flags in r.sender.sent if resp.outputs["token_ids"].size]
    ends = [
        (int(resp.outputs["index"][0][0]), resp.outputs["finish_reason"][0][0], flags)
        for resp, flags in r.sender.sent
        if not resp.outputs["token_ids"].size
    ]
    assert sorted(int(i) for i, _ in tokens) == [0] * 4 + [1] * 4 and all(f == 0 for _, f in tokens)
    assert sorted(i for i, _, _ in ends) == [0, 1] and [r for _, r, _ in ends] == [b"length", b"length"]
    assert [f for _, _, f in ends] == [0, FINAL] and r.sender.sent[-1][1] == FINAL
    for resp, _ in r.sender.sent:  # no logprobs asked: empty ones on every response
        assert resp.outputs["logprob"].shape == (1, 0) and resp.outputs["top_token_ids"].shape == (1, 0)
        assert resp.outputs["top_logprobs"].shape == (1, 0) and resp.outputs["index"].dtype == np.int32


def test_one_choice_ends_exactly_as_before(pm: Any) -> None:
    engine, _ = make_engine()
    r = request("r", [1, 2, 3], 3)
    model(pm, engine).execute([r])
    drain(engine)
    assert [f for _, f in r.sender.sent] == [0, 0, 0, FINAL]
    final = r.sender.sent[-1][0].outputs
    assert final["token_ids"].shape == (1, 0) and final["finish_reason"][0][0] == b"length"
    assert final["index"].tolist() == [[0]]


def test_logprob_outputs(pm: Any) -> None:
    engine, _ = make_engine()
    r = controls_request("r", [1, 2, 3], 3, top_logprobs=(2, np.int32))
    model(pm, engine).execute([r])
    drain(engine)
    *tokens, (final, _) = r.sender.sent
    for resp, _ in tokens:
        out = resp.outputs
        assert out["logprob"].shape == (1, 1) and out["logprob"].dtype == np.float32
        assert out["top_token_ids"].shape == (1, 2) and out["top_logprobs"].shape == (1, 2)
        # The fake model puts 10.0 on its token and 0 elsewhere: the chosen token is the top one.
        assert out["top_token_ids"][0][0] == out["token_ids"][0][0]
        assert out["logprob"][0][0] == pytest.approx(out["top_logprobs"][0][0]) and out["logprob"][0][0] < 0
    assert final.outputs["logprob"].shape == (1, 0) and final.outputs["top_token_ids"].shape == (1, 0)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"logit_bias_ids": ([1, 2], np.int64)}, "logit_bias_ids and logit_bias_values must come together"),
        (
            {"logit_bias_ids": ([1, 2], np.int64), "logit_bias_values": ([1.0], np.float32)},
            "logit_bias_ids and logit_bias_values must come together",
        ),
        ({"logit_bias_ids": ([3], np.int64), "logit_bias_values": ([1000.0], np.float32)}, "logit_bias values"),
        ({"logit_bias_ids": ([64], np.int64), "logit_bias_values": ([1.0], np.float32)}, "outside [0, 64)"),
        ({"top_logprobs": (21, np.int32)}, "top_logprobs must be in [0, 20]"),
        ({"n": (0, np.int32)}, "n must be in [1, 8]"),
        ({"n": (9, np.int32)}, "n must be in [1, 8]"),
        ({"presence_penalty": (-3.0, np.float32)}, "presence_penalty must be in [-2, 2]"),
        ({"repetition_penalty": (0.0, np.float32)}, "repetition_penalty must be in (0, 2]"),
        ({"stop_token_ids": np.array([1, 2], dtype=np.int64)}, "stop_token_ids must have shape [1, K]"),
        ({"grammar": np.array([[b"\xff"]], dtype=np.object_)}, "grammar is not valid UTF-8"),
        ({"grammar": np.array([[b'{"json_object": true}']], dtype=np.object_)}, "does not support grammar"),
    ],
)
def test_bad_control_inputs_are_invalid_requests(pm: Any, inputs: dict[str, Any], message: str) -> None:
    engine, _ = make_engine()  # no grammar compiler: a grammar is refused
    r = controls_request("bad", [1, 2, 3], 3, **inputs)
    model(pm, engine).execute([r])
    [(err, flags)] = r.sender.sent
    assert flags == FINAL and err.error is not None and err.error.code == "INVALID_ARG"
    assert err.error.message.startswith("invalid request: ") and message in err.error.message
    assert not engine.has_work()
