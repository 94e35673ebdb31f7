"""A copy-on-write view of a volume file that never writes the volume.

``nbdkit --filter=cow file PATH`` opens the file read-only and keeps every
write in its own overlay; ``nbdfuse`` shows that server as a file; a loop
device on it carries a kernel mount.  Journal replay, fsck repairs and
whatever an operator's probe writes land in the overlay and vanish with it.
Every layer is taken down in order on the way out, also on error or
cancellation, and each command is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import FailedPrecondition
from .processes import run_process, spawn

log = logging.getLogger("splitmirror.check")

TOOLS = ("nbdkit", "nbdfuse", "e2fsck", "losetup", "mount", "umount")
READY_TIMEOUT = 30.0
STEP_TIMEOUT = 120.0
_FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


async def run(argv: list[str], timeout: float = STEP_TIMEOUT) -> tuple[int, str]:
    """Run a command (no shell); its exit status and output. A timeout kills it (status -9)."""
    code, out, timed_out = await run_process(argv, timeout)
    if timed_out:
        return code, f"{argv[0]} timed out after {timeout:g}s"
    return code, out.decode(errors="replace")


class Overlay:
    """``disk``: a writable file whose writes go to an overlay, over the read-only ``source``."""

    def __init__(self, source: Path, workdir: Path) -> None:
        self.source = source
        self.base = Path(tempfile.mkdtemp(prefix="check-", dir=workdir))
        self.base.chmod(0o711)  # a probe may run as another user (e.g. postgres) inside the mount
        self.fuse_dir = self.base / "fuse"
        self.mount_dir = self.base / "mnt"
        self.disk = self.fuse_dir / "disk"
        self.nbdfuse: subprocess.Popen[bytes] | None = None
        self.loop = ""

    async def start(self) -> None:
        await asyncio.to_thread(self.fuse_dir.mkdir)
        await asyncio.to_thread(self.mount_dir.mkdir)
        pidfile = self.base / "nbdfuse.pid"
        log_fd = os.open(self.base / "nbdfuse.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.nbdfuse = spawn(["nbdfuse", "-P", str(pidfile), str(self.disk), "--command", "nbdkit", "-s",
                                  "--exit-with-parent", "--filter=cow", "file", str(self.source)], log_fd)
        finally:
            os.close(log_fd)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while not await asyncio.to_thread(_ready, pidfile):
            if self.nbdfuse.poll() is not None or loop.time() > deadline:
                why = (self.base / "nbdfuse.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise FailedPrecondition(f"cannot attach a copy-on-write overlay of {self.source.name}: "
                                         f"{why[0] if why else 'nbdfuse did not become ready'}")
            await asyncio.sleep(0.05)

    async def mount(self) -> Path:
        """Mount the filesystem of the overlay read-write (journal replay happens in the overlay)."""
        code, out = await run(["losetup", "-f", "--show", str(self.disk)])
        if code != 0:
            raise FailedPrecondition(f"cannot attach a loop device to the overlay: {out.strip()}")
        self.loop = out.strip()
        code, out = await run(["mount", "-o", "noatime", self.loop, str(self.mount_dir)])
        if code != 0:
            raise FailedPrecondition(f"cannot mount the generation's filesystem: {out.strip()}")
        return self.mount_dir

    async def stop(self) -> None:
        if _is_mounted(self.mount_dir):
            code, _ = await run(["umount", str(self.mount_dir)])
            if code != 0:
                await run(["umount", "-l", str(self.mount_dir)])
        if self.loop:
            for _ in range(20):
                code, _ = await run(["losetup", "-d", self.loop])
                if code == 0:
                    break
                await asyncio.sleep(0.1)
            self.loop = ""
        if self.nbdfuse is not None:
            if _is_mounted(self.fuse_dir):
                await run([_FUSERMOUNT, "-u", str(self.fuse_dir)])
            try:
                await asyncio.to_thread(self.nbdfuse.wait, 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.nbdfuse.send_signal(signal.SIGKILL)
                await asyncio.to_thread(self.nbdfuse.wait)
                if _is_mounted(self.fuse_dir):
                    await run([_FUSERMOUNT, "-uz", str(self.fuse_dir)])
        if not _is_mounted(self.fuse_dir) and not _is_mounted(self.mount_dir):
            await asyncio.to_thread(shutil.rmtree, self.base, True)


@contextlib.asynccontextmanager
async def overlay(source: Path, workdir: Path) -> AsyncIterator[Overlay]:
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    view = await asyncio.to_thread(Overlay, source, workdir)
    try:
        await view.start()
        yield view
    finally:
        await asyncio.shield(view.stop())


def _ready(pidfile: Path) -> bool:
    return pidfile.exists() and pidfile.stat().st_size > 0


def _is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    try:
        with open("/proc/self/mountinfo") as fh:
            return any(line.split()[4] == target for line in fh if len(line.split()) > 4)
    except OSError:
        return False
