"""Qwen2 and Qwen3 through the whole builder path on tiny random checkpoints, against the plain PyTorch reference.

Each test writes a real GGUF file (gguf's writer, the same metadata keys and tensor names llama.cpp's converter
writes), builds it with weights.from_gguf + graph.build_graph, and runs the graph the way the engine does: one
prefill, and token by token through the KV cache. Qwen2: biases on Q/K/V, rotate-half RoPE (llama.cpp's NEOX
mode for this architecture), untied head, Q5_0 / Q8_0 blocks repacked exactly. Qwen3: q/k RMS norms, a head size
that is not d_model / n_heads, no biases.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as QType

from triton_models import weights as weights_module
from triton_models.gguf_loader import LlamaConfig, load_gguf
from triton_models.graph import (
    DecoderWeights,
    build_graph,
    concat_rows,
    from_gguf_q4_k,
    from_gguf_q5_0,
    quantize_blockwise,
    widen_to_8_bits,
    write_graph,
)
from triton_models.weights import from_gguf

torch = pytest.importorskip("torch")

QWEN2 = LlamaConfig(
    n_layers=2,
    d_model=64,
    ffn_dim=128,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    rope_base=1_000_000.0,
    rms_eps=1e-6,
    vocab_size=96,
    context_length=64,
    tied_embeddings=False,
    arch="qwen2",
)
# Head size 32 with 4 heads on a 64-wide model: q projects up to 128, o back down to 64.
QWEN3 = replace(QWEN2, arch="qwen3", head_dim=32, n_kv_heads=1)


def _random_tensors(cfg: LlamaConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def lin(out: int, inp: int) -> np.ndarray:
        return rng.normal(0, 0.1, (out, inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.normal(0, 0.2, n)).astype(np.float32)

    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    w = {
        "token_embd.weight": rng.normal(0, 0.3, (cfg.vocab_size, cfg.d_model)).astype(np.float32),
        "output_norm.weight": norm(cfg.d_model),
        "output.weight": lin(cfg.vocab_size, cfg.d_model),
    }
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        w |= {
            p + "attn_norm.weight": norm(cfg.d_model),
            p + "attn_q.weight": lin(q_dim, cfg.d_model),
            p + "attn_k.weight": lin(kv_dim, cfg.d_model),
            p + "attn_v.weight": lin(kv_dim, cfg.d_model),
            p + "attn_output.weight": lin(cfg.d_model, q_dim),
            p + "ffn_norm.weight": norm(cfg.d_model),
            p + "ffn_gate.weight": lin(cfg.ffn_dim, cfg.d_model),
            p + "ffn_up.weight": lin(cfg.ffn_dim, cfg.d_model),
            p + "ffn_down.weight": lin(cfg.d_model, cfg.ffn_dim),
        }
        if cfg.qkv_bias:
            # Qwen's biases are large next to its weights (k's especially): a dropped bias shows at once.
            w |= {
                p + "attn_q.bias": rng.normal(0, 0.5, q_dim).astype(np.float32),
                p + "attn_k.bias": rng.normal(0, 1.0, kv_dim).astype(np.float32),
                p + "attn_v.bias": rng.normal(0, 0.5, kv_dim).astype(np.float32),
            }
        if cfg.qk_norm:
            w |= {p + "attn_q_norm.weight": norm(cfg.head_dim), p + "attn_k_norm.weight": norm(cfg.head_dim)}
    return w


def write_gguf(path: Path, cfg: LlamaConfig, tensors: dict[str, np.ndarray], types: dict[str, QType]) -> None:
    """A GGUF as llama.cpp's converter lays it out for `cfg.arch`; `types` quantizes the tensors it names."""
    writer = GGUFWriter(str(path), cfg.arch)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.arch == "qwen3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    writer.add_token_types([1] * cfg.vocab_size)
    for name, array in tensors.items():
        kind = types.get(name)
        if kind is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class Session:
    """The graph run the way the engine runs it: one row, a KV buffer of fixed length, prefill then decode."""

    def __init__(self, weights: DecoderWeights) -> None:
        cfg = weights.config
        model = build_graph(weights, cfg.context_length, accuracy_level=0)
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        shape = (1, cfg.n_kv_heads, cfg.context_length, cfg.head_dim)
        self.past = {
            f"past_{k}_{i}": np.zeros(shape, np.float32) for i in range(cfg.n_layers) for k in ("key", "value")
        }
        self.length = 0

    def run(self, ids: list[int]) -> np.ndarray:
        self.length += len(ids)
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "seqlens_k": np.array([self.length - 1], np.int32),
            "total_sequence_length": np.array(self.length, np.int32),
            "logits_index": np.arange(len(ids), dtype=np.int64),
            **self.past,
        }
        names = ["logits"] + [n.replace("past", "present") for n in self.past]
        logits, *present = self.session.run(names, feeds)
        self.past = dict(zip(self.past, present, strict=True))
        return logits  # type: ignore[no-any-return]


