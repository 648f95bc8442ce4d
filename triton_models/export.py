"""Export the GGUF Llama to an ONNX decoder with KV cache and batching (build time only; needs torch).

Graph contract (all dims dynamic except the model's own sizes; B batch, T new tokens, P cached tokens, P may be 0):

  inputs   input_ids        int64 [B, T]
           position_ids     int64 [B, T]      RoPE positions (left-padded rows start at 0 at their first token)
           attention_mask   int64 [B, P+T]    1 = real token, 0 = left padding, over cache + new tokens
           past_key_<i>     fp32  [B, n_kv, P, head_dim]   for i in 0..n_layers-1
           past_value_<i>   fp32  [B, n_kv, P, head_dim]
  outputs  logits           fp32  [B, vocab]  logits of the LAST input position only (what decoding needs;
                                              skipping the other T-1 rows of the 49152-wide head keeps prefill
                                              cheap)
           present_key_<i>  fp32  [B, n_kv, P+T, head_dim]   = concat(past, new) along the sequence axis
           present_value_<i>

The causal + padding mask is built inside the graph from `attention_mask` and the shapes. Cached keys are
stored in the graph's internal rotate-half layout (see `_rotate_half_rows`): only this graph reads them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from triton_models.gguf_loader import Float32Array, LlamaConfig

OPSET = 17


def input_names(n_layers: int) -> list[str]:
    names = ["input_ids", "position_ids", "attention_mask"]
    for i in range(n_layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def output_names(n_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layers):
        names += [f"present_key_{i}", f"present_value_{i}"]
    return names


def _rotate_half_rows(weight: Float32Array, n_heads: int, head_dim: int) -> Float32Array:
    """Reorder each head's Q/K output rows from the GGUF's adjacent-pair RoPE layout (pairs 2i, 2i+1) to the
    rotate-half layout (pairs i, i + d/2). q.k is unchanged when q and k get the same permutation, and
    rotate-half needs only two slices and a concat in the graph instead of interleaving."""
    w = weight.reshape(n_heads, head_dim, -1)
    w = np.concatenate([w[:, 0::2], w[:, 1::2]], axis=1)
    return np.ascontiguousarray(w.reshape(n_heads * head_dim, -1))


def _param(array: Float32Array) -> nn.Parameter:
    # Own copy: GGUF F32 tensors are read-only memmap views, which torch.from_numpy warns about.
    return nn.Parameter(torch.from_numpy(np.array(array, dtype=np.float32, order="C")), requires_grad=False)


class _RMSNorm(nn.Module):
    def __init__(self, weight: Float32Array, eps: float) -> None:
        super().__init__()
        self.weight = _param(weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pow/ReduceMean/Add/Sqrt/Div/Mul: the pattern onnxruntime fuses into SimplifiedLayerNormalization.
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x / torch.sqrt(variance + self.eps))


def _linear(weight: Float32Array) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = _param(weight)
    return layer


class _Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, weights: dict[str, Float32Array], i: int) -> None:
        super().__init__()
        p = f"blk.{i}."
        self.cfg = cfg
        # The 1/sqrt(head_dim) attention scale is folded into Q (exact for head_dim 64: a power of two).
        scale = 1.0 / math.sqrt(cfg.head_dim)
        q = _rotate_half_rows(weights[p + "attn_q.weight"], cfg.n_heads, cfg.head_dim) * np.float32(scale)
        k = _rotate_half_rows(weights[p + "attn_k.weight"], cfg.n_kv_heads, cfg.head_dim)
        self.attn_norm = _RMSNorm(weights[p + "attn_norm.weight"], cfg.rms_eps)
        self.q = _linear(q)
        self.k = _linear(k)
        self.v = _linear(weights[p + "attn_v.weight"])
        self.o = _linear(weights[p + "attn_output.weight"])
        self.ffn_norm = _RMSNorm(weights[p + "ffn_norm.weight"], cfg.rms_eps)
        self.gate = _linear(weights[p + "ffn_gate.weight"])
        self.up = _linear(weights[p + "ffn_up.weight"])
        self.down = _linear(weights[p + "ffn_down.weight"])

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(
        self,
        x: torch.Tensor,  # [B, T, d_model]
        cos: torch.Tensor,  # [B, T, 1, head_dim]
        sin: torch.Tensor,
        allowed: torch.Tensor,  # bool [B, 1, 1, T, S]
        past_k: torch.Tensor,  # [B, n_kv, P, head_dim]
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, t = x.shape[0], x.shape[1]
        group = cfg.n_heads // cfg.n_kv_heads
        h = self.attn_norm(x)
        q = self._rope(self.q(h).view(b, t, cfg.n_heads, cfg.head_dim), cos, sin)
        k = self._rope(self.k(h).view(b, t, cfg.n_kv_heads, cfg.head_dim), cos, sin)
        v = self.v(h).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        k = torch.cat((past_k, k.transpose(1, 2)), dim=2)  # [B, n_kv, S, hd]
        v = torch.cat((past_v, v.transpose(1, 2)), dim=2)
        # GQA without repeating K/V: query head h = kv * group + g reads kv head `kv`, so put each kv head's
        # `group` query heads on the row axis: [B, n_kv, group*T, hd] @ [B, n_kv, hd, S].
        qg = q.view(b, t, cfg.n_kv_heads, group, cfg.head_dim).permute(0, 2, 3, 1, 4)
        scores = qg.reshape(b, cfg.n_kv_heads, group * t, cfg.head_dim) @ k.transpose(2, 3)
        scores = scores.view(b, cfg.n_kv_heads, group, t, -1)
        # A finite minimum, not -inf: a left-padding query row has no allowed key at all, and -inf there would
        # make NaNs that flow into later layers' K/V through 0 * NaN.
        scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1).view(b, cfg.n_kv_heads, group * t, -1)
        attn = (probs @ v).view(b, cfg.n_kv_heads, group, t, cfg.head_dim).permute(0, 3, 1, 2, 4)
        x = x + self.o(attn.reshape(b, t, cfg.n_heads * cfg.head_dim))
        h = self.ffn_norm(x)
        x = x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        return x, k, v


class ExportDecoder(nn.Module):
    cos_table: torch.Tensor  # buffers, declared for the type checker
    sin_table: torch.Tensor

    def __init__(self, cfg: LlamaConfig, weights: dict[str, Float32Array], max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        # One [d_model, vocab] matrix serves the embedding lookup (a Gather on axis 1) and the LM head (a MatMul).
        # Keeping the [vocab, d_model] embedding as well would make the exporter store a second, transposed
        # 113 MB copy for the head's MatMul.
        head = weights["token_embd.weight"] if cfg.tied_embeddings else weights["output.weight"]
        self.head_t = _param(head.T)
        self.embed_t = self.head_t if cfg.tied_embeddings else _param(weights["token_embd.weight"].T)
        self.blocks = nn.ModuleList(_Block(cfg, weights, i) for i in range(cfg.n_layers))
        self.norm = _RMSNorm(weights["output_norm.weight"], cfg.rms_eps)
        # RoPE tables for positions [0, max_positions), computed in float64: the graph only gathers rows.
        inv_freq = cfg.rope_base ** (-np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
        angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
        angles = np.concatenate([angles, angles], axis=1)
        self.register_buffer("cos_table", torch.from_numpy(np.cos(angles).astype(np.float32)))
        self.register_buffer("sin_table", torch.from_numpy(np.sin(angles).astype(np.float32)))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        t = input_ids.shape[1]
        s = attention_mask.shape[1]
        x = self.embed_t[:, input_ids].permute(1, 2, 0)  # [B, T, d_model]
        cos = self.cos_table[position_ids].unsqueeze(2)
        sin = self.sin_table[position_ids].unsqueeze(2)
        # New token j sits at cache index (S - T) + j and may see keys 0..that index that are not padding.
        key_index = torch.arange(s)
        query_index = torch.arange(t) + (s - t)
        causal = key_index[None, :] <= query_index[:, None]  # [T, S]
        allowed = causal[None, None, None] & attention_mask.bool()[:, None, None, None, :]  # [B,1,1,T,S]
        presents: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, allowed, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        logits = self.norm(x[:, -1, :]) @ self.head_t  # [B, vocab]
        return (logits, *presents)


def export_onnx(cfg: LlamaConfig, weights: dict[str, Float32Array], max_positions: int, out_path: Path) -> None:
    """Write the decoder graph to `out_path` (one self-contained file; fp32 weights ~540 MB for SmolLM2)."""
    model = ExportDecoder(cfg, weights, max_positions).eval()
    b, t, p = 2, 3, 4  # sizes > 1 so no dimension is traced as a constant 1
    args: list[torch.Tensor] = [
        torch.randint(0, cfg.vocab_size, (b, t), dtype=torch.int64),
        torch.arange(p, p + t, dtype=torch.int64).repeat(b, 1),
        torch.ones(b, p + t, dtype=torch.int64),
    ]
    for _ in range(cfg.n_layers):
        args += [torch.zeros(b, cfg.n_kv_heads, p, cfg.head_dim)] * 2
    ins, outs = input_names(cfg.n_layers), output_names(cfg.n_layers)
    dynamic_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "new"},
        "position_ids": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "total"},
        "logits": {0: "batch"},
    }
    for name in ins[3:]:
        dynamic_axes[name] = {0: "batch", 2: "past"}
    for name in outs[1:]:
        dynamic_axes[name] = {0: "batch", 2: "total"}
    # The TorchScript exporter is chosen on purpose (see dynamo=False below); its deprecation notice is noise.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            tuple(args),
            str(out_path),
            input_names=ins,
            output_names=outs,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: stable for this plain graph and needs no onnxscript
        )
