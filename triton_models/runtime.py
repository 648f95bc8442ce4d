"""Run the `tritonserver` shipped in the nvidia-pytriton wheel, without writing into site-packages.

The wheel holds the server (`pytriton/tritonserver/bin/tritonserver`), its libraries (`nvidia_pytriton.libs/`),
the python backend (`backends/python/`) and one backend stub per Python version (`python_backend_stubs/3.X/`).
The python backend looks for `triton_python_backend_stub` next to `libtriton_python.so`, so we assemble a
backend folder of symlinks in the cache and pass it with --backend-directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

STUB = "triton_python_backend_stub"


def pytriton_root() -> Path:
    """The installed `pytriton` package folder (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package pytriton (wheel nvidia-pytriton) is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    return pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def tritonserver_libs() -> Path:
    # auditwheel puts the server's bundled shared libraries next to the package: site-packages/nvidia_pytriton.libs
    return pytriton_root().parent / "nvidia_pytriton.libs"


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _link(target: Path, link: Path) -> None:
    """Point `link` at `target`, replacing whatever is there atomically (safe with concurrent callers)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    temp = link.with_name(f".{link.name}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    temp.symlink_to(target)
    os.replace(temp, link)


def prepare_backend_dir(cache_dir: Path) -> Path:
    """Return a --backend-directory whose `python/` links the wheel's python backend and this Python's stub."""
    root = pytriton_root() / "tritonserver"
    source = root / "backends" / "python"
    stub = root / "python_backend_stubs" / _python_tag() / STUB
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no python backend stub for Python {_python_tag()} ({stub})")
    # One folder per Python version: the stub embeds a specific libpython.
    backend_dir = cache_dir / "triton-backends" / f"py{_python_tag()}"
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != "__pycache__":  # the backend itself needs the .so and triton_python_backend_utils.py
            _link(entry, python_dir / entry.name)
    _link(stub, python_dir / STUB)
    return backend_dir


def tritonserver_command(
    repository: Path,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    backend_dir: Path,
    log_verbose: int = 0,
    address: str = "127.0.0.1",
) -> tuple[list[str], dict[str, str]]:
    """argv and the complete environment for starting tritonserver on `repository`."""
    argv = [
        str(tritonserver_binary()),
        f"--model-repository={repository}",
        f"--backend-directory={backend_dir}",
        # Models come only from the repository, loaded at start; a model that fails to load stops the server
        # (the launcher and test fixtures then see the exit and the log, instead of a half-working server).
        "--model-control-mode=none",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--disable-auto-complete-config",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        f"--http-address={address}",
        f"--http-port={http_port}",
        "--allow-metrics=true",
        f"--metrics-address={address}",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",  # CPU-only: avoids DCGM/NVML probing noise
        f"--log-verbose={log_verbose}",
        "--exit-timeout-secs=10",
    ]
    env = dict(os.environ)
    libs = str(tritonserver_libs())
    env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libs
    # The stub embeds libpython and derives sys.prefix from the `python3` it finds on PATH: putting this
    # interpreter's bin first makes model.py see the venv's packages (numpy, onnxruntime, triton_models).
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = f"{venv_bin}:{env['PATH']}" if env.get("PATH") else venv_bin
    return argv, env
