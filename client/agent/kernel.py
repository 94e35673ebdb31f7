"""Mount an ext2/3/4 filesystem with the kernel: a loop device over the ``nbdfuse`` file.

The kernel's ext4 reads through the page cache with readahead, several
requests in flight, where ``fuse2fs`` serves one FUSE request at a time in
user space: the kernel mount is the fast path for restoring files.  It needs
root (or CAP_SYS_ADMIN), ``losetup``/``mount``/``umount`` and a loop device;
where any of that is missing or the mount fails, :mod:`client.agent.mount`
falls back to ``fuse2fs``.  ``SPLITMIRROR_AGENT_MOUNT=fuse`` forces the
fallback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from .fuse import is_mounted

__all__ = ["KernelMount", "kernel_mount_problem"]

log = logging.getLogger(__name__)

_TOOLS = ("losetup", "mount", "umount")
_TIMEOUT = 60.0


def kernel_mount_problem() -> str | None:
    """Why a kernel mount will not be tried here, or None when it will."""
    if os.environ.get("SPLITMIRROR_AGENT_MOUNT", "") == "fuse":
        return "SPLITMIRROR_AGENT_MOUNT=fuse"
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    return f"{', '.join(missing)} not found" if missing else None


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{argv[0]} did not finish within {_TIMEOUT:g} s"
    return proc.returncode or 0, out.decode(errors="replace").strip()


class KernelMount:
    """A loop device over ``image`` and the filesystem in it mounted at ``target``."""

    def __init__(self, url: str, image: Path, target: Path, writable: bool) -> None:
        self.url = url
        self.image = image
        self.target = target
        self.writable = writable
        self.loop: str | None = None

    async def start(self) -> bool:
        """Mount; False (with nothing left behind) when the kernel will not."""
        argv = ["losetup", "--find", "--show"] + ([] if self.writable else ["--read-only"]) + [str(self.image)]
        code, out = await _run(*argv)
        if code != 0 or not out.startswith("/dev/"):
            log.info("%s: no loop device (%s); mounting with fuse2fs", self.url, out.splitlines()[-1:] or code)
            return False
        self.loop = out.splitlines()[-1]
        attempts = [["rw"]] if self.writable else [["ro"], ["ro", "noload"]]
        why = ""
        for options in attempts:
            if "noload" in options:
                log.warning("%s: journal needs recovery; mounting read-only without replaying it", self.url)
            code, why = await _run("mount", "-t", "ext4", "-o", ",".join(options), self.loop, str(self.target))
            if code == 0:
                log.debug("%s: mounted by the kernel on %s (%s)", self.url, self.loop, ",".join(options))
                return True
        log.info("%s: the kernel did not mount it (%s); mounting with fuse2fs", self.url, why)
        await self._detach()
        return False

    async def stop(self) -> None:
        """Unmount (lazily if busy) and free the loop device."""
        if is_mounted(self.target):
            code, _ = await _run("umount", str(self.target))
            if code != 0 and is_mounted(self.target):
                await _run("umount", "-l", str(self.target))
        await self._detach()

    async def _detach(self) -> None:
        if self.loop is not None:
            await _run("losetup", "-d", self.loop)
            self.loop = None
