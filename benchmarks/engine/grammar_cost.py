"""Cost of grammar-constrained decoding on this CPU: compile time and per-step token-mask time, per library.

    python -m benchmarks.engine.grammar_cost [--model-dir DIR ...] [--runs 5] [--max-steps 300] [--libraries ...]

For each built model's tokenizer (default: one model per distinct vocabulary size found under the llmesh cache,
i.e. SmolLM2's 49k and Qwen2.5's 152k once built) and each library (llguidance, which the engine uses through
triton_models/engine/grammar.py, and outlines-core when installed), a typical nested JSON schema is compiled once
(timed: the first compile, no cache) and then sampled through `--runs` times with random logits (numpy RNG): every
step computes the token mask (timed alone: "mask") and applies it to a logits row of the model's width (timed with
the mask: "step"). Prints mean/p50/p99 microseconds per step; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from llmesh import paths
from llmesh.model_artifact import METADATA_FILE, TOKENIZER_FILE, ModelMetadata

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 32},
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "manager": {"anyOf": [{"type": "string", "maxLength": 24}, {"type": "null"}]},
    },
    "required": ["name", "age", "score", "active", "role", "tags", "address", "manager"],
    "additionalProperties": False,
}


class Session(Protocol):
    """One library's matcher for one generation: mask into a bitmask, consume a token, done?"""

    def fill_mask(self, bitmask: npt.NDArray[np.int32]) -> None: ...

    def advance(self, token_id: int) -> None: ...

    def finished(self) -> bool: ...


@dataclass
class Result:
    library: str
    model: str
    vocab_size: int
    tokenizer_load_s: float
    compile_s: float
    steps: int
    mask_mean_us: float
    mask_p50_us: float
    mask_p99_us: float
    step_mean_us: float
    step_p50_us: float
    step_p99_us: float
    error: str = ""


def find_model_dirs(root: Path) -> list[Path]:
    """One built model version directory per distinct vocabulary size under `root` (smallest first)."""
    by_vocab: dict[int, Path] = {}
    for meta_file in sorted(root.rglob(METADATA_FILE)):
        version_dir = meta_file.parent
        if not (version_dir / TOKENIZER_FILE).is_file():
            continue
        by_vocab.setdefault(ModelMetadata.load(version_dir).vocab_size, version_dir)
    return [by_vocab[v] for v in sorted(by_vocab)]


def apply_bitmask(bitmask: npt.NDArray[np.int32], logits: npt.NDArray[np.float32]) -> None:
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little", count=logits.shape[0]).view(np.bool_)
    np.copyto(logits, np.float32(-np.inf), where=~allowed)


# ---- llguidance (through the engine's module) ----------------------------------------------------------------


def llguidance_factory(tokenizer_json: str, meta: ModelMetadata) -> tuple[float, float, Callable[[], Session]]:
    from triton_models.engine.grammar import GrammarCompiler

    started = time.perf_counter()
    compiler = GrammarCompiler(tokenizer_json, meta.vocab_size, meta.eos_token_ids)
    load_s = time.perf_counter() - started
    grammar = json.dumps({"json_schema": NESTED_SCHEMA})
    started = time.perf_counter()
    compiler.constraint(grammar)
    compile_s = time.perf_counter() - started

    class LLGuidanceSession:
        def __init__(self) -> None:
            self.constraint = compiler.constraint(grammar)
            self.matcher = self.constraint._matcher  # the raw library call is what is timed

        def fill_mask(self, bitmask: npt.NDArray[np.int32]) -> None:
            self.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

        def advance(self, token_id: int) -> None:
            self.constraint.advance(token_id)

        def finished(self) -> bool:
            return self.constraint.is_finished() or self.constraint.is_accepting()

    return load_s, compile_s, LLGuidanceSession


# ---- outlines-core -------------------------------------------------------------------------------------------


def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode, inverted: the byte each printable stand-in character of a byte-level BPE token means.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def outlines_vocabulary(tokenizer_json: str, eos_token_id: int) -> Any:
    """outlines-core's Vocabulary (raw token bytes -> ids) from a byte-level BPE tokenizer.json."""
    from outlines_core import Vocabulary

    spec = json.loads(tokenizer_json)
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotImplementedError("only byte-level BPE tokenizers are converted for outlines-core")
    decode = _byte_level_decoder()
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    by_bytes: dict[bytes, list[int]] = {}
    for token, token_id in spec["model"]["vocab"].items():
        if token_id in special:
            continue
        by_bytes.setdefault(bytes(decode[c] for c in token), []).append(token_id)
    return Vocabulary(eos_token_id, by_bytes)


