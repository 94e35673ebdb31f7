"""Fixed glibc heap thresholds for a daemon that moves megabyte payloads.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` with its own
``mmap`` and gives the top of the heap back to the kernel once more than
``M_TRIM_THRESHOLD`` is free there.  Both adapt by default, and for a daemon
that allocates and frees a 1 MiB write payload per request they settle where
nearly every payload costs an ``mmap``/``munmap`` or a trim and 256 page faults
on first touch.  Fixed values keep payloads up to ``MMAP_THRESHOLD`` on the
heap and let up to ``TRIM_THRESHOLD`` of freed heap be reused before it is
returned, which bounds the memory kept (unlike turning trimming off).

``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment win,
so an operator can still choose other values or glibc's adaptive defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

MiB = 1024 * 1024
MMAP_THRESHOLD = 4 * MiB  # above the 1 MiB requests of nbdcopy and qemu, below the 32 MiB NBD maximum
TRIM_THRESHOLD = 64 * MiB

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3

log = logging.getLogger("splitmirror.daemon")


def fix_malloc_thresholds() -> bool:
    """Set the thresholds unless the environment chose them; False where glibc is absent."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:  # pragma: no cover - not glibc
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # pragma: no cover - musl and others
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc malloc thresholds fixed: mmap %d, trim %d (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD, done)
    return done
