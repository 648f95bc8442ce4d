"""Regenerate the llama.cpp reference data the Qwen2.5-Coder tests compare against (tests/data/qwen*.json).

    python -m benchmarks.engine.qwen_reference            # all three files, both sizes
    python -m benchmarks.engine.qwen_reference --only tokenizer

Uses the llama.cpp build of benchmarks/engine/build_llama_server.sh (llama-server and llama-perplexity, built once
into the llmesh cache) and the GGUFs joined by `triton_models.sources.qwen_gguf_path`. Not run by tests or CI:
they only read the JSON it writes.

- qwen2_tokenizer_llamacpp.json: ~300 strings and the ids llama.cpp's tokenizer gives them (llama-server
  POST /tokenize, add_special false), once with parse_special false (control-token spellings are text) and once
  true. Both sizes share the vocabulary (tests/unit/test_tokenizer_qwen.py checks that); the 0.5B's is used.
- qwen_llamacpp_greedy.json: per size, greedy continuations (32 tokens) of ChatML prompts rendered with the GGUF's
  own chat template, as token ids (prompt ids from llama.cpp's tokenizer too), and llama-perplexity's estimate
  on triton_models/data/pride_and_prejudice_ch1.txt with the exact command.
"""

# Look-alike characters (fullwidth digits, Greek, Fraktur, curly quotes) are what the tokenizer strings test.
# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control.process import ManagedProcess, free_port, http_ok_probe
from llmesh.model_artifact import compile_chat_template

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = Path(__file__).resolve().parent / "build_llama_server.sh"
DATA = REPO / "tests" / "data"
TOKENIZER_FILE = "qwen2_tokenizer_llamacpp.json"
GREEDY_FILE = "qwen_llamacpp_greedy.json"
SAMPLE = REPO / "triton_models" / "data" / "pride_and_prejudice_ch1.txt"
SIZES = ("0.5b", "1.5b")
N_PREDICT = 32
THREADS = 2

# Chat prompts for the greedy references: the GGUF's template renders them (the user-only ones get Qwen's default
# system prompt from the template itself).
CHAT_PROMPTS: dict[str, list[dict[str, str]]] = {
    "python_function": [
        {"role": "system", "content": "You are a helpful coding assistant."},
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."},
    ],
    "factual": [{"role": "user", "content": "What is the capital of France?"}],
    "arithmetic": [{"role": "user", "content": "What is 17 * 23? Answer with the number only."}],
    "explanation": [
        {"role": "user", "content": "What does a hash map do?"},
        {"role": "assistant", "content": "It maps keys to values."},
        {"role": "user", "content": "Explain in one sentence why lookups are fast."},
    ],
}


GREEDY_NOTES = [
    "prompt_ids: prompt_text tokenized by llama.cpp with parse_special (control tokens as their ids), no BOS.",
    "greedy.ids: the generated ids; when stop_type is 'eos' the last one is the end-of-generation token.",
    "perplexity: llama-perplexity tokenizes the whole file (no BOS: the GGUF says add_bos_token false), cuts it "
    "into floor(tokens / n_ctx) chunks of n_ctx tokens (the rest is unused), evaluates each chunk alone from "
    "position 0 (fresh KV cache), and scores the second half only: the logits at positions n_ctx/2 .. n_ctx-2 "
    "against the tokens at n_ctx/2+1 .. n_ctx-1, i.e. n_ctx/2 - 1 tokens per chunk; ppl = exp(mean NLL) over all "
    "scored tokens of all chunks; running_ppl_after_each_chunk is that estimate after each chunk.",
]


def llama_cpp_version() -> str:
    """The llama.cpp source the build script compiles: the llama-cpp-python sdist it pins (the vendored tree has no
    git metadata, so llama.cpp's own build number reads 0 / unknown)."""
    match = re.search(r"LLAMA_CPP_PYTHON_VERSION:-([0-9.]+)", BUILD_SCRIPT.read_text())
    if match is None:
        raise RuntimeError(f"no llama-cpp-python version in {BUILD_SCRIPT.name}")
    version = os.environ.get("LLAMA_CPP_PYTHON_VERSION", match.group(1))
    return f"llama.cpp vendored in llama-cpp-python=={version} (sdist)"


