"""Mount the ext2/3/4 filesystem of an NBD export, and always unmount it again.

:func:`mounted_filesystem` attaches the export as a file (:mod:`client.agent.attach`),
mounts the filesystem in it with the kernel through a loop device where it may
(:mod:`client.agent.kernel`), else with ``fuse2fs``, and, on the way out, takes
both layers down in order, also on error or cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .attach import NbdAttachment
from .errors import AgentError
from .fuse import first_line, fuse_problem, is_mounted, reap, spawn, unmount, wait_mounted
from .kernel import KernelMount, kernel_mount_problem
from .syncfs import sync_filesystem

__all__ = ["mounted_filesystem"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_EXT_MAGIC_OFFSET = 1024 + 0x38  # s_magic in the primary superblock
_EXT_MAGIC = b"\x53\xef"


@contextlib.asynccontextmanager
async def mounted_filesystem(nbd_url: str, *, writable: bool, workdir: Path) -> AsyncIterator[Path]:
    """Mount the ext2/3/4 filesystem of the NBD export ``nbd_url``; yield its root.

    ``nbdfuse`` exposes the export as a file, ``fuse2fs`` mounts the filesystem
    in it. Both run as child processes in their own session (a Ctrl-C at the
    terminal must not kill them out of order). On exit, also on error or
    cancellation: sync, unmount fuse2fs, wait for it to exit (it writes back its
    cache as it exits), flush and unmount nbdfuse, wait for it too.

    A read-only mount of a filesystem whose journal needs recovery (a
    crash-consistent snapshot of a mounted volume) is retried without journal
    replay, with a warning logged.
    """
    problem = fuse_problem()
    if problem is not None:
        raise AgentError(f"cannot mount filesystems with FUSE here: {problem}")
    base = await asyncio.to_thread(_make_mount_dirs, workdir)
    mount = _Mount(nbd_url, writable, base)
    try:
        await mount.start()
        yield mount.fs_dir
    except BaseException:
        with contextlib.suppress(Exception):
            await _uncancelled(mount.stop(strict=False))
        raise
    await _uncancelled(mount.stop(strict=True))


def _make_mount_dirs(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="mount-", dir=workdir)).resolve()
    (base / "nbd").mkdir()
    (base / "fs").mkdir()
    return base


class _Mount:
    """The two FUSE daemons behind one mounted filesystem: nbdfuse (the attachment), then fuse2fs."""

    def __init__(self, url: str, writable: bool, base: Path) -> None:
        self.url = url
        self.writable = writable
        self.base = base
        self.attachment = NbdAttachment(url, writable, base)
        self.fs_dir = base / "fs"
        self.fuse2fs: asyncio.subprocess.Process | None = None
        self.kernel: KernelMount | None = None

    async def start(self) -> None:
        await self.attachment.start()
        problem = kernel_mount_problem()
        if problem is None and await asyncio.to_thread(_has_ext_magic, self.attachment.device):
            kernel = KernelMount(self.url, self.attachment.device, self.fs_dir, self.writable)
            if await kernel.start():
                self.kernel = kernel
                return
        elif problem is not None:
            log.debug("%s: no kernel mount (%s); mounting with fuse2fs", self.url, problem)

        options = "fakeroot,rw" if self.writable else "fakeroot,ro"
        if await self._start_fuse2fs(options):
            return
        why = first_line(self.base / "fuse2fs", self.fuse2fs)
        if not await asyncio.to_thread(_has_ext_magic, self.attachment.device):
            raise AgentError(f"no ext2/3/4 filesystem on {self.url}: {why}")
        if not self.writable and "journal needs recovery" in why.lower():
            log.warning("%s: journal needs recovery; mounting read-only without replaying it", self.url)
            if await self._start_fuse2fs(options + ",norecovery"):
                return
            why = first_line(self.base / "fuse2fs", self.fuse2fs)
        raise AgentError(f"cannot mount the filesystem on {self.url}: {why}")

    async def _start_fuse2fs(self, options: str) -> bool:
        argv = ["fuse2fs", str(self.attachment.device), str(self.fs_dir), "-f", "-o", options]
        self.fuse2fs = await spawn(argv, self.base / "fuse2fs")
        return await wait_mounted(self.fuse2fs, self.fs_dir, "fuse2fs")

    async def stop(self, *, strict: bool) -> None:
        """Unmount both layers, wait for both daemons; with ``strict``, raise if a mount is left."""
        if self.kernel is not None:
            await self.kernel.stop()
        elif is_mounted(self.fs_dir):
            if self.writable:
                await asyncio.to_thread(sync_filesystem, self.fs_dir)
            await unmount(self.fs_dir)
        if self.fuse2fs is not None:
            await reap(self.fuse2fs)
        if is_mounted(self.fs_dir):  # daemon killed: clear the dead mount
            await unmount(self.fs_dir)

        await self.attachment.stop()

        left = [str(p) for p in (self.fs_dir, self.attachment.nbd_dir) if is_mounted(p)]
        if not left:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shutil.rmtree, self.base)
        if left and strict:
            raise AgentError(f"could not unmount {', '.join(left)}")


async def _uncancelled(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion even if the caller is cancelled meanwhile; then re-raise."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def _has_ext_magic(device: Path) -> bool:
    try:
        with open(device, "rb") as f:
            f.seek(_EXT_MAGIC_OFFSET)
            return f.read(2) == _EXT_MAGIC
    except OSError:
        return False
