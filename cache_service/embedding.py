"""The cache's embedder: all-MiniLM-L6-v2 (llmesh/minilm.py, shared with the embedding model Triton serves for
/v1/embeddings) behind an in-process dynamic batcher with a small memo."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from llmesh.minilm import DIM, MODEL_PACKAGE, MiniLMEncoder, model_dir, read_safetensors, token_batch

__all__ = [
    "DIM",
    "MODEL_PACKAGE",
    "BatchingEmbedder",
    "Embedder",
    "MiniLMEncoder",
    "model_dir",
    "read_safetensors",
    "token_batch",
]


class Embedder(Protocol):
    async def embed(self, text: str) -> np.ndarray:
        """A unit-length float32 vector of the text."""
        ...


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
