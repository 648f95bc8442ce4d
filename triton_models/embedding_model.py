"""Triton python-backend model serving all-MiniLM-L6-v2 sentence embeddings (POST /v1/embeddings).

I/O CONTRACT (model name = llmesh.minilm.EMBEDDING_MODEL, "all-minilm-l6-v2"; not decoupled)

  inputs   input_ids  INT64 [n, L]  WordPiece ids of n texts (llmesh.minilm.load_tokenizer: [CLS] ... [SEP], at
                                    most MAX_TOKENS), right-padded with 0 ([PAD]) to the longest; the router sends
                                    one text per request (n = 1) so that Triton's dynamic batcher can group texts
                                    of different callers
  outputs  embedding  FP32  [n, 384]  mean-pooled over the real tokens, L2-normalised: the same function as the
                                    cache's embedder (llmesh.minilm / llmesh.minilm_onnx), to ~1e-7

  An invalid request (an id outside the vocabulary, a row without tokens, more than MAX_TOKENS) gets an error
  response whose message starts with "invalid request: " (code INVALID_ARG); the other requests of the batch go on.

Dynamic batching (config.pbtxt, written by repository.write_embedding_model): requests that arrive within the
queue delay are handed to one execute() together (input_ids may differ in length: allow_ragged_batch); execute()
pads them into one [B, L] batch and runs the onnxruntime graph once. The repository's `model.py` only imports this
module from the installed project, so a change here needs a Triton restart, not a new repository directory.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from llmesh.minilm import DIM, MAX_TOKENS, MiniLMEncoder, model_dir, pad_batch
from llmesh.minilm_onnx import OnnxMiniLMEncoder

INPUT, OUTPUT = "input_ids", "embedding"
INVALID_REQUEST_PREFIX = "invalid request: "


def split_rows(ids: np.ndarray, vocab_size: int) -> list[list[int]]:
    """The token rows of one request's [n, L] input_ids, padding (trailing 0s) removed; ValueError says what is
    wrong with them."""
    if ids.ndim != 2 or ids.shape[0] < 1:
        raise ValueError(f"input_ids must be [n, L] with n >= 1, got shape {list(ids.shape)}")
    if ids.shape[1] > MAX_TOKENS:
        raise ValueError(f"input_ids rows are {ids.shape[1]} tokens long; the model reads at most {MAX_TOKENS}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must be in [0, {vocab_size}), the model's vocabulary")
    rows = []
    for index, row in enumerate(ids.tolist()):
        while row and row[-1] == 0:
            row.pop()
        if not row:
            raise ValueError(f"input_ids row {index} holds no tokens")
        rows.append(row)
    return rows


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        threads = int(parameters.get("ort_threads", {}).get("string_value", "2"))
        encoder = MiniLMEncoder(model_dir())
        self._vocab_size = int(encoder.word.shape[0])
        # The numpy encoder's weights are copied into the graph; only the onnxruntime session is kept.
        self._encoder = OnnxMiniLMEncoder(encoder, threads)

    def execute(self, requests: list[Any]) -> list[Any]:
        rows: list[list[int]] = []
        spans: list[tuple[int, int] | str] = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy()
            try:
                request_rows = split_rows(np.asarray(ids, dtype=np.int64), self._vocab_size)
            except ValueError as exc:
                spans.append(str(exc))
                continue
            spans.append((len(rows), len(rows) + len(request_rows)))
            rows.extend(request_rows)
        vectors = self._encoder.encode_ids(*pad_batch(rows)) if rows else np.zeros((0, DIM), dtype=np.float32)
        responses = []
        for span in spans:
            if isinstance(span, str):
                error = pb_utils.TritonError(INVALID_REQUEST_PREFIX + span, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                tensor = pb_utils.Tensor(OUTPUT, np.ascontiguousarray(vectors[span[0] : span[1]], dtype=np.float32))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self) -> None:
        self._encoder = None  # type: ignore[assignment]
