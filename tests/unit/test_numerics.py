"""The served graphs against the plain PyTorch reference on the same GGUF weights, and the quantized variant's
quality against the fp32 one on the text sample in triton_models/data."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from llmesh.model_artifact import ChatTokenizer
from triton_models import quality
from triton_models.config import BuildSettings
from triton_models.engine import Engine, EngineSampling, GenerationRequest

torch = pytest.importorskip("torch")

# Needs the built ONNX model and loads the torch reference (~20 s).
pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one paragraph why the sky is blue.",
]
# fp32 everywhere; what remains is summation order (onnxruntime's GEMMs vs torch's). Logits reach |30|.
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def reference(build_settings: BuildSettings) -> Iterator[object]:
    from triton_models.gguf_loader import load_gguf
    from triton_models.reference import ReferenceLlama

    model = load_gguf(build_settings.source_path("smollm2"))
    yield ReferenceLlama(model.config, model.weights).eval()


@pytest.fixture(scope="module")
def prompts(chat_tokenizer: ChatTokenizer) -> list[list[int]]:
    return [
        chat_tokenizer.encode(chat_tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS
    ]


def test_prefill_logits_match_reference(reference, engine: Engine, prompts: list[list[int]]) -> None:  # type: ignore[no-untyped-def]
    worst = 0.0
    for prompt in prompts:
        expected = reference(torch.tensor([prompt]))[0, -1].numpy()
        actual = engine.score(prompt)
        error = float(np.abs(actual - expected).max())
        worst = max(worst, error)
        assert int(actual.argmax()) == int(expected.argmax())
    print(f"\nONNX vs torch reference: max abs logit error {worst:.2e} over {len(prompts)} prompts")
    assert worst < LOGIT_ATOL


def test_greedy_continuations_match_reference(
    reference,  # type: ignore[no-untyped-def]
    engine: Engine,
    prompts: list[list[int]],
) -> None:
    """20 greedy tokens through the KV-cache decode path equal full-recompute greedy in torch."""
    eos = frozenset(engine.metadata.eos_token_ids)
    for prompt in prompts:
        expected = reference.greedy(prompt, max_tokens=20, eos_ids=eos)
        [result] = engine.generate([GenerationRequest(prompt, EngineSampling(max_tokens=20))])
        assert result.token_ids == expected


def test_int8_variant_quality_against_fp32(engine: Engine, int8_engine: Engine, chat_tokenizer: ChatTokenizer) -> None:
    """The quantized variant serves the GGUF's own 4/8-bit blocks with int8 activations: perplexity within 5%
    of fp32 on the sample, and the same next-token prediction at >= 85% of positions (measured: 18.2 vs 17.9,
    92%)."""
    ids = quality.sample_ids(chat_tokenizer, 1024)
    fp32, int8 = quality.evaluate(engine, ids), quality.evaluate(int8_engine, ids)
    agreement = quality.top1_agreement(fp32, int8)
    print(f"\nperplexity fp32 {fp32.perplexity:.3f}, int8 {int8.perplexity:.3f}; top-1 agreement {agreement:.3f}")
    assert fp32.perplexity < 40  # a 135M model on plain English prose; garbage would be in the thousands
    assert int8.perplexity < fp32.perplexity * 1.05
    assert agreement >= 0.85
