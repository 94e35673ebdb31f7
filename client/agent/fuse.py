"""FUSE daemons as child processes, shared by the NBD attachment and the filesystem mount.

Whether FUSE can work on this host (:func:`fuse_problem`), starting a daemon
in its own session with its output in log files (:func:`spawn`), waiting for
its mount to appear (:func:`wait_mounted`), the first line it complained with
(:func:`first_line`), and taking the mount down again (:func:`unmount`,
:func:`reap`). Mount points are found in /proc/self/mountinfo
(:func:`is_mounted`), never by a stat that a hung FUSE mount would block.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from pathlib import Path

from .errors import AgentError

__all__ = ["first_line", "fuse_problem", "is_mounted", "mount_type", "reap", "spawn", "unmount", "wait_mounted"]

#: Tools needed for FUSE mounting and the Debian package that ships each.
_TOOLS: tuple[tuple[str, str], ...] = (
    ("nbdfuse", "libnbd-bin (Debian 12) or nbdfuse (Debian 13+)"),
    ("fuse2fs", "fuse2fs"),
    ("fusermount3", "fuse3"),
)

_MOUNT_TIMEOUT = 30.0  # seconds for a FUSE daemon to mount
_EXIT_TIMEOUT = 30.0  # seconds for a FUSE daemon to exit after its unmount
_KILL_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def fuse_problem() -> str | None:
    """Why FUSE mounting cannot work on this host, or None when it can."""
    problems: list[str] = []
    if not os.path.exists("/dev/fuse"):
        problems.append("no /dev/fuse (load the fuse module, or give the container the device)")
    elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
        problems.append("/dev/fuse is not accessible (permission denied)")
    for tool, package in _TOOLS:
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (install the Debian package {package})")
    return "; ".join(problems) if problems else None


async def spawn(argv: list[str], log_prefix: Path) -> asyncio.subprocess.Process:
    """Start a FUSE daemon in the foreground of its own session, output to ``log_prefix``.{out,err}."""
    out, err = await asyncio.to_thread(_open_logs, log_prefix)
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
    except OSError as exc:
        raise AgentError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    finally:
        os.close(out)
        os.close(err)


def _open_logs(log_prefix: Path) -> tuple[int, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    out = os.open(f"{log_prefix}.out", flags, 0o600)
    try:
        return out, os.open(f"{log_prefix}.err", flags, 0o600)
    except OSError:
        os.close(out)
        raise


async def wait_mounted(proc: asyncio.subprocess.Process, path: Path, name: str) -> bool:
    """True once ``path`` is a mount point; False if ``proc`` exited first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _MOUNT_TIMEOUT
    while True:
        if is_mounted(path):
            return True
        if proc.returncode is not None:
            return False
        if loop.time() > deadline:
            raise AgentError(f"{name} did not mount {path} within {_MOUNT_TIMEOUT:.0f} s")
        await asyncio.sleep(_POLL_INTERVAL)


def first_line(log_prefix: Path, proc: asyncio.subprocess.Process | None) -> str:
    """First non-blank line of a daemon's stderr (else stdout), or its exit status."""
    for suffix in (".err", ".out"):
        with contextlib.suppress(OSError):
            for line in Path(f"{log_prefix}{suffix}").read_text(errors="replace").splitlines():
                if line.strip():
                    return line.strip()
    rc = proc.returncode if proc is not None else None
    return f"exited with status {rc}" if rc is not None else "no output"


def _unescape_mountinfo(text: str) -> str:
    """Undo the octal escapes (``\\040`` for a space...) of /proc/self/mountinfo."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point. Reads mountinfo: never stats a (maybe hung) FUSE mount."""
    try:
        return mount_type(path) is not None
    except OSError:
        return os.path.ismount(path)


def mount_type(path: Path) -> str | None:
    """The filesystem type mounted at ``path`` (``ext4``: the kernel; ``fuse.fuse2fs``...), or None."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    target = str(path)
    found = None
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
            rest = fields[fields.index("-", 6) + 1:] if "-" in fields[6:] else []
            found = rest[0] if rest else "unknown"  # the last mount on the path is the one seen
    return found


async def _run(argv: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        return await asyncio.wait_for(proc.wait(), _EXIT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1


async def unmount(path: Path) -> None:
    """``fusermount3 -u``; if that fails (busy), lazily with ``-uz``."""
    if await _run(["fusermount3", "-u", str(path)]) != 0 or is_mounted(path):
        await _run(["fusermount3", "-uz", str(path)])


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for a daemon to exit after its unmount; terminate, then kill it if it hangs."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), _EXIT_TIMEOUT)
        return
    for sig in (proc.terminate, proc.kill):
        with contextlib.suppress(ProcessLookupError):
            sig()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), _KILL_TIMEOUT)
            return
