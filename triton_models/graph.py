"""Build the serving decoder graph directly with onnx.helper from a Llama-family checkpoint (no torch needed).

The graph uses onnxruntime's fused contrib ops, so one decode step is ~10 kernels per layer instead of ~40:
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm + residual add), MatMulNBits (block-
quantized weights) or MatMul (fp32), GroupQueryAttention (RoPE + causal attention + KV cache write).

Graph contract (B rows, S new tokens per row, L = KV buffer length per row):

  inputs   input_ids              int64 [B, S]
           seqlens_k              int32 [B]       tokens of each row after this step, minus 1
           total_sequence_length  int32 []        max over rows of (seqlens_k + 1); must be > 1 when S == 1
           logits_index           int64 [R]       flat positions (b * S + s) whose logits are returned
           past_key_<i>           fp32 [B, n_kv, L, head_dim]   the KV buffer (rows are right-padded)
           past_value_<i>
  outputs  logits                 fp32 [R, vocab]
           present_key_<i>        fp32 [B, n_kv, L, head_dim]   bind to the SAME memory as past_key_<i>:
           present_value_<i>                                    GroupQueryAttention then writes only the new
                                                                tokens' K/V in place (no copy of the cache)

GroupQueryAttention derives RoPE positions from seqlens_k, so rows need no position input. Its CPU kernel
accepts S > 1 together with a past only for B == 1 (chunked prefill, speculative verification), and S == 1
decode steps for any B; the engine schedules accordingly. A single-row step (B == 1, S == 1) also writes scratch K/V
one position past the row's end when the buffer has it (_SingleRowPadding says why).

RoPE: GGUF Llama tensors store Q/K rows permuted so that RoPE rotates adjacent pairs (2i, 2i+1); that is
GroupQueryAttention's `rotary_interleaved=1`, so the rows are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from triton_models.gguf_loader import LlamaConfig

Float32Array = npt.NDArray[np.float32]
UInt8Array = npt.NDArray[np.uint8]

OPSET = 17
MS_DOMAIN = "com.microsoft"
BLOCK = 32  # MatMulNBits block length along K (the GGUF block length too)

WeightFormat = Literal["fp32", "q4", "q8"]


@dataclass(frozen=True)
class QuantizedLinear:
    """A [N, K] linear weight as MatMulNBits stores it: w[n, k] = (q[n, k] - zero[n, k // 32]) * scale[n, k // 32]."""

    n: int
    k: int
    bits: int
    packed: UInt8Array  # [N, K / 32, 32 * bits / 8]
    scales: Float32Array  # [N, K / 32]
    zero_points: npt.NDArray[np.generic]  # uint8 [N, K/32 * bits / 8] (packed) or float32 [N, K/32]
    # Optional per-block additive term [N, K/32]: w += offsets[n, k // 32]. GGUF Q4_1 blocks are d * q + m; the
    # kernel's fast path takes only integer zero points, so m is applied as a tiny extra matmul of per-block
    # activation sums (see _Builder.linear) and the weights stay exactly the GGUF's.
    offsets: Float32Array | None = None

    def dequantize(self) -> Float32Array:
        q = unpack(self.packed, self.bits).astype(np.float32).reshape(self.n, -1, BLOCK)
        zero: npt.NDArray[np.generic]
        if self.zero_points.dtype == np.uint8:
            packed_zero = self.zero_points.astype(np.uint8).reshape(self.n, 1, -1)
            zero = unpack(packed_zero, self.bits).reshape(self.n, -1)[:, : q.shape[1]]
        else:
            zero = self.zero_points
        w = (q - zero.astype(np.float32)[:, :, None]) * self.scales[:, :, None]
        if self.offsets is not None:
            w = w + self.offsets[:, :, None]
        return w.reshape(self.n, self.k).astype(np.float32)


def pack(values: npt.NDArray[np.integer], bits: int) -> UInt8Array:
    """Pack unsigned ints along the last axis, MatMulNBits order (4-bit: element 2j in the low nibble)."""
    v = values.astype(np.uint8)
    if bits == 8:
        return v
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: UInt8Array, bits: int) -> UInt8Array:
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


# Rows quantized at a time: the float64 temporaries of a 152k-row head stay ~100 MB instead of several GB.
_QUANTIZE_ROWS = 4096


def quantize_blockwise(weight: Float32Array, bits: int) -> QuantizedLinear:
    """Asymmetric per-block (32) quantization of a [N, K] fp32 weight (for checkpoints that are not GGUF, and GGUF
    block types MatMulNBits cannot hold)."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of {BLOCK}")
    if n > _QUANTIZE_ROWS:
        parts = [quantize_blockwise(weight[i : i + _QUANTIZE_ROWS], bits) for i in range(0, n, _QUANTIZE_ROWS)]
        return QuantizedLinear(
            n,
            k,
            bits,
            np.concatenate([p.packed for p in parts]),
            np.concatenate([p.scales for p in parts]),
            np.concatenate([p.zero_points for p in parts]),
        )
    levels = (1 << bits) - 1
    blocks = weight.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    lo = np.minimum(blocks.min(axis=2), 0.0)
    hi = np.maximum(blocks.max(axis=2), 0.0)
    scale = (hi - lo) / levels
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, levels)
    q = np.clip(np.round(blocks / scale[:, :, None] + zero[:, :, None]), 0, levels)
    zp = zero.astype(np.uint8)
    if bits == 4 and zp.shape[1] % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    return QuantizedLinear(
        n, k, bits, pack(q.astype(np.uint8), bits), scale.astype(np.float32), pack(zp, bits).reshape(n, -1)
    )


def from_gguf_q4_1(raw: UInt8Array, n: int, k: int) -> QuantizedLinear:
    """Exact repacking of GGUF Q4_1 blocks (w = d * q + m, 4-bit q) into MatMulNBits with float zero points
    (zero = -m / d), so the served weights are the GGUF's, not a re-quantization of them."""
    blocks = raw.reshape(n, k // BLOCK, 20)
    d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
    qs = blocks[:, :, 4:20]
    # ggml order: byte j holds element j (low nibble) and element j + 16 (high nibble).
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)
    zero = np.zeros((n, (k // BLOCK + 1) // 2), dtype=np.uint8)  # packed 4-bit zeros
    return QuantizedLinear(n, k, 4, pack(q, 4), d, zero, offsets=m)


def _fp16(blocks: UInt8Array, start: int) -> Float32Array:
    """The little-endian fp16 at byte `start` of every block ([..., bytes] -> [...]) as fp32."""
    return blocks[..., start : start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def from_gguf_q4_k(raw: UInt8Array, n: int, k: int) -> QuantizedLinear:
    """Exact repacking of GGUF Q4_K super-blocks (256 values: 8 sub-blocks of 32, each w = d * sc * q - dmin * m
    with 6-bit sc, m and 4-bit q) into 4-bit MatMulNBits blocks of 32: scale d * sc, zero 0, offset -dmin * m."""
    blocks = raw.reshape(n, k // 256, 144)
    d, dmin = _fp16(blocks, 0), _fp16(blocks, 2)
    packed_scales = blocks[:, :, 4:16].astype(np.uint8)
    sc = np.empty((n, k // 256, 8), np.uint8)
    m = np.empty((n, k // 256, 8), np.uint8)
    # ggml's get_scale_min_k4: sub-blocks 0-3 keep 6 bits in bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take
    # their low 4 bits from bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7.
    sc[:, :, :4] = packed_scales[:, :, 0:4] & 63
    m[:, :, :4] = packed_scales[:, :, 4:8] & 63
    sc[:, :, 4:] = (packed_scales[:, :, 8:12] & 0x0F) | ((packed_scales[:, :, 0:4] >> 6) << 4)
    m[:, :, 4:] = (packed_scales[:, :, 8:12] >> 4) | ((packed_scales[:, :, 4:8] >> 6) << 4)
    # qs: four chunks of 32 bytes; chunk j holds sub-block 2j in its low nibbles and 2j + 1 in its high nibbles.
    qs = blocks[:, :, 16:144].reshape(n, k // 256, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k // BLOCK, BLOCK)
    scales = (d[:, :, None] * sc).reshape(n, k // BLOCK).astype(np.float32)
    offsets = (-dmin[:, :, None] * m).reshape(n, k // BLOCK).astype(np.float32)
    zero = np.zeros((n, (k // BLOCK + 1) // 2), dtype=np.uint8)
    return QuantizedLinear(n, k, 4, pack(q, 4), scales, zero, offsets=offsets)


def from_gguf_q5_0(raw: UInt8Array, n: int, k: int) -> QuantizedLinear:
    """Exact repacking of GGUF Q5_0 blocks (w = d * (q - 16), 5-bit q) into 8-bit MatMulNBits (q, zero 16)."""
    blocks = raw.reshape(n, k // BLOCK, 22)
    d = _fp16(blocks, 0)
    high = blocks[:, :, 2:6].copy().view("<u4")[:, :, 0]  # bit j = high bit of element j
    bits = ((high[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    qs = blocks[:, :, 6:22]
    # ggml order: byte j holds element j (low nibble) and element j + 16 (high nibble).
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2) | (bits << 4)
    zp = np.full((n, k // BLOCK), 16, dtype=np.uint8)
    return QuantizedLinear(n, k, 8, q.astype(np.uint8), d, zp)


def widen_to_8_bits(weight: QuantizedLinear) -> QuantizedLinear:
    """The same values in 8-bit blocks (exact): lets a 4-bit weight join 8-bit rows, or serve as a lookup table."""
    if weight.bits == 8:
        return weight
    if weight.zero_points.dtype != np.uint8:
        raise ValueError("only weights with integer zero points can be widened")
    blocks = weight.k // BLOCK
    zero = unpack(weight.zero_points.astype(np.uint8).reshape(weight.n, -1), 4)[:, :blocks]
    q = unpack(weight.packed.reshape(weight.n, blocks, -1), 4)
    return QuantizedLinear(
        weight.n, weight.k, 8, q, weight.scales, np.ascontiguousarray(zero), offsets=weight.offsets
    )


def from_gguf_q8_0(raw: UInt8Array, n: int, k: int) -> QuantizedLinear:
    """Exact repacking of GGUF Q8_0 blocks (w = d * q, int8 q) into 8-bit MatMulNBits (q + 128, zero 128)."""
    blocks = raw.reshape(n, k // BLOCK, 34)
    d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    q = blocks[:, :, 2:34].view(np.int8).astype(np.int16) + 128
    zp = np.full((n, k // BLOCK), 128, dtype=np.uint8)
    return QuantizedLinear(n, k, 8, q.astype(np.uint8), d, zp)


Linear = Float32Array | QuantizedLinear


@dataclass(frozen=True)
class DecoderWeights:
    """Per-layer weights in the fused layout the graph uses. Linear weights are [out, in] (fp32) or quantized."""

    config: LlamaConfig
    # [vocab, d_model]. An 8-bit QuantizedLinear is looked up row by row and dequantized in the graph; when it is
    # the same object as `head`, lookup and head share one copy of the weights (Gemma's 262k x 640 table).
    embedding: Float32Array | QuantizedLinear
    head: Linear  # [vocab, d_model]
    final_norm: Float32Array
    attn_norm: list[Float32Array]
    qkv: list[Linear]  # rows: q (n_heads * hd), k, v (n_kv * hd each)
    o: list[Linear]
    ffn_norm: list[Float32Array]
    gate_up: list[Linear]  # rows: gate (ffn), up (ffn)
    down: list[Linear]
    # True when Q/K rows pair adjacent dims for RoPE (GGUF Llama layout); False for HF's rotate-half layout.
    rope_interleaved: bool = True
    # Gemma 3 only (config.gemma): RMS norms over each head of q and k ([head_dim]), and norms of the attention
    # and FFN outputs before they join the residual ([d_model]).
    q_norm: list[Float32Array] | None = None
    k_norm: list[Float32Array] | None = None
    post_attn_norm: list[Float32Array] | None = None
    post_ffn_norm: list[Float32Array] | None = None
    # Qwen2 only (config.qkv_bias): the Q, K and V projections' biases, concatenated like `qkv`'s rows.
    qkv_bias: list[Float32Array] | None = None


def concat_rows(parts: list[Linear]) -> Linear:
    """One linear whose output rows are the parts' (e.g. Q, K, V -> QKV). Quantized parts of different bit widths
    (a GGUF may store V in 6 bits and Q, K in 4) are widened to 8 bits first; exact either way."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.ascontiguousarray(np.concatenate(parts, axis=0))  # type: ignore[arg-type]
    qs = [p for p in parts if isinstance(p, QuantizedLinear)]
    if len(qs) == len(parts) and len({p.bits for p in qs}) > 1:
        qs = [widen_to_8_bits(p) for p in qs]
    if len(qs) != len(parts) or len({(p.bits, p.k, p.zero_points.dtype) for p in qs}) != 1:
        raise ValueError("cannot fuse linear weights of different formats")
    offsets = None
    if any(p.offsets is not None for p in qs):
        offsets = np.concatenate(
            [p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in qs]
        ).astype(np.float32)
    return QuantizedLinear(
        sum(p.n for p in qs),
        qs[0].k,
        qs[0].bits,
        np.concatenate([p.packed for p in qs]),
        np.concatenate([p.scales for p in qs]),
        np.concatenate([p.zero_points for p in qs]),
        offsets,
    )


# Initializers of at least this many bytes go to the external data file when the graph is written to disk.
_EXTERNAL_BYTES = 1024
# Their offsets in that file are page-aligned, so onnxruntime can map them instead of copying.
_ALIGN = 4096


class _Builder:
    def __init__(self, accuracy_level: int, data: BinaryIO | None = None, location: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.accuracy_level = accuracy_level
        self._count = 0
        # Initializer names of quantized weights already added, by object: a tied table is stored once.
        self._quantized: dict[int, tuple[str, str, str]] = {}
        # Where large initializers are written as they are made (write_graph): a build then never holds the whole
        # graph's weights in memory a second time, as protobuf tensors.
        self._data = data
        self._location = location

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, name: str, array: npt.NDArray[np.generic]) -> str:
        array = np.ascontiguousarray(array)
        if self._data is None or array.nbytes < _EXTERNAL_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = -self._data.tell() % _ALIGN + self._data.tell()
        self._data.seek(offset)
        self._data.write(array.tobytes())
        tensor = onnx.TensorProto(
            name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self._location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        outs = [self.name(op) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_node"), domain=domain, **attrs))
        return outs

    def quantized(self, weight: QuantizedLinear, name: str) -> tuple[str, str, str]:
        """(packed, scales, zero points) initializers of `weight`, added on first use."""
        if id(weight) not in self._quantized:
            self._quantized[id(weight)] = (
                self.const(name + ".q", weight.packed),
                self.const(name + ".scales", weight.scales.reshape(-1)),
                self.const(name + ".zp", weight.zero_points.reshape(-1)),
            )
        return self._quantized[id(weight)]

    def rms_norm(self, x: str, weight: Float32Array, name: str, eps: float) -> str:
        return self.node(
            "SimplifiedLayerNormalization", [x, self.const(name, weight)], axis=-1, epsilon=eps, stash_type=1
        )[0]

    def head_norm(self, x: str, weight: Float32Array, name: str, heads: int, eps: float) -> str:
        """RMS norm over each head of a [B, S, heads * head_dim] projection (Gemma's q/k norms)."""
        split = self.node("Reshape", [x, self.const(name + ".heads", np.array([0, 0, heads, -1], np.int64))])[0]
        normed = self.rms_norm(split, weight, name, eps)
        return self.node("Reshape", [normed, self.const(name + ".flat", np.array([0, 0, -1], np.int64))])[0]

    def lookup(self, table: QuantizedLinear, ids: str, name: str) -> str:
        """Rows `ids` of an 8-bit table, dequantized: (q - zero) * scale per 32-wide block -> [B, S, K]."""
        if table.bits != 8 or table.zero_points.dtype != np.uint8:
            raise ValueError("only 8-bit tables with integer zero points can be looked up")
        packed, scales, zeros = self.quantized(table, name)
        blocks = table.k // BLOCK
        rows = self.node("Cast", [self.node("Gather", [packed, ids], axis=0)[0]], to=TensorProto.FLOAT)[0]
        per_row = self.const(name + ".rows", np.array([table.n, blocks], np.int64))
        scale = self.node("Gather", [self.node("Reshape", [scales, per_row])[0], ids], axis=0)[0]
        zero = self.node(
            "Gather",
            [self.node("Cast", [self.node("Reshape", [zeros, per_row])[0]], to=TensorProto.FLOAT)[0], ids],
            axis=0,
        )[0]
        trailing = self.const(name + ".unsqueeze", np.array([-1], np.int64))
        value = self.node(
            "Mul",
            [
                self.node("Sub", [rows, self.node("Unsqueeze", [zero, trailing])[0]])[0],
                self.node("Unsqueeze", [scale, trailing])[0],
            ],
        )[0]
        if table.offsets is not None:
            offsets = self.const(name + ".offsets_table", table.offsets.astype(np.float32))
            offset = self.node("Gather", [offsets, ids], axis=0)[0]
            value = self.node("Add", [value, self.node("Unsqueeze", [offset, trailing])[0]])[0]
        return self.node("Reshape", [value, self.const(name + ".k", np.array([0, 0, table.k], np.int64))])[0]

    def linear(self, x: str, weight: Linear, name: str) -> str:
        if isinstance(weight, np.ndarray):
            w = self.const(name, np.ascontiguousarray(weight.T.astype(np.float32)))
            return self.node("MatMul", [x, w])[0]
        b, s, z = self.quantized(weight, name)
        y = self.node(
            "MatMulNBits",
            [x, b, s, z],
            domain=MS_DOMAIN,
            K=weight.k,
            N=weight.n,
            bits=weight.bits,
            block_size=BLOCK,
            accuracy_level=self.accuracy_level,
        )[0]
        if weight.offsets is None:
            return y
        # y += blocksum(x) @ offsets^T, blocksum over each 32-wide block of K.
        shape = self.const(name + ".blocks", np.array([0, 0, weight.k // BLOCK, BLOCK], np.int64))
        sums = self.node(
            "ReduceSum",
            [self.node("Reshape", [x, shape])[0], self.const(name + ".axis", np.array([-1], np.int64))],
            keepdims=0,
        )[0]
        offsets = self.const(name + ".offsets", np.ascontiguousarray(weight.offsets.T.astype(np.float32)))
        return self.node("Add", [y, self.node("MatMul", [sums, offsets])[0]])[0]


def input_names(n_layers: int) -> list[str]:
    names = ["input_ids", "seqlens_k", "total_sequence_length", "logits_index"]
    for i in range(n_layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def build_graph(
    weights: DecoderWeights, max_positions: int, accuracy_level: int = 4, pad_single_row: bool = False
) -> onnx.ModelProto:
    """The decoder graph with every weight inside the proto (small models, tests). `pad_single_row`: see
    _SingleRowPadding (graphs that speculative decoding verifies with)."""
    return _build(weights, max_positions, _Builder(accuracy_level), pad_single_row)


def write_graph(
    weights: DecoderWeights, max_positions: int, path: Path, accuracy_level: int = 4, pad_single_row: bool = False
) -> None:
    """The decoder graph written to `path`, its weights to `<path>.data` as they are made (page-aligned)."""
    location = path.name + ".data"
    with (path.parent / location).open("wb") as data:
        model = _build(weights, max_positions, _Builder(accuracy_level, data, location), pad_single_row)
    onnx.save_model(model, str(path))


class _SingleRowPadding:
    """Single-row steps (B == 1, S == 1) run GroupQueryAttention on their row plus a throwaway copy of it (S = 2).

    Why: for a [1, K] x [K, N] product with alpha 1, MLAS (onnxruntime's CPU GEMM) takes a non-FMA kernel that
    rounds differently from the kernel of every larger M, and GroupQueryAttention's probabilities x V product has
    M = S. So a plain decode step computed attention slightly differently from the same position inside a
    speculative verification or a prefill chunk (S > 1), and greedy speculative decoding was not exactly greedy.
    Every other op in the graph gives bitwise the same row for any S. The real row cannot see the copy (it comes
    after it); the copy's K/V land one position past the row's end, scratch that the next token overwrites, and only
    when the buffer has that position. Batched steps (B > 1) keep S = 1, as the kernel refuses S > 1 with a past
    for B > 1: their rows match one another, not a single-row step. So it is a trade, made per variant: only graphs
    speculative decoding verifies with (variants with a draft) are padded; the others keep a request's tokens the
    same alone and batched."""

    def __init__(self, b: _Builder) -> None:
        self.b = b
        ids_shape = b.node("Shape", ["input_ids"])[0]
        one = b.const("pad.one", np.array(1, np.int64))
        dims = [b.node("Gather", [ids_shape, b.const(f"pad.dim{d}", np.array(d, np.int64))])[0] for d in (0, 1)]
        single = b.node("And", [b.node("Equal", [dims[0], one])[0], b.node("Equal", [dims[1], one])[0]])[0]
        buffer = b.node("Gather", [b.node("Shape", ["past_key_0"])[0], b.const("pad.dim2", np.array(2, np.int64))])[0]
        last = b.node("Cast", [b.node("ReduceMax", ["seqlens_k"], keepdims=0)[0]], to=TensorProto.INT64)[0]
        flag = b.node("And", [single, b.node("Less", [b.node("Add", [last, one])[0], buffer])[0]])[0]
        pad32 = b.node("Cast", [flag], to=TensorProto.INT32)[0]
        self.seqlens_k = b.node("Add", ["seqlens_k", pad32])[0]
        self.total = b.node("Add", ["total_sequence_length", pad32])[0]
        self.start = b.const("pad.start", np.array([0], np.int64))
        self.axis = b.const("pad.axis", np.array([1], np.int64))
        self.copy_end = b.node("Cast", [b.node("Reshape", [flag, self.axis])[0]], to=TensorProto.INT64)[0]  # [0 or 1]
        self.seq_end = b.node("Slice", [ids_shape, self.axis, b.const("pad.two", np.array([2], np.int64))])[0]  # [S]

    def append_copy(self, x: str) -> str:
        """[B, S, D] -> [B, S + pad, D]: the first row appended after x when padding, x otherwise."""
        head = self.b.node("Slice", [x, self.start, self.copy_end, self.axis])[0]
        return self.b.node("Concat", [x, head], axis=1)[0]

    def drop_copy(self, x: str) -> str:
        return self.b.node("Slice", [x, self.start, self.seq_end, self.axis])[0]


def _build(weights: DecoderWeights, max_positions: int, b: _Builder, pad_single_row: bool) -> onnx.ModelProto:
    cfg = weights.config
    hd, n_kv = cfg.head_dim, cfg.n_kv_heads
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["rows"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, ["batch", n_kv, "buf", hd])
            )
            outputs.append(
                helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, ["batch", n_kv, "buf", hd])
            )

    rope: dict[float, tuple[str, str]] = {}
    for base in sorted({cfg.layer_rope_base(i) for i in range(cfg.n_layers)}):
        inv_freq = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
        suffix = "" if base == cfg.rope_base else f".{int(base)}"
        rope[base] = (
            b.const(f"rope.cos{suffix}", np.cos(angles).astype(np.float32)),
            b.const(f"rope.sin{suffix}", np.sin(angles).astype(np.float32)),
        )
    head_t = ""
    if isinstance(weights.head, np.ndarray) and weights.head is weights.embedding:
        # Tied fp32 embeddings: one [d_model, vocab] matrix serves the lookup (Gather on axis 1) and the head,
        # instead of a second, transposed 113 MB copy.
        head_t = b.const("output", np.ascontiguousarray(weights.head.T.astype(np.float32)))
        x = b.node("Transpose", [b.node("Gather", [head_t, "input_ids"], axis=1)[0]], perm=[1, 2, 0])[0]
    elif isinstance(weights.embedding, QuantizedLinear):
        x = b.lookup(weights.embedding, "input_ids", "output" if weights.embedding is weights.head else "token_embd")
    else:
        embedding = b.const("token_embd", weights.embedding.astype(np.float32))
        x = b.node("Gather", [embedding, "input_ids"], axis=0)[0]
    if cfg.embed_scale != 1.0:
        x = b.node("Mul", [x, b.const("embed_scale", np.array(cfg.embed_scale, np.float32))])[0]
    h = b.rms_norm(x, weights.attn_norm[0], "blk.0.attn_norm", cfg.rms_eps)
    residual = x
    pad = _SingleRowPadding(b) if pad_single_row else None
    q_dim, kv_dim = cfg.n_heads * hd, n_kv * hd
    for i in range(cfg.n_layers):
        qkv = b.linear(h, weights.qkv[i], f"blk.{i}.attn_qkv")
        if weights.qkv_bias is not None:
            qkv = b.node("Add", [qkv, b.const(f"blk.{i}.attn_qkv.bias", weights.qkv_bias[i])])[0]
        attention_inputs = [qkv, "", ""]
        if weights.q_norm is not None and weights.k_norm is not None:
            q, k, v = b.node(
                "Split", [qkv, b.const(f"qkv_split.{i}", np.array([q_dim, kv_dim, kv_dim], np.int64))], 3, axis=-1
            )
            q = b.head_norm(q, weights.q_norm[i], f"blk.{i}.attn_q_norm", cfg.n_heads, cfg.rms_eps)
            k = b.head_norm(k, weights.k_norm[i], f"blk.{i}.attn_k_norm", n_kv, cfg.rms_eps)
            attention_inputs = [q, k, v]
        if pad is not None:
            attention_inputs = [pad.append_copy(t) if t else t for t in attention_inputs]
        cos, sin = rope[cfg.layer_rope_base(i)]
        extra: dict[str, Any] = {}
        if cfg.is_local(i):
            # Same meaning as Gemma's sliding_window: the query token and the window - 1 before it (checked
            # against the reference in tests/unit/test_graph_gemma.py).
            extra["local_window_size"] = cfg.sliding_window
        if cfg.attn_scale:
            extra["scale"] = cfg.attn_scale
        attn, _, _ = b.node(
            "GroupQueryAttention",
            [
                *attention_inputs,
                f"past_key_{i}",
                f"past_value_{i}",
                pad.seqlens_k if pad is not None else "seqlens_k",
                pad.total if pad is not None else "total_sequence_length",
                cos,
                sin,
            ],
            n_out=3,
            domain=MS_DOMAIN,
            num_heads=cfg.n_heads,
            kv_num_heads=n_kv,
            do_rotary=1,
            rotary_interleaved=1 if weights.rope_interleaved else 0,
            **extra,
        )
        # GroupQueryAttention's present outputs must carry the graph output names.
        b.nodes[-1].output[1] = f"present_key_{i}"
        b.nodes[-1].output[2] = f"present_value_{i}"
        o = b.linear(attn if pad is None else pad.drop_copy(attn), weights.o[i], f"blk.{i}.attn_output")
        if weights.post_attn_norm is not None:
            o = b.rms_norm(o, weights.post_attn_norm[i], f"blk.{i}.post_attention_norm", cfg.rms_eps)
        h, _, _, residual = b.node(
            "SkipSimplifiedLayerNormalization",
            [o, residual, b.const(f"blk.{i}.ffn_norm", weights.ffn_norm[i])],
            n_out=4,
            domain=MS_DOMAIN,
            epsilon=cfg.rms_eps,
        )
        gate_up = b.linear(h, weights.gate_up[i], f"blk.{i}.ffn_gate_up")
        gate, up = b.node("Split", [gate_up, b.const(f"split.{i}", np.array([cfg.ffn_dim] * 2, np.int64))], 2, axis=-1)
        if cfg.activation == "gelu_tanh":
            activated = b.node("FastGelu", [gate], domain=MS_DOMAIN)[0]
        elif cfg.activation == "silu":
            activated = b.node("Mul", [gate, b.node("Sigmoid", [gate])[0]])[0]
        else:
            raise ValueError(f"unknown activation {cfg.activation!r}")
        act = b.node("Mul", [activated, up])[0]
        down = b.linear(act, weights.down[i], f"blk.{i}.ffn_down")
        if weights.post_ffn_norm is not None:
            down = b.rms_norm(down, weights.post_ffn_norm[i], f"blk.{i}.post_ffw_norm", cfg.rms_eps)
        norm = weights.attn_norm[i + 1] if i + 1 < cfg.n_layers else weights.final_norm
        norm_name = f"blk.{i + 1}.attn_norm" if i + 1 < cfg.n_layers else "output_norm"
        h, _, _, residual = b.node(
            "SkipSimplifiedLayerNormalization",
            [down, residual, b.const(norm_name, norm)],
            n_out=4,
            domain=MS_DOMAIN,
            epsilon=cfg.rms_eps,
        )
    # Only the positions whose logits are wanted go through the vocab-wide head.
    flat = b.node("Reshape", [h, b.const("flat.shape", np.array([-1, cfg.d_model], np.int64))])[0]
    wanted = b.node("Gather", [flat, "logits_index"], axis=0)[0]
    if head_t:
        b.nodes.append(helper.make_node("MatMul", [wanted, head_t], ["logits"], name="output_head"))
    else:
        b.linear(wanted, weights.head, "output")
        b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(b.nodes, "llmesh_decoder", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 9
    return model