def _quantized_types(cfg: LlamaConfig) -> dict[str, QType]:
    """Q5_0 for most linears and Q8_0 for V in every other layer, as Qwen2.5-0.5B's Q4_K_M file mixes them."""
    types = {"output.weight": QType.Q8_0, "token_embd.weight": QType.Q5_0}
    for i in range(cfg.n_layers):
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            types[f"blk.{i}.{kind}.weight"] = QType.Q5_0
        types[f"blk.{i}.attn_v.weight"] = QType.Q8_0 if i % 2 else QType.Q5_0
    return types


def _check(path: Path, fmt: str, tolerance: float) -> None:
    from triton_models.reference import ReferenceLlama

    model = load_gguf(path)  # the dequantized values: what llama.cpp computes with
    ids = [int(t) for t in np.random.default_rng(1).integers(0, model.config.vocab_size, 12)]
    expected = ReferenceLlama(model.config, model.weights).eval()(torch.tensor([ids]))[0].numpy()
    prefill = Session(from_gguf(path, fmt)).run(ids)  # type: ignore[arg-type]
    assert np.abs(prefill - expected).max() < tolerance
    session = Session(from_gguf(path, fmt))  # type: ignore[arg-type]
    rows = [session.run(ids[:5])] + [session.run([t]) for t in ids[5:]]
    assert np.abs(np.concatenate(rows) - expected).max() < tolerance


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3], ids=["qwen2", "qwen3"])
def test_fp32_graph_matches_reference_in_prefill_and_decode(cfg: LlamaConfig, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, _random_tensors(cfg, np.random.default_rng(7)), {})
    read = load_gguf(path, with_weights=False).config
    assert replace(read, rms_eps=cfg.rms_eps) == cfg and read.rms_eps == pytest.approx(cfg.rms_eps)  # stored as fp32
    _check(path, "fp32", 1e-4)


def test_qwen2_gguf_blocks_are_served_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Q5_0 and Q8_0 repacked into MatMulNBits compute with exactly the GGUF's values (fp32 accumulation here), and
    # the Q/K/V rows of different block types fuse into one linear. The embedding is looked up from its 8-bit
    # blocks, as for the real 152k-row table.
    monkeypatch.setattr(weights_module, "_LOOKUP_TABLE_ELEMENTS", 0)
    path = tmp_path / "tiny-q.gguf"
    write_gguf(path, QWEN2, _random_tensors(QWEN2, np.random.default_rng(8)), _quantized_types(QWEN2))
    _check(path, "gguf", 1e-3)


def test_other_block_types_are_requantized_to_8_bits(tmp_path: Path) -> None:
    # Q4_0 is not repacked as it is: dequantized and re-quantized to 8-bit blocks, a few thousand rows at a time.
    path = tmp_path / "tiny-q4_0.gguf"
    types = _quantized_types(QWEN2) | {"blk.1.attn_output.weight": QType.Q4_0, "output.weight": QType.Q4_0}
    write_gguf(path, QWEN2, _random_tensors(QWEN2, np.random.default_rng(9)), types)
    weights = from_gguf(path, "gguf")
    assert not isinstance(weights.o[1], np.ndarray) and weights.o[1].bits == 8
    _check(path, "gguf", 2e-2)


def test_a_dropped_bias_or_interleaved_rope_would_be_caught(tmp_path: Path) -> None:
    # The checks above have teeth: each Qwen2 difference from Llama changes the logits well beyond the tolerance.
    from triton_models.reference import ReferenceLlama

    path = tmp_path / "tiny.gguf"
    write_gguf(path, QWEN2, _random_tensors(QWEN2, np.random.default_rng(7)), {})
    model = load_gguf(path)
    ids = [3, 14, 15, 9, 26, 5, 35]
    expected = ReferenceLlama(model.config, model.weights).eval()(torch.tensor([ids]))[0].numpy()
    no_bias = from_gguf(path, "fp32")
    no_bias = replace(no_bias, qkv_bias=None)
    assert np.abs(Session(no_bias).run(ids) - expected).max() > 1e-2
    interleaved = replace(from_gguf(path, "fp32"), rope_interleaved=True)
    assert np.abs(Session(interleaved).run(ids) - expected).max() > 1e-2


