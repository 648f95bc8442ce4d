"""The expensive half of a build, cached by content: one variant's decoder graph, weights and tokenizer.

    <cache_dir>/model-artifacts/<key>/
        model.onnx, model.onnx.data     decoder graph (contract in graph.py) and its weights
        tokenizer.json
        artifact.json                   ArtifactInfo: what the checkpoint says (context, eos ids, chat template...)

The key hashes only what shapes these files: an ArtifactSpec (the checkpoint's bytes, which loader reads it, the
weights format, max_context), the source of the modules that write them, and the versions of the tools they use.
Serve-time settings never reach it: repository.py writes those into a small repository directory that links
here. A variant's name is not in the key either, so variants with the same spec share one artifact.

Builds go to a temporary sibling directory renamed into place, under a file lock per key, so concurrent builders
(parallel test sessions, the launcher) neither export twice nor see a half-written artifact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmesh.model_artifact import TOKENIZER_FILE

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from triton_models.gguf_loader import LlamaConfig

log = logging.getLogger(__name__)

ARTIFACTS_DIR = "model-artifacts"  # under the cache dir
INFO_FILE = "artifact.json"
GRAPH_FILE = "model.onnx"

_PACKAGE_DIR = Path(__file__).resolve().parent
# Modules whose source decides what lands in an artifact. Not config.py nor catalogue.py: the values they hold
# that matter are hashed as values (ArtifactSpec), so help texts and serve-time defaults cost no rebuild.
BUILDER_MODULES = ("artifact.py", "gguf_loader.py", "graph.py", "weights.py", "tokenizer.py")
_TOOLS = ("onnx", "gguf", "tokenizers", "numpy")
# Bump to force a rebuild when the output changes in a way the hashed sources do not show.
_FORMAT = 1


@dataclass(frozen=True)
class ArtifactSpec:
    """Everything that shapes one variant's graph, weights and tokenizer."""

    source: str  # catalogue.SOURCES entry: decides the loader (a GGUF file or a Hugging Face folder)
    checkpoint: Path  # hashed by content, never by path
    weights: str  # catalogue.VariantSpec.weights
    max_context: int  # sizes the graph's RoPE caches; the served context
    # Speculative decoding verifies with this graph (its variant has a draft): single-row steps are padded so that
    # they compute exactly as verification does (graph._SingleRowPadding).
    pad_single_row: bool = False


@dataclass(frozen=True)
class ArtifactInfo:
    """What the checkpoint says that the serving side needs (llmesh.model_artifact.ModelMetadata's build half)."""

    context_length: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    eos_token_ids: tuple[int, ...]
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    weights: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, artifact_dir: Path) -> ArtifactInfo:
        raw = json.loads((artifact_dir / INFO_FILE).read_text())
        raw["eos_token_ids"] = tuple(int(i) for i in raw["eos_token_ids"])
        return cls(**raw)


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_sha256(path: Path) -> str:
    """A GGUF file's hash, or for a Hugging Face folder the hash of its files' names and hashes (~0.1 s for the
    98 MB SmolLM2 GGUF)."""
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".jinja"):
            digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def builder_fingerprint() -> dict[str, object]:
    """The builder's code and tools: part of every artifact key."""
    return {
        "format": _FORMAT,
        "modules": {name: file_sha256(_PACKAGE_DIR / name) for name in BUILDER_MODULES},
        "tools": {name: importlib.metadata.version(name) for name in _TOOLS},
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def artifact_key(
    spec: ArtifactSpec, checkpoint_digest: str | None = None, builder: dict[str, object] | None = None
) -> str:
    """Content hash naming the artifact directory. The digests may be passed in when they are already known."""
    inputs = {
        "checkpoint": checkpoint_digest or checkpoint_sha256(spec.checkpoint),
        "source": spec.source,
        "weights": spec.weights,
        "max_context": spec.max_context,
        "pad_single_row": spec.pad_single_row,
        "builder": builder or builder_fingerprint(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path` (created if missing) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_artifact(spec: ArtifactSpec, cache_dir: Path, key: str | None = None) -> Path:
    """The artifact directory of `spec`, built first if it is not cached yet. `key`: artifact_key(spec), if known."""
    artifacts = cache_dir / ARTIFACTS_DIR
    target = artifacts / (key or artifact_key(spec))
    if target.is_dir():
        return target
    with locked(artifacts / f".{target.name}.lock"):
        if target.is_dir():  # another process finished the build while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=artifacts))
        try:
            started = time.monotonic()
            _build(spec, staging)
            staging.chmod(0o755)  # mkdtemp makes it owner-only; the server may run as another user
            os.rename(staging, target)
            log.info(
                "built %s graph of %s (%s) in %.1f s: %s",
                spec.weights,
                spec.checkpoint.name,
                spec.source,
                time.monotonic() - started,
                target,
            )
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return target


@dataclass(frozen=True)
class _Checkpoint:
    """What the builder needs of one source, whatever its format (GGUF file or Hugging Face folder)."""

    config: LlamaConfig
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None


def _load_checkpoint(source: str, path: Path) -> _Checkpoint:
    from triton_models.tokenizer import build_tokenizer, default_chat_template, eos_token_ids, load_hf_tokenizer

    if source == "hf":
        from triton_models.weights import hf_config

        tokenizer, info = load_hf_tokenizer(path)
        return _Checkpoint(
            hf_config(path), tokenizer, info.eos_token_ids, info.bos_token, info.eos_token, info.chat_template
        )
    from triton_models.gguf_loader import load_gguf

    model = load_gguf(path, with_weights=False)
    cfg, tok = model.config, model.tokenizer
    return _Checkpoint(
        cfg,
        build_tokenizer(tok),
        eos_token_ids(tok),
        tok.tokens[tok.bos_id] if tok.bos_id is not None else None,
        tok.tokens[tok.eos_id] if tok.eos_id is not None else None,
        tok.chat_template or default_chat_template(cfg.arch),
    )


def _build(spec: ArtifactSpec, out: Path) -> None:
    # Build-only dependencies are imported here so that importing this module (e.g. for artifact_key) stays light.
    from triton_models.graph import write_graph
    from triton_models.weights import from_gguf, from_hf

    checkpoint = _load_checkpoint(spec.source, spec.checkpoint)
    cfg = checkpoint.config
    if spec.max_context > cfg.context_length:
        raise ValueError(
            f"max_context {spec.max_context} exceeds the {cfg.context_length} tokens of {spec.checkpoint.name}"
        )
    load = from_hf if spec.source == "hf" else from_gguf
    weights = load(spec.checkpoint, spec.weights)  # type: ignore[arg-type]
    write_graph(weights, spec.max_context, out / GRAPH_FILE, pad_single_row=spec.pad_single_row)
    del weights
    checkpoint.tokenizer.save(str(out / TOKENIZER_FILE))
    info = ArtifactInfo(
        context_length=spec.max_context,
        vocab_size=cfg.vocab_size,
        num_layers=cfg.n_layers,
        num_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        eos_token_ids=checkpoint.eos_token_ids,
        bos_token=checkpoint.bos_token,
        eos_token=checkpoint.eos_token,
        chat_template=checkpoint.chat_template,
        weights=spec.weights,
    )
    (out / INFO_FILE).write_text(info.to_json())
