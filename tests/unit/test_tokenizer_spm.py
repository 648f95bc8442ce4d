"""SentencePiece ("llama") GGUF tokenizers as HF tokenizers: ids equal to a direct port of llama.cpp's SPM tokenizer.

The reference below is deliberately naive (quadratic, no priority queue) so it is easy to check by eye against
llama.cpp's `tokenizer_st_partition` + `llm_tokenizer_spm_session`; the tokenizer under test is the HF BPE built
by `triton_models.tokenizer.build_tokenizer`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from triton_models.gguf_loader import TokenizerMetadata
from triton_models.tokenizer import build_tokenizer, eos_token_ids

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SPACE = "\u2581"
DATA = Path(__file__).resolve().parents[2] / "triton_models" / "data"


class SpmReference:
    """llama.cpp's SPM tokenization (with parse_special = true) of a GGUF vocabulary."""

    def __init__(self, meta: TokenizerMetadata) -> None:
        self.meta = meta
        self.vocab = {token: i for i, token in enumerate(meta.tokens)}
        # Special tokens (control, user defined, unknown), longest in UTF-8 bytes first.
        specials = [i for i, kind in enumerate(meta.token_types) if kind in (CONTROL, USER_DEFINED, UNKNOWN)]
        self.specials = sorted(specials, key=lambda i: len(meta.tokens[i].encode()), reverse=True)

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        meta = self.meta
        # 1. Each special token in turn is cut out of the remaining text fragments, left to right.
        fragments: list[str | int] = [text] if text else []
        for special in self.specials:
            token = meta.tokens[special]
            if not token or token not in text:  # a shortcut only: it cannot occur in any fragment
                continue
            cut: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int):
                    cut.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(token)):
                    if k:
                        cut.append(special)
                    if part:
                        cut.append(part)
            fragments = cut
        # 2. BOS, then each fragment: special ids as they are, raw text through the SPM merge.
        ids: list[int] = []
        if add_special and meta.add_bos and meta.bos_id is not None:
            ids.append(meta.bos_id)
        prev_special = True
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
                prev_special = True
                continue
            if meta.add_space_prefix and prev_special:
                fragment = " " + fragment
            ids.extend(self._merge(fragment.replace(" ", SPACE)))
            prev_special = False
        return ids

    def _merge(self, text: str) -> list[int]:
        vocab, scores = self.vocab, self.meta.scores
        symbols = list(text)  # UTF-8 characters
        while True:
            # The adjacent pair whose concatenation is a vocab token (any kind) with the highest score; leftmost
            # on ties.
            best, best_score = -1, 0.0
            for i in range(len(symbols) - 1):
                token = vocab.get(symbols[i] + symbols[i + 1])
                if token is not None and (best < 0 or scores[token] > best_score):
                    best, best_score = i, scores[token]
            if best < 0:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        ids: list[int] = []
        for symbol in symbols:
            if symbol in vocab:
                ids.append(vocab[symbol])
            else:  # a character without a token: its UTF-8 bytes
                ids.extend(vocab[f"<0x{byte:02X}>"] for byte in symbol.encode())
        return ids


# --- synthetic vocabulary: ids predictable by hand, no GGUF needed ---------------------------------------------

_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _synthetic(*, add_space_prefix: bool = False) -> TokenizerMetadata:
    # (token, type, score). Scores decide the merge order: "▁a" (-1) beats "ab" (-2) in "▁ab", so "▁ab" comes
    # from "▁a" + "b"; "abc" exists but needs "ab" + "c" or "a" + "bc", and "bc" merges first in "abc" (-1.5).
    entries: list[tuple[str, int, float]] = [
        ("<pad>", CONTROL, -1000.0),
        ("<eos>", CONTROL, -1000.0),
        ("<bos>", CONTROL, -1000.0),
        ("<unk>", CONTROL, -1000.0),
        ("<turn>", CONTROL, -1000.0),
        ("\n", USER_DEFINED, -1000.0),
        ("  ", USER_DEFINED, -1000.0),
        *((b, BYTE, 0.0) for b in _BYTES),
        ("a", NORMAL, -10.0),  # id 263
        ("b", NORMAL, -11.0),
        ("c", NORMAL, -12.0),
        (SPACE, NORMAL, -13.0),
        ("é", NORMAL, -14.0),
        ("ab", NORMAL, -2.0),  # 268
        ("bc", NORMAL, -1.5),
        ("abc", NORMAL, -3.0),
        (SPACE + "a", NORMAL, -1.0),  # 271
        (SPACE + "ab", NORMAL, -4.0),
        ("ca", NORMAL, -5.0),
    ]
    return TokenizerMetadata(
        model="llama",
        pre="default",
        tokens=[t for t, _, _ in entries],
        token_types=[k for _, k, _ in entries],
        merges=[],
        bos_id=2,
        eos_id=1,
        unk_id=3,
        pad_id=0,
        add_bos=True,
        add_eos=False,
        chat_template=None,
        scores=[s for _, _, s in entries],
        add_space_prefix=add_space_prefix,
    )


