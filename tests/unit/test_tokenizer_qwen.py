"""Qwen2.5-Coder's tokenizer, built from its GGUF metadata, gives llama.cpp's ids (tests/data golden files).

The golden ids come from llama.cpp itself (benchmarks/engine/qwen_reference.py regenerates them); the GGUFs from
the Qwen part packages (skipped, with the reason, when those are not installed).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from llmesh.model_artifact import ChatTokenizer, ModelMetadata

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = json.loads((DATA / "qwen2_tokenizer_llamacpp.json").read_text(encoding="utf-8"))
GREEDY = json.loads((DATA / "qwen_llamacpp_greedy.json").read_text(encoding="utf-8"))
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@functools.cache
def qwen_tokenizer_metadata(size: str = "0.5b") -> Any:
    """The GGUF's tokenizer metadata (reading 151,936 tokens and their merges takes a few seconds: once per run)."""
    from gguf import GGUFReader

    from triton_models.gguf_loader import read_tokenizer
    from triton_models.sources import qwen_gguf_path

    try:
        path = qwen_gguf_path(size)
    except FileNotFoundError as e:
        pytest.skip(f"Qwen2.5-Coder-{size} GGUF not available (its part packages are not installed): {e}")
    return read_tokenizer(GGUFReader(str(path)))


@functools.cache
def qwen_chat_tokenizer(size: str = "0.5b") -> ChatTokenizer:
    """The ChatTokenizer a built Qwen variant serves with: tokenizer.json saved and loaded back, as the builder and
    the router do, and the metadata the builder writes. Shared: tests must not change it."""
    from triton_models.tokenizer import build_tokenizer, eos_token_ids

    meta = qwen_tokenizer_metadata(size)
    tokenizer = Tokenizer.from_str(build_tokenizer(meta).to_str())
    metadata = ModelMetadata(
        variant=f"qwen2.5-coder-{size}",
        context_length=32768,
        vocab_size=len(meta.tokens),
        num_layers=1,
        num_kv_heads=1,
        head_dim=1,
        eos_token_ids=eos_token_ids(meta),
        bos_token=meta.tokens[meta.bos_id] if meta.bos_id is not None else None,
        eos_token=meta.tokens[meta.eos_id] if meta.eos_id is not None else None,
        chat_template=meta.chat_template,
        ort_threads=1,
    )
    return ChatTokenizer(tokenizer, metadata)


@pytest.fixture(scope="module")
def qwen() -> ChatTokenizer:
    return qwen_chat_tokenizer("0.5b")


@pytest.fixture(scope="module")
def plain(qwen: ChatTokenizer) -> Tokenizer:
    """Control-token spellings as text: llama.cpp's parse_special=false."""
    tokenizer = Tokenizer.from_str(qwen.hf_tokenizer.to_str())
    tokenizer.encode_special_tokens = True
    return tokenizer


def test_metadata_is_what_the_tokenizer_assumes(qwen: ChatTokenizer) -> None:
    meta = qwen_tokenizer_metadata("0.5b")
    assert (meta.model, meta.pre, len(meta.tokens)) == ("gpt2", "qwen2", 151936)
    # No BOS is added (llama.cpp reads add_bos_token false), so ids start with the text's own.
    assert not meta.add_bos
    assert qwen.encode("Hi") == [13048]
    # <|im_end|> is the GGUF's eos; <|endoftext|> and Qwen's FIM separators also end generation, as in llama.cpp.
    assert qwen.metadata.eos_token_ids == (151643, 151645, 151662, 151663, 151664)


def test_golden_file_covers_the_families() -> None:
    texts = [case["text"] for case in GOLDEN["cases"]]
    assert len(texts) >= 300
    assert "llama-cpp-python" in GOLDEN["llama_cpp"] and GOLDEN["regenerate"]
    for probe in ("12345678901234567890", "'LL", "\r\n", "<|im_end|>", "👨‍👩‍👧‍👦", "e\u0301", "\t\t"):
        assert any(probe in t for t in texts), probe


# llama.cpp (this version) makes the vocab's ordinary "</s>" (id 128247) a control token, and an end-of-generation
# one, for every vocabulary (a name on its list for PaddleOCR). llmesh does not copy that: for a coder model "</s>"
# is HTML, and an HTML strikethrough in a prompt or an answer must stay text. So with parse_special the two differ
# on text that spells "</s>"; without it they agree.
LLAMA_CPP_LONE_SLASH_S = 128247


def _mismatches(tokenizer: Tokenizer, key: str) -> list[str]:
    bad = []
    for case in GOLDEN["cases"]:
        if key == "ids_parse_special" and LLAMA_CPP_LONE_SLASH_S in case[key]:
            continue
        ids = tokenizer.encode(case["text"], add_special_tokens=False).ids
        if ids != case[key]:
            bad.append(f"{case['text']!r}: llmesh {ids} llama.cpp {case[key]}")
    return bad


def test_ids_match_llama_cpp(plain: Tokenizer) -> None:
    # Text as text (llama.cpp parse_special=false); user-defined tokens such as <tool_call> still match whole.
    assert _mismatches(plain, "ids") == []


def test_ids_match_llama_cpp_with_control_tokens(qwen: ChatTokenizer) -> None:
    # Control-token spellings as control tokens (llama.cpp parse_special=true): how rendered templates encode.
    assert _mismatches(qwen.hf_tokenizer, "ids_parse_special") == []


def test_slash_s_stays_text(qwen: ChatTokenizer) -> None:
    diverging = [case for case in GOLDEN["cases"] if LLAMA_CPP_LONE_SLASH_S in case["ids_parse_special"]]
    assert [case["text"] for case in diverging] == ["<s></s><unk><pad>"]  # the only one; others must match
    for case in diverging:
        assert qwen.encode(case["text"]) == case["ids"]
    assert LLAMA_CPP_LONE_SLASH_S not in qwen.eos_token_ids


def test_decode_round_trips(qwen: ChatTokenizer) -> None:
    for case in GOLDEN["cases"]:
        assert qwen.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_chat_template_renders_chatml(qwen: ChatTokenizer) -> None:
    system_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert qwen.apply_chat_template(system_user) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a system message the template inserts Qwen's default one.
    assert qwen.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    multi_turn = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert qwen.apply_chat_template(multi_turn, add_generation_prompt=False) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    )
    ids = qwen.encode_chat(system_user)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
def test_chat_prompts_encode_as_llama_cpp_does(size: str) -> None:
    # The greedy references' prompts: rendered by the GGUF's template, tokenized by llama.cpp.
    qwen = qwen_chat_tokenizer(size)
    for name, prompt in GREEDY["models"][size]["prompts"].items():
        assert qwen.apply_chat_template(prompt["messages"]) == prompt["prompt_text"], name
        assert qwen.encode_chat(prompt["messages"]) == prompt["prompt_ids"], name


def test_sizes_share_the_tokenizer() -> None:
    small, large = qwen_tokenizer_metadata("0.5b"), qwen_tokenizer_metadata("1.5b")
    for field in ("model", "pre", "tokens", "token_types", "merges", "bos_id", "eos_id", "pad_id", "add_bos"):
        assert getattr(small, field) == getattr(large, field), field
    # The two templates differ only inside the tool-use branch (the 1.5B's doubles the braces of its JSON
    # example), which llmesh never takes: every conversation without tools renders the same.
    conversation = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    a, b = qwen_chat_tokenizer("0.5b"), qwen_chat_tokenizer("1.5b")
    for messages in (conversation, conversation[1:]):
        assert a.apply_chat_template(messages) == b.apply_chat_template(messages)
