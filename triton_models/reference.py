"""A plain PyTorch Llama on the GGUF's dequantized weights: the numerical reference for the ONNX export.

Deliberately simple and independent of graph.py: no KV cache, no padding, full recompute per token, and RoPE
written the way the GGUF stores Q/K (rotating *adjacent* pairs: dims 0/1, 2/3, ...). The served graph uses
a different but equivalent layout (GroupQueryAttention rotary), so agreement between the two is a real check.
Build/test time only.
"""

from __future__ import annotations

import torch
from torch import nn

from triton_models.gguf_loader import Float32Array, LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, weight: Float32Array, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _linear(weight: Float32Array, bias: Float32Array | None = None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None)
    layer.weight = nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(torch.from_numpy(bias.copy()), requires_grad=False)
    return layer


def rope_adjacent(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by positions * base^(-2i/d). x: [B, H, T, d]; positions: [T]."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)


def rope_half(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by positions * base^(-2i/d): the layout Gemma is trained and stored in."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, weights: dict[str, Float32Array], i: int) -> None:
        super().__init__()
        p = f"blk.{i}."
        self.cfg = cfg
        self.attn_norm = RMSNorm(weights[p + "attn_norm.weight"], cfg.rms_eps)
        bias = (lambda name: weights[p + name]) if cfg.qkv_bias else (lambda name: None)
        self.q = _linear(weights[p + "attn_q.weight"], bias("attn_q.bias"))
        self.k = _linear(weights[p + "attn_k.weight"], bias("attn_k.bias"))
        self.v = _linear(weights[p + "attn_v.weight"], bias("attn_v.bias"))
        self.o = _linear(weights[p + "attn_output.weight"])
        self.ffn_norm = RMSNorm(weights[p + "ffn_norm.weight"], cfg.rms_eps)
        self.gate = _linear(weights[p + "ffn_gate.weight"])
        self.up = _linear(weights[p + "ffn_up.weight"])
        self.down = _linear(weights[p + "ffn_down.weight"])
        self.layer = i
        if cfg.qk_norm:
            self.q_norm = RMSNorm(weights[p + "attn_q_norm.weight"], cfg.rms_eps)
            self.k_norm = RMSNorm(weights[p + "attn_k_norm.weight"], cfg.rms_eps)
        if cfg.gemma:
            self.post_attn_norm = RMSNorm(weights[p + "post_attention_norm.weight"], cfg.rms_eps)
            self.post_ffn_norm = RMSNorm(weights[p + "post_ffw_norm.weight"], cfg.rms_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        positions = torch.arange(t)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.arch != "llama":
            # Gemma and Qwen GGUFs keep the trained (rotate-half) layout; llama.cpp rotates them NEOX-style.
            base = cfg.layer_rope_base(self.layer)
            q, k = rope_half(q, positions, base), rope_half(k, positions, base)
        else:
            q = rope_adjacent(q, positions, cfg.rope_base)
            k = rope_adjacent(k, positions, cfg.rope_base)
        # GQA: query head h reads kv head h // (n_heads / n_kv_heads).
        group = cfg.n_heads // cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scale = cfg.attn_scale or cfg.head_dim**-0.5
        scores = q @ k.transpose(-1, -2) * scale
        visible = torch.ones(t, t, dtype=torch.bool).tril()
        if cfg.is_local(self.layer):
            # Query i sees keys j with i - j < window (itself and the window - 1 before it).
            visible &= ~torch.ones(t, t, dtype=torch.bool).tril(-cfg.sliding_window)
        scores = scores.masked_fill(~visible, float("-inf"))
        attn = scores.softmax(-1) @ v
        o = self.o(attn.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim))
        if cfg.gemma:
            o = self.post_attn_norm(o)
        x = x + o
        h = self.ffn_norm(x)
        if cfg.activation == "gelu_tanh":
            ffn = self.down(nn.functional.gelu(self.gate(h), approximate="tanh") * self.up(h))
        else:
            ffn = self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        if cfg.gemma:
            ffn = self.post_ffn_norm(ffn)
        return x + ffn


class ReferenceLlama(nn.Module):
    def __init__(self, cfg: LlamaConfig, weights: dict[str, Float32Array]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.from_numpy(weights["token_embd.weight"].copy()), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg, weights, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(weights["output_norm.weight"], cfg.rms_eps)
        head = weights["token_embd.weight"] if cfg.tied_embeddings else weights["output.weight"]
        self.head = nn.Parameter(torch.from_numpy(head.copy()), requires_grad=False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (no padding) -> logits [B, T, vocab]."""
        x = self.embed[input_ids] * self.cfg.embed_scale
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.head.T

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_tokens: int, eos_ids: frozenset[int] = frozenset()) -> list[int]:
        ids = list(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            logits = self.forward(torch.tensor([ids]))[0, -1]
            token = int(logits.argmax())
            if token in eos_ids:
                break
            out.append(token)
            ids.append(token)
        return out
