"""Checkpoint -> DecoderWeights (graph.py's fused layout) for each weight format a variant can be built with.

Formats:
  fp32   every weight dequantized to fp32 (MatMul): the numerical reference of the served model.
  gguf   the GGUF's own blocks, unchanged where MatMulNBits can hold them: Q4_1 and Q4_K -> 4-bit blocks (+ per-
         block offsets), Q5_0 and Q8_0 -> 8-bit blocks; F32/F16 linears stay fp32; other block types (Q6_K, ...)
         are dequantized and re-quantized to 8-bit blocks of 32. So the quantized variant computes with the
         weights llama.cpp uses for the same file (exactly, but for those re-quantized blocks).
  q8     every linear re-quantized to 8-bit blocks of 32 (for fp32 checkpoints such as Hugging Face ones).
  q4     every linear re-quantized to 4-bit blocks of 32 (asymmetric, integer zero points): half the bytes per
         token of q8, for the single-stream speed of larger models; the embedding table stays 8-bit.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np

from triton_models.gguf_loader import Float32Array, LlamaConfig, read_config
from triton_models.graph import (
    DecoderWeights,
    Linear,
    QuantizedLinear,
    concat_rows,
    from_gguf_q4_1,
    from_gguf_q4_k,
    from_gguf_q5_0,
    from_gguf_q8_0,
    quantize_blockwise,
    widen_to_8_bits,
)

WeightFormat = Literal["fp32", "gguf", "q8", "q4"]
FORMATS: tuple[WeightFormat, ...] = ("fp32", "gguf", "q8", "q4")


def _assemble(
    cfg: LlamaConfig,
    get: Any,
    linear: Any,
    head: Linear,
    embedding: Float32Array | QuantizedLinear,
    interleaved: bool,
) -> DecoderWeights:
    n = cfg.n_layers
    extra: dict[str, Any] = {}
    if cfg.qk_norm:
        extra["q_norm"] = [get(f"blk.{i}.attn_q_norm.weight") for i in range(n)]
        extra["k_norm"] = [get(f"blk.{i}.attn_k_norm.weight") for i in range(n)]
    if cfg.gemma:
        extra["post_attn_norm"] = [get(f"blk.{i}.post_attention_norm.weight") for i in range(n)]
        extra["post_ffn_norm"] = [get(f"blk.{i}.post_ffw_norm.weight") for i in range(n)]
    if cfg.qkv_bias:
        extra["qkv_bias"] = [
            np.concatenate([get(f"blk.{i}.attn_{x}.bias") for x in ("q", "k", "v")]).astype(np.float32)
            for i in range(n)
        ]
    return DecoderWeights(
        config=cfg,
        embedding=embedding,
        head=head,
        final_norm=get("output_norm.weight"),
        attn_norm=[get(f"blk.{i}.attn_norm.weight") for i in range(n)],
        qkv=[concat_rows([linear(f"blk.{i}.attn_{x}.weight") for x in ("q", "k", "v")]) for i in range(n)],
        o=[linear(f"blk.{i}.attn_output.weight") for i in range(n)],
        ffn_norm=[get(f"blk.{i}.ffn_norm.weight") for i in range(n)],
        gate_up=[concat_rows([linear(f"blk.{i}.ffn_{x}.weight") for x in ("gate", "up")]) for i in range(n)],
        down=[linear(f"blk.{i}.ffn_down.weight") for i in range(n)],
        rope_interleaved=interleaved,
        **extra,
    )


def from_gguf(path: Path, fmt: WeightFormat) -> DecoderWeights:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    cfg = read_config(reader)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> Float32Array:
        t = tensors[name]
        return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

    def linear(name: str) -> Linear:
        t = tensors[name]
        n, k = int(t.shape[1]), int(t.shape[0])
        kind = t.tensor_type.name
        if fmt == "fp32" or kind in ("F32", "F16", "BF16"):
            return get(name)
        if fmt == "gguf" and kind in _EXACT:
            return _EXACT[kind](t.data, n, k)
        return requantize(name, 4 if fmt == "q4" else 8)

    def requantize(name: str, bits: int) -> QuantizedLinear:
        """Dequantize and re-quantize a few thousand rows at a time: a 152k-row head never exists in fp32."""
        t = tensors[name]
        rows = t.data.reshape(int(t.shape[1]), -1)
        parts = [
            quantize_blockwise(np.asarray(dequantize(rows[i : i + _ROWS], t.tensor_type), dtype=np.float32), bits)
            for i in range(0, rows.shape[0], _ROWS)
        ]
        return concat_rows(parts)  # type: ignore[arg-type, return-value]

    def table(name: str) -> QuantizedLinear:
        """An embedding table the graph looks rows up in: 8-bit blocks (exact for the GGUF block types above)."""
        t = tensors[name]
        if t.tensor_type.name in _EXACT:
            exact = _EXACT[t.tensor_type.name](t.data, int(t.shape[1]), int(t.shape[0]))
            if exact.zero_points.dtype == np.uint8:
                return widen_to_8_bits(exact)
        return requantize(name, 8)

    head_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
    embedding: Float32Array | QuantizedLinear
    head: Linear
    big_vocab = cfg.vocab_size * cfg.d_model >= _LOOKUP_TABLE_ELEMENTS
    if fmt != "fp32" and cfg.tied_embeddings and big_vocab:
        # Gemma's 262k x 640: one 8-bit table serves lookup and head (an fp32 copy for the lookup alone is 671 MB).
        head = table(head_name)
        embedding = head
    elif fmt != "fp32" and big_vocab:
        # Qwen's 152k-row table: looked up from its (exact) 8-bit blocks, not an fp32 copy (0.5-0.9 GB).
        embedding = table("token_embd.weight")
        # The head decides every token: q4 keeps it in 8 bits, as llama.cpp's 4-bit files keep it in 6 or 8.
        head = table(head_name) if fmt == "q4" else linear(head_name)
    else:
        embedding = get("token_embd.weight")
        head = embedding if fmt == "fp32" and cfg.tied_embeddings else linear(head_name)
    # GGUF Llama Q/K rows are permuted for adjacent-pair RoPE; Gemma's and Qwen's are stored as trained
    # (rotate-half, llama.cpp's NEOX RoPE).
    return _assemble(cfg, get, linear, head, embedding, interleaved=cfg.arch == "llama")


# GGUF block types repacked exactly (graph.py's from_gguf_*); others are dequantized and re-quantized to 8 bits.
_EXACT = {"Q4_1": from_gguf_q4_1, "Q4_K": from_gguf_q4_k, "Q5_0": from_gguf_q5_0, "Q8_0": from_gguf_q8_0}
_ROWS = 4096
# Embedding tables at least this large are looked up from 8-bit blocks in the served graph (not fp32).
_LOOKUP_TABLE_ELEMENTS = 64_000_000



# ---- Hugging Face Llama-family checkpoints (config.json + *.safetensors) -------------------------------------

_HF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Hugging Face model types the builder reads, and the architecture each is (gguf_loader.LlamaConfig.arch).
_HF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _read_safetensors(path: Path) -> dict[str, Float32Array]:
    """Minimal safetensors reader (8-byte header size, JSON header, raw little-endian data) -> fp32 arrays."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    (size,) = struct.unpack("<Q", bytes(raw[:8]))
    header = json.loads(bytes(raw[8 : 8 + size]))
    out: dict[str, Float32Array] = {}
    base = 8 + size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = raw[base + start : base + end]
        dtype = info["dtype"]
        if dtype == "BF16":
            array = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in ("F16", "F32"):
            array = data.view(np.float16 if dtype == "F16" else np.float32).astype(np.float32)
        else:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        out[name] = np.ascontiguousarray(array.reshape(info["shape"]))
    return out


