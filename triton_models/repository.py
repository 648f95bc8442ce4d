"""Build (once) the Triton model repository for a `BuildSettings`, cached by content hash.

Layout of the returned directory:

    <cache_dir>/models/<hash>/            <- the Triton model repository (pass to --model-repository)
        <variant>/config.pbtxt            one folder per BuildSettings.variants entry
        <variant>/1/model.py              copy of triton_models/python_model.py
        <variant>/1/model.onnx            decoder graph (contract in graph.py) + model.onnx.data (weights)
        <variant>/1/tokenizer.json
        <variant>/1/llmesh_model.json     ModelMetadata (config.py), engine settings included

The hash covers the GGUF's bytes, the source of every module that shapes the output, the settings (except
cache_dir) and the versions of the tools that produce the files, so a changed input gives a new directory and an
unchanged one is found again without rebuilding. Builds go to a temporary sibling directory renamed into place,
and a file lock keeps concurrent builders (parallel test sessions, the launcher) from exporting twice.
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

from llmesh.model_artifact import METADATA_FILE, TOKENIZER_FILE, ModelMetadata
from triton_models.config import BuildSettings

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from triton_models.gguf_loader import LlamaConfig

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
# Modules whose source decides what lands in the repository. engine.py is not here on purpose: model.py
# imports it from the installed project at serve time, so changing it needs a Triton restart, not a rebuild.
_SOURCES = ("config.py", "gguf_loader.py", "graph.py", "weights.py", "tokenizer.py", "repository.py", "python_model.py")
_TOOLS = ("onnx", "gguf", "tokenizers", "numpy")
# Bump to force a rebuild when the layout changes in a way the hashed sources do not show.
_FORMAT = 2


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checkpoint_sha256(path: Path) -> str:
    """A GGUF file's hash, or for a Hugging Face folder the hash of its files' names and hashes."""
    if not path.is_dir():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".jinja"):
            digest.update(f"{file.name}:{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def build_key(settings: BuildSettings) -> str:
    """Content hash naming the repository directory (~0.1 s: dominated by hashing the 98 MB GGUF)."""
    fields = asdict(settings)
    # Where things live does not change what is built; the checkpoints' bytes do.
    del fields["cache_dir"], fields["gguf_path"], fields["gemma_gguf_path"], fields["hf_path"]
    checkpoints = {source: _checkpoint_sha256(settings.source_path(source)) for source in settings.sources}
    inputs = {
        "format": _FORMAT,
        "gguf_sha256": checkpoints.pop("smollm2", ""),
        "checkpoints": checkpoints,
        "settings": {k: str(v) for k, v in sorted(fields.items())},
        "sources": {name: _file_sha256(_PACKAGE_DIR / name) for name in _SOURCES},
        "tools": {name: importlib.metadata.version(name) for name in _TOOLS},
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_model_repository(settings: BuildSettings) -> Path:
    """Return the model repository for `settings`, building it first if it is not cached yet."""
    models_dir = settings.cache_dir / "models"
    target = models_dir / build_key(settings)
    if target.is_dir():
        return target
    with _locked(models_dir / f".{target.name}.lock"):
        if target.is_dir():  # another process finished the build while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
        try:
            started = time.monotonic()
            _build(settings, staging)
            staging.chmod(0o755)  # mkdtemp makes it owner-only; the server may run as another user
            os.rename(staging, target)
            log.info("built model repository %s in %.1f s", target, time.monotonic() - started)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return target


@dataclass(frozen=True)
class _Checkpoint:
    """What the builder needs of one source, whatever its format (GGUF file or Hugging Face folder)."""

    path: Path
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
            path, hf_config(path), tokenizer, info.eos_token_ids, info.bos_token, info.eos_token, info.chat_template
        )
    from triton_models.gguf_loader import load_gguf

    model = load_gguf(path, with_weights=False)
    cfg, tok = model.config, model.tokenizer
    return _Checkpoint(
        path,
        cfg,
        build_tokenizer(tok),
        eos_token_ids(tok),
        tok.tokens[tok.bos_id] if tok.bos_id is not None else None,
        tok.tokens[tok.eos_id] if tok.eos_id is not None else None,
        tok.chat_template or default_chat_template(cfg.arch),
    )


def _build(settings: BuildSettings, repo: Path) -> None:
    # Build-only dependencies are imported here so that importing this module (e.g. for build_key) stays light.
    from triton_models.graph import build_graph, save_graph
    from triton_models.weights import from_gguf, from_hf

    checkpoints: dict[str, _Checkpoint] = {}
    for source in settings.sources:
        checkpoint = _load_checkpoint(source, settings.source_path(source))
        if settings.max_context > checkpoint.config.context_length:
            raise ValueError(
                f"max_context {settings.max_context} exceeds the {checkpoint.config.context_length} tokens of "
                f"{checkpoint.path.name}"
            )
        checkpoints[source] = checkpoint
    for name in settings.variants:
        spec = settings.spec(name)
        checkpoint = checkpoints[spec.source]
        cfg = checkpoint.config
        started = time.monotonic()
        version = repo / name / "1"
        version.mkdir(parents=True)
        load = from_hf if spec.source == "hf" else from_gguf
        weights = load(checkpoint.path, spec.weights)  # type: ignore[arg-type]
        save_graph(build_graph(weights, settings.max_context), version / "model.onnx")
        del weights
        checkpoint.tokenizer.save(str(version / TOKENIZER_FILE))
        metadata = ModelMetadata(
            variant=name,
            context_length=settings.max_context,
            vocab_size=cfg.vocab_size,
            num_layers=cfg.n_layers,
            num_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            eos_token_ids=checkpoint.eos_token_ids,
            bos_token=checkpoint.bos_token,
            eos_token=checkpoint.eos_token,
            chat_template=checkpoint.chat_template,
            ort_threads=settings.ort_threads,
            weights=spec.weights,
            engine=settings.engine(name),
        )
        (version / METADATA_FILE).write_text(metadata.to_json())
        shutil.copyfile(_PACKAGE_DIR / "python_model.py", version / "model.py")
        (repo / name / "config.pbtxt").write_text(render_config(settings, name))
        log.info("built variant %s (%s weights) in %.1f s", name, spec.weights, time.monotonic() - started)


def render_config(settings: BuildSettings, variant: str) -> str:
    """config.pbtxt; the I/O contract is documented at the top of python_model.py."""
    timeout = settings.queue_timeout_us
    preferred = ", ".join(str(p) for p in (8, 16, 32, 64) if p <= settings.max_batch_size) or str(
        settings.max_batch_size
    )
    return f"""\
