"""all-MiniLM-L6-v2 in numpy against sentence-transformers' own output, and the shipped semantic threshold."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cache_service.config import CacheSettings
from cache_service.embedding import BatchingEmbedder, MiniLMEncoder
from cache_service.evaluation import MAX_FALSE_HIT_RATE, THRESHOLDS, choose_threshold, guarded, load_pairs, similarities
from cache_service.evaluation import table as threshold_table

SENTENCES = [
    "What is the capital of France?",
    "Which city is the capital of France?",
    "Convert 10 miles to kilometers.",
    "Wie spät ist es? ünïcödé — test",
]
# From sentence-transformers 6.2 (SentenceTransformer on the wheel's model folder, HF_HUB_OFFLINE=1,
# normalize_embeddings=True): the first four dimensions of each embedding, and their cosine similarities.
REFERENCE_HEAD = np.array(
    [
        [0.082048, 0.036056, -0.003893, -0.004881],
        [0.07851, 0.026727, -0.006181, -0.008529],
        [0.081226, 0.066183, -0.034299, -0.048477],
        [0.007424, -0.016422, 0.060986, 0.016665],
    ]
)
REFERENCE_COSINE = np.array(
    [
        [1.0, 0.941636, 0.176418, 0.122742],
        [0.941636, 1.0, 0.123345, 0.108442],
        [0.176418, 0.123345, 1.0, 0.096271],
        [0.122742, 0.108442, 0.096271, 1.0],
    ]
)


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder.from_wheel()


def test_matches_sentence_transformers(encoder: MiniLMEncoder) -> None:
    vectors = encoder.encode(SENTENCES)
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[:, :4], REFERENCE_HEAD, atol=2e-6)
    np.testing.assert_allclose(vectors @ vectors.T, REFERENCE_COSINE, atol=2e-6)
    # Padding in a batch changes nothing: each row equals the sentence embedded alone.
    np.testing.assert_allclose(encoder.encode([SENTENCES[2]])[0], vectors[2], atol=1e-6)


def test_batching_embedder_batches_concurrent_requests(encoder: MiniLMEncoder) -> None:
    batches: list[int] = []

    async def scenario() -> list[np.ndarray]:
        embedder = BatchingEmbedder(
            encoder.encode, max_batch=8, max_delay_s=0.05, on_batch=lambda n, _: batches.append(n)
        )
        try:
            return list(await asyncio.gather(*(embedder.embed(s) for s in SENTENCES)))
        finally:
            await embedder.close()

    vectors = asyncio.run(scenario())
    assert batches == [4]
    np.testing.assert_allclose(np.stack(vectors), encoder.encode(SENTENCES), atol=1e-6)


def test_shipped_threshold_keeps_false_hits_under_one_percent(encoder: MiniLMEncoder) -> None:
    pairs = load_pairs()
    assert len(pairs) >= 300 and {p.same for p in pairs} == {True, False}
    sims = guarded(pairs, similarities(pairs, encoder.encode))
    shipped = CacheSettings().semantic_threshold
    calibrate = [i for i, p in enumerate(pairs) if p.split == "calibrate"]
    chosen = choose_threshold(threshold_table([pairs[i] for i in calibrate], sims[calibrate], THRESHOLDS))
    assert chosen == shipped, f"the calibration half now picks {chosen}; update CacheSettings and the docs"
    for split in ("calibrate", "holdout"):
        rows = [i for i, p in enumerate(pairs) if p.split == split]
        (row,) = threshold_table([pairs[i] for i in rows], sims[rows], [shipped])
        assert row.false_hit_rate < MAX_FALSE_HIT_RATE, (split, row)
        assert row.recall > 0.2, (split, row)  # the layer is worth having at this threshold


def test_onnx_graph_computes_the_numpy_reference(encoder: MiniLMEncoder) -> None:
    from cache_service.minilm_onnx import OnnxMiniLMEncoder

    fast = OnnxMiniLMEncoder(encoder, threads=1)
    texts = [*SENTENCES, "", "x", "A much longer question about " + "many words " * 60]
    # As a batch (padded to its longest text) and one by one: both equal the numpy encoder's rows.
    batch = fast.encode(texts)
    np.testing.assert_allclose(batch, encoder.encode(texts), atol=1e-5)
    for text, row in zip(texts, batch, strict=True):
        np.testing.assert_allclose(fast.encode([text])[0], row, atol=1e-5)
    np.testing.assert_allclose(batch[:4, :4], REFERENCE_HEAD, atol=5e-6)
    assert fast.encode([]).shape == (0, 384)