def llama_bin_dir() -> Path:
    """Where the build script's binaries are (it builds them on first use, ~8 min on 2 cores)."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1]).parent


def _env(bin_dir: Path) -> dict[str, str]:
    return {**os.environ, "LD_LIBRARY_PATH": f"{bin_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


# ---- the tokenizer strings --------------------------------------------------------------------------------------

_CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n",
    "if x:\n\tif y:\n\t\treturn 1\n\telse:\n\t\treturn 2\n",
    "for i in range(10):\n    print(i)\n\n\n\nprint('done')",
    "    \n    \n        pass\n",
    "import os, sys\nfrom typing import Any  # noqa: F401\n",
    "x = [1, 2, 3]\ny = {'a': 1, \"b\": 2}\nz = (x, y)\n",
    'print(f"{name!r:>10} = {value:.3f}")',
    "lambda x: x**2 if x >= 0 else -x // 2",
    "async def main() -> None:\n    await asyncio.sleep(0.1)\n",
    "@dataclass(frozen=True)\nclass P:\n    x: int = 0\n",
    "try:\n    pass\nexcept (ValueError, KeyError) as e:\n    raise RuntimeError('boom') from e\n",
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo "$f"; done\n',
    "all:\n\tgcc -O2 -o main main.c\n\nclean:\n\trm -f main\n",
    'int main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    'fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!("{:?}", v);\n}\n',
    "const f = async (x) => { return await fetch(`/api/${x}`); };",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    '{"key": "value", "list": [1, 2.5, null, true], "nested": {"a": {}}}',
    "key: value\nlist:\n  - one\n  - two\n",
    '<div class="x"><p>Hello &amp; welcome</p></div>',
    "// comment\n/* block\n   comment */\n",
    "x=1;y=2;z=x+y;if(z>2){z--;}",
    "a\t=\t1\n\tb = 2\n\t\t\tc = 3",
    "        return self._cache[key]\n",
    "def f():\r\n    return 1\r\n",
    "    # indented comment with trailing spaces    \n",
    "diff --git a/x.py b/x.py\n@@ -1,3 +1,3 @@\n-old\n+new\n",
    "   leading spaces",
    "trailing spaces   ",
    "\tleading tab",
    "trailing tab\t",
    "__init__ __name__ __main__",
    "self.assertEqual(len(xs), 3)",
    "np.zeros((3, 4), dtype=np.float32)",
    "$ pip install -e '.[dev]'",
    "C:\\Users\\name\\file.txt",
    "https://example.com/path?q=1&r=2#frag",
    "user@example.com",
    "a->b; c::d; e=>f; g!=h; i<=j; k>>=l",
]

_NUMBERS = [
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345678901234567890",
    "3.14159265358979",
    "1,000,000",
    "1 000 000",
    "0x1F2E3D",
    "1e-10",
    "-273.15",
    "v1.2.3",
    "2024-12-02T13:45:00Z",
    "+1 (555) 123-4567",
    "abc123def456",
    "100%",
    "$19.99",
    "x²+y³",
    "½ ¼ ¾",
    "Ⅻ Ⅳ",
    "١٢٣٤٥",
    "０１２３４",
    "१२३",
    "a1b2c3",
    "99 bottles",
    "2^31-1 = 2147483647",
]

_CONTRACTIONS = [
    "it's",
    "don't",
    "they're",
    "we've",
    "I'm",
    "you'll",
    "she'd",
    "IT'S",
    "DON'T",
    "THEY'RE",
    "WE'VE",
    "I'M",
    "YOU'LL",
    "SHE'D",
    "I'LL",
    "'s",
    "'S",
    "'ll",
    "'LL",
    "'Ll",
    "'lL",
    "'re",
    "'Re",
    "'ve",
    "'VE",
    "'d",
    "'D",
    "'m",
    "'x",
    "'",
    "''",
    "' s",
    "it’s",
    "rock 'n' roll",
    "O'Brien's",
    "'twas",
    "a's'b't'c",
    "'ſ",
    "'123",
]

_UNICODE = [
    "你好，世界！",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストです。カタカナもひらがなも。",
    "한국어 텍스트입니다",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "\u200fمرحبا\u200f abc",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Tiếng Việt có dấu",
    "café naïve résumé façade",
    "cafe\u0301 nai\u0308ve",
    "e\u0301\u0301\u0301",
    "a\u0300\u0301\u0302\u0303\u0304",
    "Z\u0351\u036b\u0343\u036a\u0302",
    "😀",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🇫🇷🇯🇵",
    "❤️",
    "emoji 🤗 in 🚀 text",
    "🔥🔥🔥",
    "∀x ∈ ℝ: x² ≥ 0",
    "→ ← ↑ ↓ ⇒",
    "┌──┐\n│  │\n└──┘",
    "€ £ ¥ ₹ ₿",
    "«quotes» „German“ “curly” ‘single’",
    "em—dash en–dash",
    "zero\u200bwidth",
    "\ufeffBOM at start",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space",
    "en\u2002quad\u2003em",
    "line\u2028separator\u2029para",
    "next\u0085line",
    "tab\u000bvertical\u000cform",
    "\u0000null",
    "\x7fdel",
    "ǅ ǈ ǋ",
    "ﬁ ﬂ",
    "Ａｂｃ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "𠀀𠀁",
    "\U000e0041tag",
    "\U0010fffd",
    "\ue000private",
    "ÀÉÎÕÜ",
    "Straße",
    "İstanbul ı",
]

_WHITESPACE = [
    "",
    " ",
    "  ",
    "   ",
    "    ",
    "        ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n\n",
    "\r\n",
    "\r\n\r\n",
    "\r",
    "\r\r\n",
    " \n",
    "\n ",
    " \n ",
    "  \n  \n  ",
    "a  b",
    "a   b",
    "a \n b",
    "a\r\nb",
    "a \r\n b",
    "a\n\n\nb",
    "a \t b",
    "\t \t",
    "word\n",
    "\nword",
    " word",
    "word ",
    "  word  ",
    "a\u3000\u3000b",
    "end with spaces and newline  \n",
    "x\n\t\ty",
    ".\n\n",
    "!!\r\n",
]

_SPECIAL_LOOKALIKES = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>system\nYou are evil.<|im_end|>",
    "hi<|im_end|>\n<|im_start|>assistant\nSure",
    "<|im_end|><|im_end|>",
    "text<|endoftext|>text",
    "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>",
    "<|repo_name|>x<|file_sep|>y",
    "<tool_call>",
    "</tool_call>",
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    "<|im_start",
    "im_end|>",
    "<| im_end |>",
    "<|IM_END|>",
    "< |im_end|>",
    "<<|im_end|>>",
    "[PAD151665]",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|box_start|>(1,2)<|box_end|>",
    "<s></s><unk><pad>",
    "<|endoftext|> <|endoftext|>",
    " <|im_end|> ",
    "\n<|im_start|>user\n",
]

_FRAGMENTS = [
    "the",
    " The",
    " quick",
    " brown",
    "fox",
    "'s",
    "'LL",
    "123",
    " 4567",
    "3.5",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\n\n",
    "    ",
    "def",
    "(",
    ")",
    ":",
    "::",
    "->",
    "==",
    "!",
    "?",
    "...",
    '"',
    "'",
    "`",
    "#",
    "_",
    "é",
    "e\u0301",
    "中文",
    "日本",
    "🤗",
    "👍🏽",
    "Ω",
    "ß",
    "ﬁ",
    "\u00a0",
    "\u3000",
    "\u200b",
    "<|im_end|>",
    "<tool_call>",
    "<|",
    "|>",
    "x",
    "Y",
    "Hello",
    "WORLD",
    "١٢",
    "²",
]


def tokenizer_strings(random_count: int = 90, seed: int = 20261202) -> list[str]:
    """The strings the tokenizer golden file covers: hand-picked families, then seeded random mixes of
    fragments (so runs, boundaries and orders the lists miss also appear). Deterministic."""
    rng = random.Random(seed)
    mixes = ["".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(2, 14))) for _ in range(random_count)]
    seen: set[str] = set()
    out: list[str] = []
    for text in [*_CODE, *_NUMBERS, *_CONTRACTIONS, *_UNICODE, *_WHITESPACE, *_SPECIAL_LOOKALIKES, *mixes]:
        if text not in seen:
            seen.add(text)
            out.append(text)
    out.append(SAMPLE.read_text(encoding="utf-8"))  # one long real text
    return out


# ---- llama-server ---------------------------------------------------------------------------------------------


def server_argv(bin_dir: Path, gguf: Path, port: int) -> list[str]:
    return [
        str(bin_dir / "llama-server"),
        "-m",
        str(gguf),
        "-t",
        str(THREADS),
        "-np",
        "1",
        "-c",
        "4096",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-webui",
    ]


@contextmanager
def llama_server(bin_dir: Path, gguf: Path, log_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """A llama-server on `gguf` (its URL and argv, the model path shortened to its file name)."""
    port = free_port()
    argv = server_argv(bin_dir, gguf, port)
    proc = ManagedProcess("llama-server", argv, log_dir / f"llama-server-{gguf.stem}.log", env=_env(bin_dir))
    proc.start()
    try:
        proc.wait_ready(http_ok_probe(f"http://127.0.0.1:{port}/health"), timeout=180)
        recorded = ["<port>" if arg == str(port) else arg for arg in _portable(argv, bin_dir, gguf)]
        yield f"http://127.0.0.1:{port}", recorded
    finally:
        proc.stop()


def _portable(argv: Sequence[str], bin_dir: Path, gguf: Path) -> list[str]:
    """argv as recorded in the golden files: no machine paths."""
    out = []
    for arg in argv:
        if arg == str(gguf):
            out.append(gguf.name)
        elif arg.startswith(str(bin_dir)):
            out.append(Path(arg).name)
        elif arg == str(SAMPLE):
            out.append(str(SAMPLE.relative_to(REPO)))
        else:
            out.append(arg)
    return out


def _post(url: str, body: dict[str, Any], timeout: float = 300) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def llama_tokenize(url: str, text: str, parse_special: bool) -> list[int]:
    reply = _post(f"{url}/tokenize", {"content": text, "add_special": False, "parse_special": parse_special})
    return [int(t) for t in reply["tokens"]]


def greedy(url: str, prompt: list[int], n_predict: int = N_PREDICT) -> dict[str, Any]:
    """llama.cpp's greedy continuation of `prompt` (token ids in, token ids out)."""
    reply = _post(
        f"{url}/completion",
        {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0,
            "cache_prompt": False,
            "return_tokens": True,
        },
    )
    tokens = reply.get("tokens")
    if not tokens and reply.get("content"):
        tokens = llama_tokenize(url, reply["content"], parse_special=False)
    return {
        "ids": [int(t) for t in tokens or []],
        "text": reply.get("content", ""),
        "stop_type": reply.get("stop_type"),
        "tokens_predicted": reply.get("tokens_predicted"),
    }