A, B, C, SP, E_ACUTE, AB, BC, ABC, SP_A, SP_AB, CA = range(263, 274)


def _byte(b: int) -> int:
    return 7 + b


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ab", [AB]),
        ("abc", [ABC]),  # "bc" (-1.5) merges before "ab" (-2), then "a" + "bc" = "abc"
        ("cab", [C, AB]),  # "ab" (-2) before "ca" (-5); "c" + "ab" is no token
        ("abab", [AB, AB]),  # equal scores: leftmost first
        (" ab", [SP_AB]),  # "▁a" (-1) first, then "▁a" + "b" = "▁ab"
        (" abc", [SP_A, BC]),  # "▁a", then "bc" (-1.5) beats "▁ab" (-4); "▁a" + "bc" is no token
        ("a b", [A, SP, B]),
        ("a  b", [A, 6, B]),  # two spaces are the user-defined token, matched in the raw text
        ("a\nb", [A, 5, B]),
        ("<turn>a", [4, A]),  # control token: whole, skipped by decode
        ("aé", [A, E_ACUTE]),
        ("aü", [A, _byte(0xC3), _byte(0xBC)]),  # no "ü" token: its two UTF-8 bytes
        ("😀", [_byte(0xF0), _byte(0x9F), _byte(0x98), _byte(0x80)]),
    ],
)
def test_synthetic_vocab(text: str, expected: list[int]) -> None:
    meta = _synthetic()
    tokenizer = build_tokenizer(meta)
    assert SpmReference(meta).encode(text, add_special=False) == expected
    assert tokenizer.encode(text, add_special_tokens=False).ids == expected
    assert tokenizer.encode(text).ids == [2, *expected]  # add_bos_token
    assert tokenizer.decode([2, *expected]) == text.replace("<turn>", "")


@pytest.mark.parametrize(
    ("text", "expected", "decoded"),
    [
        ("ab", [SP_AB], "ab"),
        ("b", [SP, B], "b"),
        ("<turn>ab", [4, SP_AB], "ab"),
        # llama.cpp puts the space after every special fragment, user-defined ones included (so this does not
        # round-trip, in llama.cpp either).
        ("a\nb", [SP_A, 5, SP, B], "a\n b"),
    ],
)
def test_synthetic_add_space_prefix(text: str, expected: list[int], decoded: str) -> None:
    meta = _synthetic(add_space_prefix=True)
    tokenizer = build_tokenizer(meta)
    assert SpmReference(meta).encode(text, add_special=False) == expected
    assert tokenizer.encode(text, add_special_tokens=False).ids == expected
    assert tokenizer.decode(expected) == decoded


def test_synthetic_merges_follow_scores() -> None:
    tokenizer = build_tokenizer(_synthetic())
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # Every split of a normal token into two normal tokens, best score first; none into byte / special tokens.
    assert [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges] == [
        (SPACE, "a"),  # "▁a" -1
        ("b", "c"),  # "bc" -1.5
        ("a", "b"),  # "ab" -2
        ("a", "bc"),  # "abc" -3
        ("ab", "c"),
        (SPACE, "ab"),  # "▁ab" -4 (ties by left id: "▁" < "▁a")
        (SPACE + "a", "b"),
        ("c", "a"),  # "ca" -5
    ]


# --- the Gemma-3-270M GGUF's 262,144-token vocabulary ------------------------------------------------------------


@dataclass(frozen=True)
class Gemma:
    meta: TokenizerMetadata
    tokenizer: Tokenizer
    build_seconds: float
    reference: SpmReference


