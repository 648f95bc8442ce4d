"""graph.py and weights.py on a tiny random Llama: weight packing, and the GGUF vs Hugging Face layouts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort

from triton_models.gguf_loader import LlamaConfig
from triton_models.graph import (
    DecoderWeights,
    build_graph,
    concat_rows,
    from_gguf_q4_1,
    from_gguf_q8_0,
    quantize_blockwise,
)
from triton_models.weights import from_hf

CFG = LlamaConfig(
    n_layers=2,
    d_model=64,
    ffn_dim=128,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    rope_base=10000.0,
    rms_eps=1e-5,
    vocab_size=96,
    context_length=64,
    tied_embeddings=True,
)


def test_q4_1_and_q8_0_repacking_is_exact() -> None:
    rng = np.random.default_rng(0)
    n, k = 8, 64
    # Q4_1 block: fp16 d, fp16 m, 16 bytes of nibbles (element j low, j + 16 high).
    d = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16)
    m = rng.uniform(-0.5, 0.0, (n, k // 32)).astype(np.float16)
    q = rng.integers(0, 16, (n, k // 32, 32)).astype(np.uint8)
    raw = np.concatenate(
        [d.view(np.uint8).reshape(n, -1, 2), m.view(np.uint8).reshape(n, -1, 2), q[..., :16] | (q[..., 16:] << 4)],
        axis=2,
    )
    expected = (d.astype(np.float32)[..., None] * q + m.astype(np.float32)[..., None]).reshape(n, k)
    assert np.allclose(from_gguf_q4_1(raw.reshape(n, -1), n, k).dequantize(), expected, atol=1e-6)
    # Q8_0 block: fp16 d, 32 int8.
    q8 = rng.integers(-127, 128, (n, k // 32, 32)).astype(np.int8)
    raw8 = np.concatenate([d.view(np.uint8).reshape(n, -1, 2), q8.view(np.uint8)], axis=2)
    expected8 = (d.astype(np.float32)[..., None] * q8).reshape(n, k)
    assert np.allclose(from_gguf_q8_0(raw8.reshape(n, -1), n, k).dequantize(), expected8, atol=1e-6)
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    assert np.abs(quantize_blockwise(w, 8).dequantize() - w).max() < 0.2 / 255 * 2


def _random_gguf_layout(rng: np.random.Generator) -> DecoderWeights:
    def lin(out: int, inp: int) -> np.ndarray:
        return rng.normal(0, 0.08, (out, inp)).astype(np.float32)

    c = CFG
    emb = rng.normal(0, 0.5, (c.vocab_size, c.d_model)).astype(np.float32)
    qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    norm = [
        np.ones(c.d_model, np.float32) + rng.normal(0, 0.1, c.d_model).astype(np.float32) for _ in range(3 * c.n_layers)
    ]
    return DecoderWeights(
        config=c,
        embedding=emb,
        head=emb,
        final_norm=norm[-1],
        attn_norm=norm[: c.n_layers],
        qkv=[concat_rows([lin(qd, c.d_model), lin(kvd, c.d_model), lin(kvd, c.d_model)]) for _ in range(c.n_layers)],
        o=[lin(c.d_model, qd) for _ in range(c.n_layers)],
        ffn_norm=norm[c.n_layers : 2 * c.n_layers],
        gate_up=[lin(2 * c.ffn_dim, c.d_model) for _ in range(c.n_layers)],
        down=[lin(c.d_model, c.ffn_dim) for _ in range(c.n_layers)],
        rope_interleaved=True,
    )


def _to_rotate_half(w: np.ndarray, heads: int, hd: int) -> np.ndarray:
    """GGUF adjacent-pair rows -> HF rotate-half rows (per head: even rows first, then odd rows)."""
    w = w.reshape(heads, hd, -1)
    return np.concatenate([w[:, 0::2], w[:, 1::2]], axis=1).reshape(heads * hd, -1)


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _logits(weights: DecoderWeights, ids: list[int]) -> np.ndarray:
    model = build_graph(weights, CFG.context_length, accuracy_level=0)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    n = len(ids)
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([ids], np.int64),
        "seqlens_k": np.array([n - 1], np.int32),
        "total_sequence_length": np.array(n, np.int32),
        "logits_index": np.arange(n, dtype=np.int64),
    }
    for i in range(CFG.n_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((1, CFG.n_kv_heads, n, CFG.head_dim), np.float32)
    return session.run(["logits"], feeds)[0]  # type: ignore[no-any-return]


def write_hf_checkpoint(directory: Path, gguf: DecoderWeights, **config: object) -> None:
    """The weights of a GGUF-layout random Llama as a Hugging Face checkpoint (rotate-half Q/K rows, HF names,
    config.json; `config` adds or overrides config.json keys)."""
    c = CFG
    qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    tensors = {"model.embed_tokens.weight": gguf.embedding, "model.norm.weight": gguf.final_norm}
    for i in range(c.n_layers):
        qkv, gate_up = gguf.qkv[i], gguf.gate_up[i]
        assert isinstance(qkv, np.ndarray) and isinstance(gate_up, np.ndarray)
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": gguf.attn_norm[i],
            p + "self_attn.q_proj.weight": _to_rotate_half(qkv[:qd], c.n_heads, c.head_dim),
            p + "self_attn.k_proj.weight": _to_rotate_half(qkv[qd : qd + kvd], c.n_kv_heads, c.head_dim),
            p + "self_attn.v_proj.weight": qkv[qd + kvd :],
            p + "self_attn.o_proj.weight": gguf.o[i],  # type: ignore[dict-item]
            p + "post_attention_layernorm.weight": gguf.ffn_norm[i],
            p + "mlp.gate_proj.weight": gate_up[: c.ffn_dim],
            p + "mlp.up_proj.weight": gate_up[c.ffn_dim :],
            p + "mlp.down_proj.weight": gguf.down[i],  # type: ignore[dict-item]
        }
    directory.mkdir(parents=True, exist_ok=True)
    _write_safetensors(directory / "model.safetensors", tensors)
    settings = {
        "model_type": "llama",
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_dim,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "num_hidden_layers": c.n_layers,
        "rope_theta": c.rope_base,
        "rms_norm_eps": c.rms_eps,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "tie_word_embeddings": True,
    }
    (directory / "config.json").write_text(json.dumps(settings | config))


def test_hugging_face_checkpoint_gives_the_same_logits_as_the_gguf_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gguf = _random_gguf_layout(rng)
    c = CFG
    write_hf_checkpoint(tmp_path, gguf)
    ids = [int(t) for t in rng.integers(0, c.vocab_size, 12)]
    expected = _logits(gguf, ids)
    hf = from_hf(tmp_path, "fp32")
    assert not hf.rope_interleaved
    assert np.abs(_logits(hf, ids) - expected).max() < 1e-4
    # The 8-bit re-quantized HF variant stays close.
    assert np.abs(_logits(from_hf(tmp_path, "q8"), ids) - expected).max() < 0.1
