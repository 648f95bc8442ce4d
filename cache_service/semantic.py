"""Nearest-neighbour search over one bucket's cached questions. No I/O beyond the backend passed in.

A bucket (keys.semantic_query) holds the embeddings of single-turn questions whose answers were cached with the
same scope, variant, system prompt and sampling. The authoritative copy is an append-only list in the backend;
each cache replica mirrors the buckets it uses in memory and, per lookup, reads only what was appended since.
Brute-force cosine similarity (a matrix-vector product) is exact and, at the few thousand entries a bucket is
bounded to, faster than any approximate index would be worth.

Similarity alone cannot tell "convert miles to km" from "convert km to miles" (cosine 0.99 with MiniLM), so a
neighbour must also pass a lexical guard (`lexically_compatible`); docs/PERFORMANCE.md has the numbers with and
without it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from cache_service.embedding import DIM
from cache_service.store import CacheBackend

DIGEST_BYTES = 64  # hex sha256 of the entry


_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def lexically_compatible(a: str, b: str) -> bool:
    """False for the look-alikes that embeddings rate as near-identical:
    - different numbers ("15% of 200" / "15% of 300", "HTTP 502" / "HTTP 503");
    - the same words in another order ("string to integer" / "integer to string");
    - exactly one word swapped for another ("soft yolk" / "hard yolk", "by value" / "by key").
    A paraphrase that differs by a single synonym is refused too: a missed hit costs a generation, a false hit
    serves a wrong answer.
    """
    if sorted(_NUMBER.findall(a)) != sorted(_NUMBER.findall(b)):
        return False
    wa, wb = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    sa, sb = set(wa), set(wb)
    if sa == sb:
        return wa == wb
    return not (len(sa - sb) == 1 and len(sb - sa) == 1)


def encode_item(digest: str, vector: np.ndarray, text: str) -> bytes:
    return digest.encode() + np.asarray(vector, dtype="<f4").tobytes() + text.encode("utf-8", "surrogatepass")


def decode_item(item: bytes) -> tuple[str, np.ndarray, str] | None:
    if len(item) < DIGEST_BYTES + 4 * DIM:
        return None
    vector = np.frombuffer(item, dtype="<f4", count=DIM, offset=DIGEST_BYTES)
    text = item[DIGEST_BYTES + 4 * DIM :].decode("utf-8", "surrogatepass")
    return item[:DIGEST_BYTES].decode(), vector, text


@dataclass
class _Mirror:
    generation: str = ""
    length: int = 0
    digests: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, DIM), dtype=np.float32))


@dataclass(frozen=True)
class Neighbour:
    digest: str
    similarity: float


class SemanticIndex:
    def __init__(self, backend: CacheBackend, max_entries: int, max_buckets: int = 512) -> None:
        self._backend = backend
        self._max_entries = max_entries
        self._max_buckets = max_buckets
        self._mirrors: OrderedDict[str, _Mirror] = OrderedDict()

    async def _sync(self, bucket: str) -> _Mirror:
        mirror = self._mirrors.get(bucket) or _Mirror()
        read = await self._backend.index_read(bucket, mirror.length, mirror.generation)
        if read.full:
            mirror = _Mirror(generation=read.generation)
        if read.items:
            decoded = [d for d in (decode_item(i) for i in read.items) if d is not None]
            mirror.digests.extend(d for d, _, _ in decoded)
            mirror.texts.extend(t for _, _, t in decoded)
            if decoded:
                mirror.matrix = np.concatenate([mirror.matrix, np.stack([v for _, v, _ in decoded])])
        mirror.length = read.length
        self._mirrors[bucket] = mirror
        self._mirrors.move_to_end(bucket)
        while len(self._mirrors) > self._max_buckets:
            self._mirrors.popitem(last=False)
        return mirror

    async def search(
        self, bucket: str, vector: np.ndarray, text: str, threshold: float, limit: int = 3
    ) -> list[Neighbour]:
        """Entries at or above `threshold` that pass the lexical guard against `text`, most similar first
        (several, in case the best one has expired)."""
        mirror = await self._sync(bucket)
        if not mirror.digests:
            return []
        similarities = mirror.matrix @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-similarities)
        found: list[Neighbour] = []
        seen: set[str] = set()
        for i in order:
            if similarities[i] < threshold or len(found) >= limit:
                break
            digest = mirror.digests[i]
            if digest not in seen and lexically_compatible(text, mirror.texts[i]):
                seen.add(digest)
                found.append(Neighbour(digest, float(similarities[i])))
        return found

    async def add(self, bucket: str, digest: str, vector: np.ndarray, text: str, ttl_ms: int) -> None:
        await self._backend.index_add(bucket, encode_item(digest, vector, text), self._max_entries, ttl_ms)
