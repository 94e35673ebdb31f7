"""Make one filesystem durable: ``syncfs(2)`` on a path in it.

``os.sync`` writes back every filesystem of the machine, so a restore would
wait for whatever other processes left dirty (a busy host's gigabytes);
``syncfs`` waits only for the mount the restore wrote.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

__all__ = ["sync_filesystem"]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
if _syncfs is not None:
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int


def sync_filesystem(path: Path) -> None:
    """Write back the filesystem holding ``path`` (blocking: run it in a worker thread)."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
