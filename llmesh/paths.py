"""Where llmesh keeps built artifacts and runtime state. Overridable by env so tests and operators can move them."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Content-hashed build outputs (exported models, backend folder). Safe to delete; rebuilt on demand."""
    env = os.environ.get("LLMESH_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmesh"


def state_dir() -> Path:
    """Runtime state of `llmesh up`: logs, pid file, rendered configs."""
    env = os.environ.get("LLMESH_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "llmesh"
