"""Run untrusted generated code: a fresh `python -I` in a temporary folder, empty environment, resource limits, a
wall-clock timeout that kills the whole process group, and no network.

No network, two layers: a new, empty network namespace (`unshare -n`: not even loopback is up) when this process
may create one (root, or unprivileged user namespaces); and always an audit hook (PEP 578, cannot be removed once
added) that refuses sockets, subprocesses and `ctypes` before the program runs. Without `unshare` the hook alone
stands between the code and the network: enough for benchmark answers, not a security boundary against code
written to escape.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Installed first thing in the child (`python -I -c BOOTSTRAP program.py`), then the program runs as __main__.
BOOTSTRAP = """\
import sys
def _refuse(event, args):
    if event.startswith(("socket.", "subprocess.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                         "os.fork", "os.forkpty", "pty.")):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_refuse)
del _refuse
import runpy
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20
    open_files: int = 64


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    seconds: float
    output_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def unshare_binary() -> str | None:
    """`unshare` when it can make a network namespace here (checked once by running it), else None."""
    binary = shutil.which("unshare")
    if binary is None:
        return None
    try:
        probe = subprocess.run([binary, "--net", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return binary if probe.returncode == 0 else None


def _limit(limits: Limits) -> None:
    """preexec_fn: runs in the child between fork and exec."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))


def run_program(
    source: str,
    limits: Limits = Limits(),
    isolate_network: bool = True,
    audit_hook: bool = True,
    python: str = sys.executable,
) -> Outcome:
    """Run `source` as a script; passed = exit status 0 within the limits. Call from one thread at a time
    (preexec_fn is not safe with other threads forking). `isolate_network` and `audit_hook` off are for tests of
    each layer alone."""
    with tempfile.TemporaryDirectory(prefix="llmesh-sandbox-") as folder:
        program = Path(folder) / "program.py"
        program.write_text(source)
        argv = [python, "-I", *(["-c", BOOTSTRAP] if audit_hook else []), str(program)]
        namespace = unshare_binary() if isolate_network else None
        if namespace is not None:
            argv = [namespace, "--net", *argv]
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=folder,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills whatever it started too
            preexec_fn=functools.partial(_limit, limits),
        )
        try:
            output, _ = proc.communicate(timeout=limits.wall_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = "timeout"
        seconds = time.perf_counter() - start
    # RLIMIT_CPU ends the child with SIGXCPU (then SIGKILL): that is a timeout too.
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and status == "failed":
        status = "timeout"
    tail = output.decode("utf-8", "replace")[-600:]
    return Outcome(status, proc.returncode, seconds, tail)