def _random_blocks(rng: np.random.Generator, n_blocks: int, size: int, fp16_at: tuple[int, ...]) -> np.ndarray:
    """Random GGUF blocks whose fp16 scale fields are finite (random bytes could be NaN or inf)."""
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for start in fp16_at:
        raw[:, start : start + 2] = rng.uniform(-0.05, 0.05, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


def test_q4_k_repacking_is_exact() -> None:
    n, k = 6, 512
    raw = _random_blocks(np.random.default_rng(2), n * k // 256, 144, (0, 2)).reshape(n, -1)
    expected = quants.dequantize(raw, QType.Q4_K)
    repacked = from_gguf_q4_k(raw, n, k)
    assert repacked.bits == 4 and repacked.offsets is not None
    np.testing.assert_allclose(repacked.dequantize(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(widen_to_8_bits(repacked).dequantize(), expected, rtol=0, atol=1e-6)


def test_q5_0_repacking_is_exact() -> None:
    n, k = 5, 96
    raw = _random_blocks(np.random.default_rng(3), n * k // 32, 22, (0,)).reshape(n, -1)
    expected = quants.dequantize(raw, QType.Q5_0)
    repacked = from_gguf_q5_0(raw, n, k)
    assert repacked.bits == 8
    np.testing.assert_allclose(repacked.dequantize(), expected, rtol=0, atol=1e-6)


def test_rows_of_4_and_8_bits_fuse_exactly() -> None:
    rng = np.random.default_rng(4)
    q = from_gguf_q4_k(_random_blocks(rng, 4, 144, (0, 2)).reshape(4, -1), 4, 256)
    v = quantize_blockwise(rng.normal(0, 0.1, (2, 256)).astype(np.float32), 8)
    fused = concat_rows([q, v])
    assert not isinstance(fused, np.ndarray) and fused.bits == 8
    np.testing.assert_allclose(fused.dequantize(), np.concatenate([q.dequantize(), v.dequantize()]), atol=1e-6)


def test_quantizing_in_row_chunks_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_models import graph

    weight = np.random.default_rng(5).normal(0, 0.1, (10, 64)).astype(np.float32)
    whole = quantize_blockwise(weight, 4)
    monkeypatch.setattr(graph, "_QUANTIZE_ROWS", 3)
    chunked = quantize_blockwise(weight, 4)
    np.testing.assert_array_equal(chunked.packed, whole.packed)
    np.testing.assert_array_equal(chunked.zero_points, whole.zero_points)
    np.testing.assert_array_equal(chunked.scales, whole.scales)


def test_a_graph_written_to_disk_streams_its_weights_and_computes_the_same(tmp_path: Path) -> None:
    path = tmp_path / "tiny-q.gguf"
    write_gguf(path, QWEN2, _random_tensors(QWEN2, np.random.default_rng(8)), _quantized_types(QWEN2))
    weights = from_gguf(path, "gguf")
    write_graph(weights, QWEN2.context_length, tmp_path / "model.onnx", accuracy_level=0)
    assert (tmp_path / "model.onnx").stat().st_size < 50_000 < (tmp_path / "model.onnx.data").stat().st_size
    on_disk = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    in_memory = Session(weights).session
    shape = (1, QWEN2.n_kv_heads, QWEN2.context_length, QWEN2.head_dim)
    feeds = {
        "input_ids": np.array([[5, 6, 7]], np.int64),
        "seqlens_k": np.array([2], np.int32),
        "total_sequence_length": np.array(3, np.int32),
        "logits_index": np.arange(3, dtype=np.int64),
    } | {f"past_{k}_{i}": np.zeros(shape, np.float32) for i in range(QWEN2.n_layers) for k in ("key", "value")}
    np.testing.assert_array_equal(on_disk.run(["logits"], feeds)[0], in_memory.run(["logits"], feeds)[0])


_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3], ids=["qwen2", "qwen3"])
def test_hugging_face_qwen_checkpoint_matches_the_reference(cfg: LlamaConfig, tmp_path: Path) -> None:
    # Qwen's GGUF rows are the Hugging Face rows (no RoPE permutation), so the same tensors under HF names must give
    # the reference's logits: biases (Qwen2) and q/k norms (Qwen3) read by their HF names.
    import json

    from tests.unit.test_graph import _write_safetensors
    from triton_models.reference import ReferenceLlama
    from triton_models.weights import from_hf

    tensors = _random_tensors(cfg, np.random.default_rng(11))
    hf = {
        "model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
        "lm_head.weight": tensors["output.weight"],
    }
    for name, array in tensors.items():
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            hf[f"model.layers.{layer}.{_HF[rest]}"] = array
    _write_safetensors(tmp_path / "model.safetensors", hf)
    config = {
        "model_type": cfg.arch,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.n_layers,
        "rope_theta": cfg.rope_base,
        "rms_norm_eps": cfg.rms_eps,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "tie_word_embeddings": False,
        "rope_scaling": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = from_hf(tmp_path, "fp32")
    assert weights.config == cfg and (weights.qkv_bias is not None) == cfg.qkv_bias
    ids = [4, 8, 15, 16, 23, 42, 7, 1]
    expected = ReferenceLlama(cfg, tensors).eval()(torch.tensor([ids]))[0].numpy()
    assert np.abs(Session(weights).run(ids) - expected).max() < 1e-4
