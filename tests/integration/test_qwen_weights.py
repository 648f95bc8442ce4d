"""Qwen2.5-Coder-0.5B and -1.5B-Instruct's real weights served by llmesh's engine, against llama.cpp on the same
GGUF: greedy continuations of chat prompts and perplexity, recorded from llama.cpp's own tools in
tests/data/qwen_llamacpp_greedy.json (`python -m benchmarks.engine.qwen_reference` regenerates it).

The served graph computes with the GGUF's blocks as they are (graph.py, weights.py) and int8 activations, as
llama.cpp does with its 8-bit activation blocks; the two are not bit-identical, so the checks are what a user sees:
the same greedy text, and perplexity within 1%. Measured when written: every continuation identical for both
sizes; perplexity 33.24 vs 33.09 (0.5B), 11.77 vs 11.78 (1.5B).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmesh.model_artifact import ChatTokenizer
from triton_models import quality
from triton_models.catalogue import QWEN_VARIANTS
from triton_models.config import BuildSettings
from triton_models.engine import Engine, EngineSampling, GenerationRequest
from triton_models.repository import ensure_model_repository

pytestmark = pytest.mark.slow

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "qwen_llamacpp_greedy.json").read_text())["models"]


@pytest.fixture(scope="module")
def qwen_repository() -> Path:
    return ensure_model_repository(BuildSettings(variants=QWEN_VARIANTS))


@pytest.fixture(scope="module", params=["0.5b", "1.5b"])
def served(request: pytest.FixtureRequest, qwen_repository: Path) -> Iterator[tuple[str, Engine, Path]]:
    size = request.param
    version_dir = qwen_repository / f"qwen2.5-coder-{size}" / "1"
    engine = Engine.from_model_dir(version_dir)
    yield size, engine, version_dir
    engine.close()


# Logit gap under which two greedy choices are a tie that rounding decides: the engine's kernels differ by CPU (AVX2
# vs AVX-512) and from llama.cpp's, so a near-tie may fall either way. Measured: the one such case seen, on an AVX2
# CPU, was 0.02 (EOS vs " This" in the 0.5B's "explanation"); a wrong weight or op moves logits by whole units.
NEAR_TIE = 0.1


def test_greedy_continuations_are_llama_cpps(served: tuple[str, Engine, Path]) -> None:
    size, engine, version_dir = served
    tokenizer = ChatTokenizer.from_model_dir(version_dir)
    stops = set(engine.metadata.eos_token_ids)
    ties = []
    for name, case in GOLDEN[size]["prompts"].items():
        # llmesh renders the same prompt ids from the same messages (the chat template of the GGUF)...
        assert tokenizer.encode_chat(case["messages"]) == case["prompt_ids"], name
        # ...and continues them with llama.cpp's tokens (llama.cpp's list ends with the stop token it emitted), up to
        # a near-tie at most, where the rest is not compared.
        theirs = case["greedy"]["ids"]
        [result] = engine.generate([GenerationRequest(case["prompt_ids"], EngineSampling(max_tokens=32))])
        ours = list(result.token_ids)
        if result.finish_reason == "stop":
            ours.append(next((t for t in theirs if t in stops), min(stops)))
        diverged = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        if diverged is None:
            assert ours == [t for t in theirs if t not in stops] or ours == theirs or len(ours) == 32, name
            continue
        logits = engine.score([*case["prompt_ids"], *theirs[:diverged]])
        gap = float(logits[ours[diverged]] - logits[theirs[diverged]])
        context = (name, diverged, gap, tokenizer.decode(ours), tokenizer.decode(theirs))
        assert gap < NEAR_TIE, context
        ties.append(context)
    assert len(ties) <= 1, ties


def test_perplexity_is_llama_cpps(served: tuple[str, Engine, Path]) -> None:
    size, engine, version_dir = served
    reference = GOLDEN[size]["perplexity"]
    ids = ChatTokenizer.from_model_dir(version_dir).encode(quality.SAMPLE.read_text())
    assert len(ids) == reference["sample_tokens"]
    perplexity, scored = quality.chunked_perplexity(engine, ids, reference["n_ctx"])
    print(f"\n{size}: perplexity {perplexity:.3f}, llama.cpp {reference['ppl']:.3f}")
    assert scored == reference["scored_tokens"]
    assert abs(perplexity / reference["ppl"] - 1) < 0.01


def test_speculative_decoding_with_the_small_qwen_drafting_is_exactly_greedy(qwen_repository: Path) -> None:
    import dataclasses

    version_dir = qwen_repository / "qwen2.5-coder-1.5b" / "1"
    speculative = Engine.from_model_dir(version_dir)
    assert speculative.draft is not None and speculative.config.draft == "qwen2.5-coder-0.5b"
    plain = Engine.from_model_dir(version_dir, dataclasses.replace(speculative.config, speculative_k=0))
    tokenizer = ChatTokenizer.from_model_dir(version_dir)
    try:
        for question in (
            "Write a Python function that checks whether a string is a palindrome.",
            "Explain how a hash map works, step by step.",
        ):
            prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
            request = GenerationRequest(prompt, EngineSampling(max_tokens=64))
            [expected] = plain.generate([request])
            [result] = speculative.generate([request])
            assert result.token_ids == expected.token_ids, (tokenizer.decode(result.token_ids), question)
        stats = speculative.stats
        assert stats.spec_accepted > stats.spec_proposed / 2  # the 0.5B predicts the 1.5B most of the time
    finally:
        speculative.close()
        plain.close()


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_batched(qwen_repository: Path) -> None:
    """Same seed and request, same tokens, also beside other requests: a lone seeded row runs as a batch of two
    (scheduler._forward_beside_scratch), so the one-row kernels never compute it. Measured when written: without
    that, the 0.5B's answer below changed within its first 16 tokens when batched (AMD EPYC, AVX2)."""
    version_dir = qwen_repository / "qwen2.5-coder-0.5b" / "1"
    engine = Engine.from_model_dir(version_dir)
    tokenizer = ChatTokenizer.from_model_dir(version_dir)

    def request(text: str, seed: int | None) -> GenerationRequest:
        prompt = tokenizer.encode_chat([{"role": "user", "content": text}])
        return GenerationRequest(prompt, EngineSampling(max_tokens=24, temperature=1.0, seed=seed))

    seeded = request("Write a short poem about the sea.", 4321)
    others = [request(text, None) for text in ("Tell me a joke.", "What is 2+2?", "Name a color.")]
    try:
        [alone] = engine.generate([seeded])
        beside_first = engine.generate([seeded, *others])[0]
        beside_last = engine.generate([*others, seeded])[-1]
        assert alone.token_ids == beside_first.token_ids == beside_last.token_ids
        [other_seed] = engine.generate([request("Write a short poem about the sea.", 4322)])
        assert other_seed.token_ids != alone.token_ids
    finally:
        engine.close()
