"""`python -m control.guardian`: the launcher's process guardian (control.process.Guardian).

Reads `+PGID` / `-PGID` lines (a process group to kill, or not any more) and `~PREFIX` lines (shared memory to
remove) from stdin; when stdin closes (the launcher exited, however it died), SIGKILLs every process group still
listed, so nothing the launcher started outlives it: not its children, which the kernel kills already
(PR_SET_PDEATHSIG), and not their children either (tritonserver's python-backend stubs). Then removes the shared
memory those left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterable


def read_orders(lines: Iterable[str]) -> tuple[set[int], set[str]]:
    """The groups listed and not unlisted by `lines`, and the shared memory prefixes; a malformed line is ignored
    (only the launcher writes here)."""
    groups: set[int] = set()
    prefixes: set[str] = set()
    for line in lines:
        sign, value = line[:1], line[1:].strip()
        if sign == "~" and value and "/" not in value:
            prefixes.add(value)
        if not value.isdigit() or int(value) <= 1:
            continue
        if sign == "+":
            groups.add(int(value))
        elif sign == "-":
            groups.discard(int(value))
    return groups, prefixes


def main() -> int:
    # Only the pipe's end may end this process: a Ctrl-C meant for the launcher must not stop the guardian first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from control.process import remove_shared_memory

    groups, prefixes = read_orders(sys.stdin)
    for pgid in sorted(groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
            print(f"guardian: the launcher is gone; killed process group {pgid}", flush=True)
    for prefix in sorted(prefixes):
        for name in remove_shared_memory(prefix):
            print(f"guardian: removed shared memory {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
