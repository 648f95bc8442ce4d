"""One graph call over a contiguous range of KV slots: the `Runner` protocol the scheduler depends on, and
`ModelRunner`, its onnxruntime implementation (IOBinding; bindings cached per slot range)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from llmesh.model_artifact import ModelMetadata
from triton_models.engine.kv_pool import KVPool

MODEL_FILE = "model.onnx"

Int64Array = npt.NDArray[np.int64]
Int32Array = npt.NDArray[np.int32]
Float32Array = npt.NDArray[np.float32]


class Runner(Protocol):
    """The decoder graph (contract in graph.py) over the KV slots of `pool`.

    `forward` runs ids [B, S] for slots slot0..slot0+B-1, writing their K/V into the pool in place; seqlens_k is
    the tokens per row after the call - 1 (S == seqlens_k + 1 for every row means a first, right-padded prompt),
    logits_index picks the flattened [B * S] positions whose logits come back ([len(logits_index), vocab]).
    It may raise; the scheduler then fails the requests whose rows were in the call."""

    @property
    def metadata(self) -> ModelMetadata: ...

    @property
    def pool(self) -> KVPool: ...

    def forward(self, slot0: int, ids: Int64Array, seqlens_k: Int32Array, logits_index: Int64Array) -> Float32Array: ...


class ModelRunner:
    """Runs the decoder graph (contract in graph.py) over a contiguous range of KV slots with onnxruntime."""

    def __init__(
        self, session: ort.InferenceSession, metadata: ModelMetadata, pool: KVPool, pad_single_row: bool = False
    ) -> None:
        self.session = session
        self.metadata = metadata
        self.pool = pool
        # Set for targets of speculative decoding: a lone one-token step runs as two rows (see forward).
        self.pad_single_row = pad_single_row
        names = {i.name for i in session.get_inputs()}
        expected = 4 + 2 * metadata.num_layers
        if len(names) != expected or "logits_index" not in names:
            raise ValueError(f"model graph has inputs {sorted(names)[:6]}..., not the contract of graph.py")
        self._bindings: OrderedDict[tuple[int, int], ort.IOBinding] = OrderedDict()

    @staticmethod
    def session_for(version_dir: Path, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # graph calls are sequential: parallelism is inside each op
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Intra-op threads spin between the ~300 small ops of one decode step (waking a sleeping thread per op
        # made a single-stream step ~1.4x slower), and stop spinning when the call returns: between steps the
        # cores belong to the router, gateway and Envoy that share them with tritonserver.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(str(version_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"])

    def _binding(self, slot0: int, rows: int) -> ort.IOBinding:
        key = (slot0, rows)
        binding = self._bindings.get(key)
        if binding is not None:
            self._bindings.move_to_end(key)
            return binding
        binding = self.session.io_binding()
        pool = self.pool
        shape = [rows, self.metadata.num_kv_heads, pool.capacity, self.metadata.head_dim]
        for i, array in enumerate(pool.arrays):
            name = f"{'key' if i % 2 == 0 else 'value'}_{i // 2}"
            pointer = array.ctypes.data + slot0 * array.strides[0]
            binding.bind_input(f"past_{name}", "cpu", 0, np.float32, shape, pointer)
            binding.bind_output(f"present_{name}", "cpu", 0, np.float32, shape, pointer)
        self._bindings[key] = binding
        if len(self._bindings) > 256:
            self._bindings.popitem(last=False)
        return binding

    def forward(self, slot0: int, ids: Int64Array, seqlens_k: Int32Array, logits_index: Int64Array) -> Float32Array:
        """ids [B, S] for slots slot0..slot0+B-1; seqlens_k = tokens per row after this call - 1."""
        if self.pad_single_row and ids.shape == (1, 1) and 1 <= int(seqlens_k[0]) < self.pool.capacity - 1:
            # A lone decode step runs as the token plus a throwaway copy (S = 2): onnxruntime's CPU kernels for a
            # single row (GEMM with M = 1, MatMulNBits' GEMV on AVX2) round differently from those for more rows,
            # so without this a plain step would not compute exactly what speculative verification (S = k + 1)
            # computes, and greedy speculative decoding would not be exactly greedy. The copy's K/V land one
            # position past the row's end, scratch the next token overwrites; logits_index still picks the row.
            ids = np.repeat(ids, 2, axis=1)
            seqlens_k = seqlens_k + 1
        binding = self._binding(slot0, ids.shape[0])
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens_k, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(int(seqlens_k.max()) + 1, dtype=np.int32))
        binding.bind_cpu_input("logits_index", np.ascontiguousarray(logits_index, dtype=np.int64))
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        logits: Float32Array = binding.get_outputs()[-1].numpy()
        return logits