def outlines_factory(tokenizer_json: str, meta: ModelMetadata) -> tuple[float, float, Callable[[], Session]]:
    from outlines_core import Guide, Index
    from outlines_core.json_schema import build_regex_from_schema

    started = time.perf_counter()
    vocabulary = outlines_vocabulary(tokenizer_json, meta.eos_token_ids[0])
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    # whitespace_pattern "" = compact JSON, like the engine's default.
    index = Index(build_regex_from_schema(json.dumps(NESTED_SCHEMA), whitespace_pattern=""), vocabulary)
    compile_s = time.perf_counter() - started

    class OutlinesSession:
        def __init__(self) -> None:
            self.guide = Guide(index)

        def fill_mask(self, bitmask: npt.NDArray[np.int32]) -> None:
            self.guide.write_mask_into(bitmask.ctypes.data, bitmask.size, bitmask.itemsize)

        def advance(self, token_id: int) -> None:
            self.guide.advance(token_id, return_tokens=False)

        def finished(self) -> bool:
            return bool(self.guide.is_finished())

    return load_s, compile_s, OutlinesSession


LIBRARIES: dict[str, Callable[[str, ModelMetadata], tuple[float, float, Callable[[], Session]]]] = {
    "llguidance": llguidance_factory,
    "outlines-core": outlines_factory,
}


def measure(library: str, version_dir: Path, runs: int, max_steps: int, seed: int) -> Result:
    meta = ModelMetadata.load(version_dir)
    tokenizer_json = (version_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
    try:
        load_s, compile_s, new_session = LIBRARIES[library](tokenizer_json, meta)
    except Exception as e:  # a library that cannot run here is reported, not fatal
        nan = float("nan")
        return Result(library, meta.variant, meta.vocab_size, nan, nan, 0, nan, nan, nan, nan, nan, nan, repr(e)[:200])
    rng = np.random.default_rng(seed)
    eos = set(meta.eos_token_ids)
    mask_us: list[float] = []
    step_us: list[float] = []
    # Masks are written at the width the library knows (the tokenizer's); the logits row is the model's width.
    bitmask = np.zeros((meta.vocab_size + 31) // 32, dtype=np.int32)
    for _ in range(runs):
        session = new_session()
        for _ in range(max_steps):
            logits = rng.standard_normal(meta.vocab_size).astype(np.float32)
            started = time.perf_counter()
            session.fill_mask(bitmask)
            masked = time.perf_counter()
            apply_bitmask(bitmask, logits)
            done = time.perf_counter()
            mask_us.append((masked - started) * 1e6)
            step_us.append((done - started) * 1e6)
            token = int(np.argmax(logits))
            if token in eos or not np.isfinite(logits[token]):
                break
            session.advance(token)
            if session.finished():
                break
    mask = np.array(mask_us)
    step = np.array(step_us)
    return Result(
        library=library,
        model=meta.variant,
        vocab_size=meta.vocab_size,
        tokenizer_load_s=load_s,
        compile_s=compile_s,
        steps=len(mask_us),
        mask_mean_us=float(mask.mean()),
        mask_p50_us=float(np.percentile(mask, 50)),
        mask_p99_us=float(np.percentile(mask, 99)),
        step_mean_us=float(step.mean()),
        step_p50_us=float(np.percentile(step, 50)),
        step_p99_us=float(np.percentile(step, 99)),
    )


def print_table(results: list[Result]) -> None:
    header = (
        f"{'library':<14}{'model':<22}{'vocab':>8}{'tok load s':>11}{'compile s':>11}{'steps':>7}"
        f"{'mask mean':>11}{'p50':>8}{'p99':>8}{'step mean':>11}{'p50':>8}{'p99':>8}  (us)"
    )
    print(header)
    for r in results:
        if r.error:
            print(f"{r.library:<14}{r.model:<22}{r.vocab_size:>8}  failed: {r.error}")
            continue
        print(
            f"{r.library:<14}{r.model:<22}{r.vocab_size:>8}{r.tokenizer_load_s:>11.2f}{r.compile_s:>11.3f}"
            f"{r.steps:>7}{r.mask_mean_us:>11.0f}{r.mask_p50_us:>8.0f}{r.mask_p99_us:>8.0f}"
            f"{r.step_mean_us:>11.0f}{r.step_p50_us:>8.0f}{r.step_p99_us:>8.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, action="append", help="built model version dir (repeatable)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    parser.add_argument("--runs", type=int, default=5, help="generations per library and model")
    parser.add_argument("--max-steps", type=int, default=300, help="token cap per generation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    model_dirs = args.model_dir or find_model_dirs(paths.cache_dir())
    if not model_dirs:
        print(f"no built model with a {TOKENIZER_FILE} under {paths.cache_dir()}; run `llmesh build`", file=sys.stderr)
        return 1
    results = []
    for version_dir in model_dirs:
        for library in args.libraries:
            print(f"measuring {library} on {version_dir.parent.name} ...", file=sys.stderr, flush=True)
            results.append(measure(library, version_dir, args.runs, args.max_steps, args.seed))
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
