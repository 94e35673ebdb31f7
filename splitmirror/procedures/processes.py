"""Child processes of the daemon (hooks, probes, fsck, mounts), spawned safely.

The daemon is multi-threaded (gRPC, the event loop's libraries): a plain
``fork()`` runs every library's fork handlers in the child's copy of it,
and that copy occasionally crashed (SIGSEGV) before it could ``exec`` the
command (seen with uvloop's spawn: about one hook in ten under load).
:mod:`subprocess` spawns with ``vfork``/``posix_spawn`` where it can, which
runs no fork handlers; the wait happens on a small pool of worker threads,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

#: Threads that wait for child processes (hooks, probes and checks running at once).
POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="splitmirror-proc")

#: Exit status reported for a command killed at its timeout.
TIMED_OUT = -9


def _run(argv: Sequence[str], env: Mapping[str, str] | None, timeout: float, group: bool) -> tuple[int, bytes, bool]:
    proc = subprocess.Popen(list(argv), env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        out, _ = proc.communicate()
        return TIMED_OUT, out, True


async def run_process(argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
                      group: bool = False) -> tuple[int, bytes, bool]:
    """(exit status, output, timed out) of ``argv``; with ``group``, a timeout kills its process group
    (``argv`` must start one, e.g. through setsid(1))."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(POOL, _run, argv, env, timeout, group)


def spawn(argv: Sequence[str], log_fd: int) -> subprocess.Popen[bytes]:
    """Start a long-running helper (e.g. nbdfuse) with its output in ``log_fd``."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd)
