"""The exported ONNX graph (run by the engine) against the plain PyTorch reference on the same GGUF weights."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from triton_models.config import BuildSettings
from triton_models.engine import GenerationRequest, Generator, SamplingParams
from triton_models.tokenizer import ChatTokenizer

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

    model = load_gguf(build_settings.gguf_path)
    yield ReferenceLlama(model.config, model.weights).eval()


@pytest.fixture(scope="module")
def prompts(chat_tokenizer: ChatTokenizer) -> list[list[int]]:
    return [
        chat_tokenizer.encode(chat_tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS
    ]


def test_prefill_logits_match_reference(reference, generator: Generator, prompts: list[list[int]]) -> None:  # type: ignore[no-untyped-def]
    worst = 0.0
    for prompt in prompts:
        expected = reference(torch.tensor([prompt]))[0, -1].numpy()
        actual = generator.last_logits([prompt])[0]
        error = float(np.abs(actual - expected).max())
        worst = max(worst, error)
        assert int(actual.argmax()) == int(expected.argmax())
    print(f"\nONNX vs torch reference: max abs logit error {worst:.2e} over {len(prompts)} prompts")
    assert worst < LOGIT_ATOL


def test_left_padded_batch_matches_single(generator: Generator, prompts: list[list[int]]) -> None:
    batched = generator.last_logits(prompts)  # different lengths: shorter prompts are left-padded
    worst = 0.0
    for i, prompt in enumerate(prompts):
        worst = max(worst, float(np.abs(batched[i] - generator.last_logits([prompt])[0]).max()))
    print(f"\nleft-padded batch vs single: max abs logit error {worst:.2e}")
    assert worst < LOGIT_ATOL


def test_greedy_continuations_match_reference(
    reference,  # type: ignore[no-untyped-def]
    generator: Generator,
    prompts: list[list[int]],
) -> None:
    """20 greedy tokens through the KV-cache decode path equal full-recompute greedy in torch."""
    eos = frozenset(generator.metadata.eos_token_ids)
    for prompt in prompts:
        expected = reference.greedy(prompt, max_tokens=20, eos_ids=eos)
        [result] = generator.generate([GenerationRequest(prompt, SamplingParams(max_tokens=20))])
        assert result.token_ids == expected
