"""`llmesh build --hf DIR`: a local Hugging Face Llama checkpoint becomes two served variants (fp32 and 8-bit)
with its own tokenizer and chat template, and the engine serves them with the checkpoint's numerics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from llmesh.model_artifact import ChatTokenizer
from tests.unit.test_graph import CFG, _logits, _random_gguf_layout, write_hf_checkpoint
from triton_models.catalogue import hf_variant_names
from triton_models.config import BuildSettings, add_build_arguments, settings_from
from triton_models.engine import Engine, EngineSampling, GenerationRequest
from triton_models.repository import build_key, ensure_model_repository

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _checkpoint(directory: Path) -> np.ndarray:
    """A tiny random Llama in Hugging Face layout (and its logits for a fixed prompt, from the GGUF layout)."""
    rng = np.random.default_rng(5)
    gguf = _random_gguf_layout(rng)
    c = CFG
    write_hf_checkpoint(directory, gguf, eos_token_id=2)
    # A word-level vocabulary of exactly vocab_size entries: specials first, then w0, w1, ...
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab |= {f"w{i}": len(vocab) + i for i in range(c.vocab_size - len(specials))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE})
    )
    return _logits(gguf, [1, 3, 10, 11, 12, 4])


def test_hugging_face_checkpoint_builds_and_serves(tmp_path: Path) -> None:
    directory = tmp_path / "Tiny_Llama"
    expected = _checkpoint(directory)
    fp32, int8 = hf_variant_names(directory)
    assert (fp32, int8) == ("tiny-llama", "tiny-llama-int8")

    import argparse

    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    argv = ["--hf", str(directory), "--variants", fp32, int8, "--max-context", "64", "--cache-dir", str(tmp_path)]
    settings = settings_from(parser.parse_args(argv))
    assert settings.variants == (fp32, int8) and settings.max_context == 64 and settings.cache_dir == tmp_path
    with pytest.raises(ValueError, match="unknown variant"):
        BuildSettings(variants=(fp32,))  # without --hf the name means nothing

    repository = ensure_model_repository(settings)
    version = repository / fp32 / "1"
    tokenizer = ChatTokenizer.from_model_dir(version)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "w4 w5 w6"}]))
    assert prompt == [1, 3, 10, 11, 12, 2, 4]  # one BOS (the template's), the turn, the generation prompt
    assert tokenizer.eos_token_ids == frozenset({2})

    engine = Engine.from_model_dir(version)
    try:
        logits = engine.score([1, 3, 10, 11, 12, 4], all_positions=True)
        assert np.abs(logits - expected).max() < 1e-4
        [result] = engine.generate([GenerationRequest(prompt, EngineSampling(max_tokens=5))])
        assert result.finish_reason in ("stop", "length") and result.error is None
    finally:
        engine.close()
    quantized = Engine.from_model_dir(repository / int8 / "1")
    try:
        # 8-bit weights and int8 activations (accuracy_level 4): close, and the same next tokens.
        served = quantized.score([1, 3, 10, 11, 12, 4], all_positions=True)
        assert np.abs(served - expected).max() < 0.3
        assert (served.argmax(axis=1) == expected.argmax(axis=1)).all()
    finally:
        quantized.close()

    # The checkpoint's bytes are in the cache key: a changed file means a new build.
    before = build_key(settings)
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    assert build_key(settings) != before
