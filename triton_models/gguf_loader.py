"""Read a Llama-family GGUF (llama, gemma3, qwen2, qwen3) into a typed config, fp32 numpy weights and tokenizer
metadata.

Weights keep their GGUF names and the GGUF row layout: a linear weight is [out_features, in_features].
Llama Q/K rows are in the GGUF writer's permuted order, which pairs *adjacent* dims for RoPE (see reference.py);
Gemma and Qwen rows are stored as trained and rotate halves (llama.cpp's "NEOX" RoPE for these architectures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


@dataclass(frozen=True)
class LlamaConfig:
    """A decoder of the Llama family. The defaults after `tied_embeddings` describe Llama itself; Gemma 3
    (`arch="gemma3"`) sets them: scaled embeddings, q/k RMS norms, norms after attention and FFN, GELU (tanh),
    sliding-window attention on most layers with their own RoPE base. Qwen2 (`arch="qwen2"`) is Llama with biases
    on the Q/K/V projections; Qwen3 (`arch="qwen3"`) is Llama with q/k RMS norms and a head size of its own."""

    n_layers: int
    d_model: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float
    rms_eps: float
    vocab_size: int
    context_length: int
    tied_embeddings: bool
    arch: str = "llama"
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(d_model))
    attn_scale: float = 0.0  # softmax scale of q.k; 0 = 1 / sqrt(head_dim)
    activation: str = "silu"  # FFN gate activation: "silu" | "gelu_tanh"
    sliding_window: int = 0  # > 0: local layers attend to this many most recent tokens (the token itself included)
    global_every: int = 0  # with sliding_window: layer i is global when (i + 1) % global_every == 0
    rope_local_base: float = 0.0  # RoPE base of the local (sliding-window) layers

    @property
    def gemma(self) -> bool:
        return self.arch == "gemma3"

    @property
    def qkv_bias(self) -> bool:
        """Whether the Q/K/V projections have biases (Qwen2)."""
        return self.arch == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Whether q and k go through an RMS norm per head before RoPE (Gemma 3, Qwen3)."""
        return self.arch in ("gemma3", "qwen3")

    def is_local(self, layer: int) -> bool:
        """Whether `layer` uses sliding-window attention."""
        if self.sliding_window <= 0:
            return False
        return self.global_every <= 0 or (layer + 1) % self.global_every != 0

    def layer_rope_base(self, layer: int) -> float:
        return self.rope_local_base if self.is_local(layer) and self.rope_local_base > 0 else self.rope_base


@dataclass(frozen=True)
class TokenizerMetadata:
    model: str  # "gpt2" = byte-level BPE, "llama" = SentencePiece (score-ordered merges, <0xXX> byte fallback)
    pre: str  # llama.cpp pre-tokenizer name, e.g. "smollm"
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    # SentencePiece ("llama") vocabularies: per-token merge priority (higher merges first), and whether a "▁" is
    # put in front of the text. Empty / False for byte-level BPE.
    scores: list[float] = field(default_factory=list)
    add_space_prefix: bool = False


@dataclass(frozen=True)
class GGUFModel:
    config: LlamaConfig
    weights: dict[str, Float32Array]
    tokenizer: TokenizerMetadata


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader: Any, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF is missing required metadata {key!r}")
    return value


# Architectures the graph builder knows. Gemma 3 facts not in its GGUF metadata follow llama.cpp's loader for
# that architecture: every 6th layer global (the rest sliding-window), RoPE base 10,000 on local layers,
# attention scale 1 / sqrt(head_dim) (true for every size but 27B), embeddings scaled by sqrt(d_model).
SUPPORTED_ARCHITECTURES = ("llama", "gemma3", "qwen2", "qwen3")
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0


