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


def _linear(weight: Float32Array) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False)
    layer.weight = nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
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


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, weights: dict[str, Float32Array], i: int) -> None:
        super().__init__()
        p = f"blk.{i}."
        self.cfg = cfg
        self.attn_norm = RMSNorm(weights[p + "attn_norm.weight"], cfg.rms_eps)
        self.q = _linear(weights[p + "attn_q.weight"])
        self.k = _linear(weights[p + "attn_k.weight"])
        self.v = _linear(weights[p + "attn_v.weight"])
        self.o = _linear(weights[p + "attn_output.weight"])
        self.ffn_norm = RMSNorm(weights[p + "ffn_norm.weight"], cfg.rms_eps)
        self.gate = _linear(weights[p + "ffn_gate.weight"])
        self.up = _linear(weights[p + "ffn_up.weight"])
        self.down = _linear(weights[p + "ffn_down.weight"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        positions = torch.arange(t)
        q = rope_adjacent(q, positions, cfg.rope_base)
        k = rope_adjacent(k, positions, cfg.rope_base)
        # GQA: query head h reads kv head h // (n_heads / n_kv_heads).
        group = cfg.n_heads // cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) / cfg.head_dim**0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = scores.softmax(-1) @ v
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim))
        h = self.ffn_norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


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
        x = self.embed[input_ids]
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