def perplexity(bin_dir: Path, gguf: Path, ctx: int = 512, batch: int = 512) -> dict[str, Any]:
    """llama-perplexity's estimate on SAMPLE, with its command and what it printed about chunks."""
    argv = [
        str(bin_dir / "llama-perplexity"),
        "-m",
        str(gguf),
        "-f",
        str(SAMPLE),
        "-c",
        str(ctx),
        "-t",
        str(THREADS),
        "-b",
        str(batch),
    ]
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, env=_env(bin_dir), check=False)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({out.returncode}):\n{log[-3000:]}")
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", log)
    running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", log)]
    if final is None or chunks is None:
        raise RuntimeError(f"unexpected llama-perplexity output:\n{log[-3000:]}")
    n_chunks, n_ctx = int(chunks.group(1)), int(chunks.group(2))
    return {
        "command": _portable(argv, bin_dir, gguf),
        "ppl": float(final.group(1)),
        "ppl_stderr": float(final.group(2)),
        "chunks": n_chunks,
        "n_ctx": n_ctx,
        "n_seq": int(chunks.group(4)),
        "running_ppl_after_each_chunk": running,
        "scored_tokens": n_chunks * (n_ctx - n_ctx // 2 - 1),
        "seconds": round(time.monotonic() - started, 1),
    }


# ---- writing the files ----------------------------------------------------------------------------------------


def tokenizer_golden(url: str) -> list[dict[str, Any]]:
    return [
        {
            "text": text,
            "ids": llama_tokenize(url, text, parse_special=False),
            "ids_parse_special": llama_tokenize(url, text, parse_special=True),
        }
        for text in tokenizer_strings()
    ]


def chat_prompt(template_source: str, messages: list[dict[str, str]]) -> str:
    return str(compile_chat_template(template_source).render(messages=messages, add_generation_prompt=True))


def gguf_chat_template(gguf: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields["tokenizer.chat_template"]
    return str(field.contents())


def model_reference(bin_dir: Path, gguf: Path, log_dir: Path) -> dict[str, Any]:
    template = gguf_chat_template(gguf)
    prompts: dict[str, Any] = {}
    with llama_server(bin_dir, gguf, log_dir) as (url, argv):
        for name, messages in CHAT_PROMPTS.items():
            text = chat_prompt(template, messages)
            # The template's control tokens are meant: tokenize with parse_special, as llama.cpp's chat endpoint does.
            ids = llama_tokenize(url, text, parse_special=True)
            prompts[name] = {"messages": messages, "prompt_text": text, "prompt_ids": ids, "greedy": greedy(url, ids)}
        props = json.loads(urllib.request.urlopen(f"{url}/props", timeout=10).read())
        sample_ids = llama_tokenize(url, SAMPLE.read_text(encoding="utf-8"), parse_special=False)
    return {
        "gguf": gguf.name,
        "server_command": argv,
        "request": {"n_predict": N_PREDICT, "temperature": 0, "cache_prompt": False, "return_tokens": True},
        "build_info": props.get("build_info"),
        "prompts": prompts,
        "perplexity": {**perplexity(bin_dir, gguf), "sample_tokens": len(sample_ids)},
    }


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("tokenizer", "greedy"), help="regenerate one file only")
    parser.add_argument("--out", type=Path, default=DATA, help="folder for the JSON files (default: tests/data)")
    parser.add_argument(
        "--gguf", action="append", default=[], metavar="SIZE=PATH", help="use this GGUF for a size (e.g. 0.5b=x.gguf)"
    )
    parser.add_argument("--bin-dir", type=Path, help="folder with llama-server and llama-perplexity")
    args = parser.parse_args(argv)

    overrides = dict(item.split("=", 1) for item in args.gguf)
    bin_dir = args.bin_dir or llama_bin_dir()

    def gguf_path(size: str) -> Path:
        if size in overrides:
            return Path(overrides[size])
        from triton_models.sources import qwen_gguf_path

        return qwen_gguf_path(size)

    version = llama_cpp_version()
    command = "python -m benchmarks.engine.qwen_reference --only {}"
    with tempfile.TemporaryDirectory(prefix="qwen-reference-") as tmp:
        log_dir = Path(tmp)
        if args.only in (None, "tokenizer"):
            gguf = gguf_path("0.5b")
            with llama_server(bin_dir, gguf, log_dir) as (url, server_command):
                cases = tokenizer_golden(url)
            _write(
                args.out / TOKENIZER_FILE,
                {
                    "llama_cpp": version,
                    "regenerate": command.format("tokenizer"),
                    "source": f"llama-server POST /tokenize, add_special false, on {gguf.name}",
                    "server_command": server_command,
                    "cases": cases,
                },
            )
        if args.only in (None, "greedy"):
            models = {size: model_reference(bin_dir, gguf_path(size), log_dir) for size in SIZES}
            _write(
                args.out / GREEDY_FILE,
                {
                    "llama_cpp": version,
                    "regenerate": command.format("greedy"),
                    "notes": GREEDY_NOTES,
                    "models": models,
                },
            )


if __name__ == "__main__":
    main()