def hf_config(directory: Path) -> LlamaConfig:
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") not in _HF_ARCHITECTURES:
        raise ValueError(
            f"{directory}: model_type {raw.get('model_type')!r} is not supported "
            f"(supported: {', '.join(_HF_ARCHITECTURES)})"
        )
    if raw.get("rope_scaling"):
        raise ValueError(f"{directory}: RoPE scaling ({raw['rope_scaling']}) is not supported yet")
    d_model = int(raw["hidden_size"])
    n_heads = int(raw["num_attention_heads"])
    return LlamaConfig(
        n_layers=int(raw["num_hidden_layers"]),
        d_model=d_model,
        ffn_dim=int(raw["intermediate_size"]),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads", n_heads)),
        head_dim=int(raw.get("head_dim", d_model // n_heads)),
        rope_base=float(raw.get("rope_theta", 10000.0)),
        rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
        vocab_size=int(raw["vocab_size"]),
        context_length=int(raw.get("max_position_embeddings", 2048)),
        tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
        arch=_HF_ARCHITECTURES[raw["model_type"]],
    )


def from_hf(directory: Path, fmt: WeightFormat) -> DecoderWeights:
    """A local Hugging Face Llama, Mistral, Qwen2 or Qwen3 checkpoint (rotate-half RoPE layout; Qwen2's Q/K/V
    biases and Qwen3's q/k norms are read by their HF names)."""
    cfg = hf_config(directory)
    tensors: dict[str, Float32Array] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(_read_safetensors(file))
    if not tensors:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")

    def hf_name(name: str) -> str:
        if name == "token_embd.weight":
            return "model.embed_tokens.weight"
        if name == "output_norm.weight":
            return "model.norm.weight"
        if name == "output.weight":
            return "lm_head.weight"
        _, layer, kind, suffix = name.split(".")
        return f"model.layers.{layer}.{_HF_NAMES[kind]}.{suffix}"

    def get(name: str) -> Float32Array:
        return tensors[hf_name(name)]

    def linear(name: str) -> Linear:
        weight = get(name)
        return weight if fmt == "fp32" else quantize_blockwise(weight, 8)

    embedding = get("token_embd.weight")
    if cfg.tied_embeddings:
        head: Linear = embedding if fmt == "fp32" else quantize_blockwise(embedding, 8)
    else:
        head = linear("output.weight")
    return _assemble(cfg, get, linear, head, embedding, interleaved=False)
