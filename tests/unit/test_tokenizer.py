"""ChatTokenizer built from the GGUF metadata (tokenizer.json + llmesh_model.json of the built model)."""

from __future__ import annotations

import pytest

from llmesh.model_artifact import ChatTokenizer, compile_chat_template

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "2024 was 12.5% better",
    "  two  spaces\n\nnew paragraph\ttab",
    "héllo wörld, 日本語, emoji 🤗👍",
    "code: def f(x):\n    return x ** 2  # comment",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(chat_tokenizer: ChatTokenizer, text: str) -> None:
    ids = chat_tokenizer.encode(text)
    assert ids
    assert chat_tokenizer.decode(ids) == text


def test_known_encoding(chat_tokenizer: ChatTokenizer) -> None:
    # GPT-2 byte-level BPE with SmolLM's digit splitting: one token per digit, "Ġ" marks a leading space.
    assert chat_tokenizer.encode("What is the capital of France?") == [1780, 314, 260, 3575, 282, 4649, 47]
    assert chat_tokenizer.encode("2024") == [34, 32, 34, 36]


def test_no_bos_added(chat_tokenizer: ChatTokenizer) -> None:
    # The GGUF says add_bos_token = false; the chat template itself starts with <|im_start|>.
    assert chat_tokenizer.encode("Hi")[0] != 1


@pytest.mark.parametrize(
    ("token", "token_id"), [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2), ("<file_sep>", 5)]
)
def test_special_tokens_are_single_ids(chat_tokenizer: ChatTokenizer, token: str, token_id: int) -> None:
    assert chat_tokenizer.encode(token) == [token_id]
    assert chat_tokenizer.encode(f"a{token}b") == [*chat_tokenizer.encode("a"), token_id, *chat_tokenizer.encode("b")]


def test_decode_skips_special_tokens(chat_tokenizer: ChatTokenizer) -> None:
    ids = chat_tokenizer.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert chat_tokenizer.decode(ids) == "assistant\nHi there"
    assert chat_tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi there<|im_end|>"


def test_chat_template_two_turns(chat_tokenizer: ChatTokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert chat_tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello, how can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_with_system_and_no_generation_prompt(chat_tokenizer: ChatTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_encodes_with_single_special_ids(chat_tokenizer: ChatTokenizer) -> None:
    ids = chat_tokenizer.encode(chat_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_template_raise_exception_is_a_value_error() -> None:
    template = compile_chat_template(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
    )
    assert template.render(messages=[{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(ValueError, match="first message must be user"):
        template.render(messages=[{"role": "assistant", "content": ""}])


def test_template_is_sandboxed() -> None:
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        compile_chat_template("{{ ''.__class__.__mro__ }}").render(messages=[])


def test_model_facts(chat_tokenizer: ChatTokenizer) -> None:
    # <|im_end|> is the GGUF's eos; <|endoftext|> also ends generation (llama.cpp treats both as end-of-turn).
    assert chat_tokenizer.eos_token_ids == frozenset({0, 2})
    assert chat_tokenizer.context_length == 2048
    assert chat_tokenizer.vocab_size == 49152


def test_decode_stream_handles_split_characters(chat_tokenizer: ChatTokenizer) -> None:
    text = "日本語 🤗 ok"
    stream = chat_tokenizer.decode_stream()
    pieces = [stream.step(chat_tokenizer.hf_tokenizer, i) for i in chat_tokenizer.encode(text)]
    assert "".join(p for p in pieces if p) == text