def read_config(reader: Any) -> LlamaConfig:
    arch = _require(reader, "general.architecture")
    if arch == "gemma3":
        return _read_gemma3_config(reader)
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    a = arch + "."
    d_model = int(_require(reader, a + "embedding_length"))
    n_heads = int(_require(reader, a + "attention.head_count"))
    # Qwen3 states its head size (it need not be d_model / n_heads); Llama and Qwen2 imply it.
    head_dim = int(_field(reader, a + "attention.key_length", d_model // n_heads))
    if int(_field(reader, a + "attention.value_length", head_dim)) != head_dim:
        raise ValueError("GGUF with different key and value head sizes is not supported")
    rotary = int(_field(reader, a + "rope.dimension_count", head_dim))
    if rotary != head_dim or (arch != "qwen3" and head_dim * n_heads != d_model):
        raise ValueError(f"partial rotary / odd head sizes are not supported ({head_dim=} {n_heads=} {d_model=})")
    if _field(reader, a + "rope.scaling.type") not in (None, "none") and _field(reader, a + "rope.scaling.factor"):
        raise ValueError(f"{arch} GGUF with RoPE scaling (YaRN / linear) is not supported yet")
    tokens = _require(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        n_layers=int(_require(reader, a + "block_count")),
        d_model=d_model,
        ffn_dim=int(_require(reader, a + "feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, a + "attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rope_base=float(_field(reader, a + "rope.freq_base", 10000.0)),
        rms_eps=float(_require(reader, a + "attention.layer_norm_rms_epsilon")),
        vocab_size=int(_field(reader, a + "vocab_size", len(tokens))),
        context_length=int(_require(reader, a + "context_length")),
        tied_embeddings="output.weight" not in names,
        arch=arch,
    )


def _read_gemma3_config(reader: Any) -> LlamaConfig:
    a = "gemma3."
    d_model = int(_require(reader, a + "embedding_length"))
    head_dim = int(_require(reader, a + "attention.key_length"))
    if int(_field(reader, a + "attention.value_length", head_dim)) != head_dim:
        raise ValueError("Gemma 3 GGUF with different key and value head sizes is not supported")
    if _field(reader, a + "rope.scaling.type") not in (None, "none") or _field(reader, a + "rope.scaling.factor"):
        raise ValueError("Gemma 3 GGUF with RoPE scaling (the 4B+ sizes) is not supported yet")
    tokens = _require(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        n_layers=int(_require(reader, a + "block_count")),
        d_model=d_model,
        ffn_dim=int(_require(reader, a + "feed_forward_length")),
        n_heads=int(_require(reader, a + "attention.head_count")),
        n_kv_heads=int(_require(reader, a + "attention.head_count_kv")),
        head_dim=head_dim,
        rope_base=float(_field(reader, a + "rope.freq_base", 1_000_000.0)),
        rms_eps=float(_require(reader, a + "attention.layer_norm_rms_epsilon")),
        vocab_size=len(tokens),
        context_length=int(_require(reader, a + "context_length")),
        tied_embeddings="output.weight" not in names,
        arch="gemma3",
        embed_scale=float(np.sqrt(np.float32(d_model))),
        attn_scale=1.0 / float(np.sqrt(head_dim)),
        activation="gelu_tanh",
        sliding_window=int(_require(reader, a + "attention.sliding_window")),
        global_every=_GEMMA3_GLOBAL_EVERY,
        rope_local_base=_GEMMA3_LOCAL_ROPE_BASE,
    )


def read_tokenizer(reader: Any) -> TokenizerMetadata:
    def optional_int(key: str) -> int | None:
        value = _field(reader, key)
        return None if value is None else int(value)

    model = str(_require(reader, "tokenizer.ggml.model"))
    return TokenizerMetadata(
        model=model,
        pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
        tokens=[str(t) for t in _require(reader, "tokenizer.ggml.tokens")],
        token_types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type", [])],
        merges=[str(m) for m in _field(reader, "tokenizer.ggml.merges", [])],
        bos_id=optional_int("tokenizer.ggml.bos_token_id"),
        eos_id=optional_int("tokenizer.ggml.eos_token_id"),
        unk_id=optional_int("tokenizer.ggml.unknown_token_id"),
        pad_id=optional_int("tokenizer.ggml.padding_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
        scores=[float(s) for s in _field(reader, "tokenizer.ggml.scores", [])],
        # llama.cpp's default when the key is missing: on for SentencePiece vocabularies, off otherwise.
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", model == "llama")),
    )


def read_weights(reader: Any) -> dict[str, Float32Array]:
    from gguf.quants import dequantize

    weights: dict[str, Float32Array] = {}
    for tensor in reader.tensors:
        # dequantize() also handles F32/F16 (a typed view) and returns numpy's row-major shape, i.e. the
        # GGUF shape reversed: [out_features, in_features] for linear weights.
        array = dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = np.ascontiguousarray(array, dtype=np.float32)
    return weights


def load_gguf(path: Path, *, with_weights: bool = True) -> GGUFModel:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    config = read_config(reader)
    weights = read_weights(reader) if with_weights else {}
    if with_weights:
        _check_shapes(config, weights)
    return GGUFModel(config=config, weights=weights, tokenizer=read_tokenizer(reader))


def _check_shapes(cfg: LlamaConfig, weights: dict[str, Float32Array]) -> None:
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    expected: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.vocab_size, cfg.d_model),
        "output_norm.weight": (cfg.d_model,),
    }
    if not cfg.tied_embeddings:
        expected["output.weight"] = (cfg.vocab_size, cfg.d_model)
    for i in range(cfg.n_layers):
        expected |= {
            f"blk.{i}.attn_norm.weight": (cfg.d_model,),
            f"blk.{i}.attn_q.weight": (cfg.n_heads * cfg.head_dim, cfg.d_model),
            f"blk.{i}.attn_k.weight": (kv_dim, cfg.d_model),
            f"blk.{i}.attn_v.weight": (kv_dim, cfg.d_model),
            f"blk.{i}.attn_output.weight": (cfg.d_model, cfg.n_heads * cfg.head_dim),
            f"blk.{i}.ffn_norm.weight": (cfg.d_model,),
            f"blk.{i}.ffn_gate.weight": (cfg.ffn_dim, cfg.d_model),
            f"blk.{i}.ffn_up.weight": (cfg.ffn_dim, cfg.d_model),
            f"blk.{i}.ffn_down.weight": (cfg.d_model, cfg.ffn_dim),
        }
        if cfg.qk_norm:
            expected |= {
                f"blk.{i}.attn_q_norm.weight": (cfg.head_dim,),
                f"blk.{i}.attn_k_norm.weight": (cfg.head_dim,),
            }
        if cfg.gemma:
            expected |= {
                f"blk.{i}.post_attention_norm.weight": (cfg.d_model,),
                f"blk.{i}.post_ffw_norm.weight": (cfg.d_model,),
            }
        if cfg.qkv_bias:
            expected |= {
                f"blk.{i}.attn_q.bias": (cfg.n_heads * cfg.head_dim,),
                f"blk.{i}.attn_k.bias": (kv_dim,),
                f"blk.{i}.attn_v.bias": (kv_dim,),
            }
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"GGUF tensor {name!r} is missing")
        if weights[name].shape != shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {weights[name].shape}, expected {shape}")