name: "{variant}"
backend: "python"
max_batch_size: {settings.max_batch_size}

# Streaming: every generated token is its own response; the last response carries the finish reason and the
# TRITONSERVER_RESPONSE_COMPLETE_FINAL flag.
model_transaction_policy {{
  decoupled: true
}}

# execute() hands requests to the model's continuous-batching engine and returns at once; this queue only
# orders and bounds the handover. Priority 1 = enterprise, 2 = paid, 3 = free (default); a full queue or a
# timed-out request gets an error at once.
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {settings.max_queue_delay_us}
  priority_levels: 3
  default_priority_level: 3
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {timeout}
    allow_timeout_override: true
    max_queue_size: {settings.max_queue_size}
  }}
}}

instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]

input [
  {{
    name: "input_ids"
    data_type: TYPE_INT64
    dims: [ -1 ]
    # Prompts of different lengths may share a batch: the python backend hands over each request's own tensor.
    allow_ragged_batch: true
  }},
  {{
    name: "max_tokens"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }},
  {{
    name: "temperature"
    data_type: TYPE_FP32
    dims: [ 1 ]
    optional: true
  }},
  {{
    name: "top_p"
    data_type: TYPE_FP32
    dims: [ 1 ]
    optional: true
  }},
  {{
    name: "top_k"
    data_type: TYPE_INT32
    dims: [ 1 ]
    optional: true
  }},
  {{
    name: "seed"
    data_type: TYPE_INT64
    dims: [ 1 ]
    optional: true
  }}
]

output [
  {{
    name: "token_ids"
    data_type: TYPE_INT64
    dims: [ -1 ]
  }},
  {{
    name: "finish_reason"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }}
]
"""
