"""A row's logits and K/V do not depend on how many tokens share its call once the call has at least two rows, so
greedy speculative decoding (verification with S = k + 1) is exactly plain greedy decoding when a lone step runs as
its token plus a throwaway copy (S = 2, what ModelRunner does for speculative targets). A call of one row does
not compute the same: onnxruntime's M = 1 kernels (GEMM; MatMulNBits' GEMV on AVX2 CPUs) round differently. The
control cases show the check has teeth."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort

from tests.unit.test_graph import CFG, _random_gguf_layout
from triton_models.graph import build_graph, quantize_blockwise


def _session(qweights: bool, pad: bool = True) -> ort.InferenceSession:
    weights = _random_gguf_layout(np.random.default_rng(3))
    if qweights:  # the serving path: MatMulNBits with int8 activations
        weights = replace(
            weights,
            qkv=[quantize_blockwise(np.asarray(w), 4) for w in weights.qkv],
            o=[quantize_blockwise(np.asarray(w), 4) for w in weights.o],
            gate_up=[quantize_blockwise(np.asarray(w), 4) for w in weights.gate_up],
            down=[quantize_blockwise(np.asarray(w), 4) for w in weights.down],
        )
    model = build_graph(weights, CFG.context_length, pad_single_row=pad)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _call(
    session: ort.InferenceSession, ids: list[int], seqlen: int, kv: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    feeds = {
        "input_ids": np.array([ids], np.int64),
        "seqlens_k": np.array([seqlen], np.int32),
        "total_sequence_length": np.array(seqlen + 1, np.int32),
        "logits_index": np.arange(len(ids), dtype=np.int64),
        **kv,
    }
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds), strict=True))
    return out["logits"], {k.replace("present", "past"): v for k, v in out.items() if k.startswith("present")}


def _together_and_apart(
    session: ort.InferenceSession, runner_pad: bool = True
) -> tuple[np.ndarray, np.ndarray, dict, dict, int]:  # type: ignore[type-arg]
    buffer = {
        f"past_{kind}_{i}": np.zeros((1, CFG.n_kv_heads, 32, CFG.head_dim), np.float32)
        for i in range(CFG.n_layers)
        for kind in ("key", "value")
    }
    prompt, new = [5, 17, 3, 40, 8, 9, 60, 2], [11, 70, 33, 4, 90]
    _, kv = _call(session, prompt, len(prompt) - 1, buffer)
    together, kv_together = _call(session, new, len(prompt) + 4, {k: v.copy() for k, v in kv.items()})
    apart = []
    for j, token in enumerate(new):
        if runner_pad:  # the token and its throwaway copy, whose K/V land one past the row (scratch)
            logits, kv = _call(session, [token, token], len(prompt) + j + 1, kv)
        else:
            logits, kv = _call(session, [token], len(prompt) + j, kv)
        apart.append(logits[0])
    return together, np.stack(apart), kv_together, kv, len(prompt) + len(new)


def test_without_padding_a_single_row_step_computes_differently() -> None:
    together, apart, _, _, _ = _together_and_apart(_session(qweights=False, pad=False), runner_pad=False)
    assert not np.array_equal(together, apart)


def test_one_call_of_five_tokens_equals_five_padded_calls_of_one_bitwise() -> None:
    for qweights in (False, True):
        together, apart, kv_together, kv, end = _together_and_apart(_session(qweights, pad=False))
        assert np.array_equal(together, apart)
        assert all(np.array_equal(kv_together[k][:, :, :end], kv[k][:, :, :end]) for k in kv)