@pytest.fixture(scope="module")
def gemma() -> Iterator[Gemma]:
    from gguf import GGUFReader

    from triton_models.gguf_loader import read_tokenizer
    from triton_models.sources import gemma_gguf_path

    try:
        path = gemma_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"Gemma-3-270M GGUF not available: {e}")
    meta = read_tokenizer(GGUFReader(str(path)))
    start = time.perf_counter()
    tokenizer = build_tokenizer(meta)
    yield Gemma(meta, tokenizer, time.perf_counter() - start, SpmReference(meta))


CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris, of course!",
    " leading space, trailing space ",
    "  two leading spaces and   three inside   ",
    "tabs\tand\t\ttwo tabs",
    "line one\nline two\n\nparagraph\n\n\n\nfour newlines\r\nCRLF",
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n    return -x\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "2024-06-01 12:34:56.789 3.14159 1,000,000 0x1F 1e-9",
    "Punctuation!?.,;:'\"()[]{}<>/\\|@#$%^&*_+=-~`",
    "héllo wörld, façade, naïve, Ærøskøbing, ñandú",
    "日本語のテキスト、中文文本\uff0c한국어 텍스트",
    "emoji 🤗👍🏽 \U0001f468\u200d\U0001f469\u200d\U0001f467 🇫🇷",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
    "mixed<b>bold</b> and <table><tr><td>cell</td></tr></table> html",
    "<p> </p> a> </a",  # ">▁</" is a token spanning a space: why there is no pre-tokenizer splitting at spaces
    "literal <unused12> and <mask> control tokens",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\nHello, how can I help?<end_of_turn>\n"
    "<start_of_turn>user\nWrite a haiku about   spaces.<end_of_turn>\n<start_of_turn>model\n",
    "a" * 300,
    " " * 40 + "x" + "\n" * 40,
    "rare chars: \u0000\u0007 \ufeff \U0001d54f \U000e0041",
    "",
]


def _pride_and_prejudice() -> str:
    return (DATA / "pride_and_prejudice_ch1.txt").read_text(encoding="utf-8")[:3000]


def _corpus() -> list[str]:
    return [*CORPUS, _pride_and_prejudice()]


def test_gemma_build(gemma: Gemma) -> None:
    model = json.loads(gemma.tokenizer.to_str())["model"]
    assert len(model["vocab"]) == 262144
    assert len(model["merges"]) > 500_000
    assert gemma.tokenizer.get_vocab_size() == 262144
    assert gemma.build_seconds < 60, f"building the tokenizer took {gemma.build_seconds:.1f}s"


def test_gemma_tokenizer_json(gemma: Gemma) -> None:
    # The build saves tokenizer.json and serving loads it: the reloaded tokenizer must encode the same.
    reloaded = Tokenizer.from_str(gemma.tokenizer.to_str())
    for text in _corpus():
        assert reloaded.encode(text).ids == gemma.tokenizer.encode(text).ids


def test_gemma_matches_llama_cpp_reference(gemma: Gemma) -> None:
    mismatches = []
    for text in _corpus():
        expected = gemma.reference.encode(text)
        got = gemma.tokenizer.encode(text).ids
        if got != expected:
            mismatches.append((text[:60], expected[:40], got[:40]))
    assert not mismatches


@pytest.mark.parametrize("text", _corpus())
def test_gemma_round_trip(gemma: Gemma, text: str) -> None:
    ids = gemma.tokenizer.encode(text).ids
    assert ids[0] == gemma.meta.bos_id
    plain = text
    for control in ("<bos>", "<start_of_turn>", "<end_of_turn>", "<unused12>", "<mask>"):
        plain = plain.replace(control, "")
    assert gemma.tokenizer.decode(ids) == plain  # control tokens skipped
    assert gemma.tokenizer.decode(ids[1:], skip_special_tokens=False) == text


def test_gemma_special_tokens(gemma: Gemma) -> None:
    assert gemma.tokenizer.encode("<start_of_turn>").ids == [2, 105]
    assert gemma.tokenizer.encode("<end_of_turn>", add_special_tokens=False).ids == [106]
    assert gemma.tokenizer.encode("a\n\nb", add_special_tokens=False).ids == [
        gemma.meta.tokens.index("a"),
        108,
        gemma.meta.tokens.index("b"),
    ]
    assert eos_token_ids(gemma.meta) == (1, 106)
    assert gemma.meta.add_bos and not gemma.meta.add_space_prefix
