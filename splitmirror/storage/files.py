"""Open volume files, bounded: a least-recently-used cache of descriptors.

A daemon with a thousand volumes cannot keep a thousand files open under
the common limit of 1024 descriptors, next to its sockets.  Each volume
holds a :class:`VolumeFile`, which opens its file on first use; at most
:attr:`OpenFiles.limit` are open at once, and the least recently used one
not in use is closed to make room.

Durability is never traded for a descriptor: a file written since its
last ``fdatasync`` is synced before it is closed, and if that sync fails
the error is kept and raised by the volume's next flush (a descriptor
opened later might never see it).  Used from the I/O pool's threads and
from the event loop (small writes), hence the lock; the loop only uses a
file that is open already (:meth:`VolumeFile.pinned`), so it never waits
for an open or an eviction.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("splitmirror.volume")

#: Until the daemon sets it from its open-file limit.
DEFAULT_LIMIT = 256


class OpenFiles:
    """At most :attr:`limit` volume files open; the least recently used closed first."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = max(1, limit)
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[VolumeFile, None] = collections.OrderedDict()
        #: Files opened and closed to make room, since start (shown as metrics, pinned by tests).
        self.opened = 0
        self.evicted = 0

    @property
    def open_count(self) -> int:
        return len(self._lru)

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)

    def _acquire(self, f: VolumeFile) -> int:
        while True:
            victim: tuple[VolumeFile, int, bool] | None = None
            with self._lock:
                if f.fd >= 0:
                    f.users += 1
                    self._lru.move_to_end(f)
                    return f.fd
                if len(self._lru) >= self.limit:
                    victim = self._pick_victim()
                if victim is None:
                    fd = os.open(f.path, os.O_RDWR | os.O_CLOEXEC)
                    f.fd = fd
                    f.users += 1
                    self._lru[f] = None
                    self.opened += 1
                    return fd
            self._close(*victim)  # outside the lock: it may sync

    def _pick_victim(self) -> tuple[VolumeFile, int, bool] | None:
        """Under the lock: take the least recently used idle file out (clean ones first)."""
        victim: VolumeFile | None = None
        for v in self._lru:  # least recently used first
            if v.users == 0:
                if not v.dirty:
                    victim = v
                    break
                victim = victim or v
        if victim is None:
            return None  # every open file is in use: go over the limit for now
        del self._lru[victim]
        fd, dirty = victim.fd, victim.dirty
        victim.fd, victim.dirty = -1, False
        self.evicted += 1
        return victim, fd, dirty

    @staticmethod
    def _close(f: VolumeFile, fd: int, dirty: bool) -> None:
        try:
            if dirty:
                os.fdatasync(fd)
        except OSError as exc:
            log.error("volume file %s: sync before closing it failed: %s", f.path, exc)
            f.error = exc
        finally:
            os.close(fd)

    def _release(self, f: VolumeFile) -> None:
        with self._lock:
            f.users -= 1

    def pin_if_open(self, f: VolumeFile) -> int:
        """The descriptor, held, if the file is open now; -1 without waiting otherwise."""
        with self._lock:
            if f.fd < 0:
                return -1
            f.users += 1
            self._lru.move_to_end(f)
            return f.fd

    def forget(self, f: VolumeFile) -> None:
        """Close the file for good (the volume is closed)."""
        with self._lock:
            fd = f.fd
            self._lru.pop(f, None)
            f.fd = -1
            f.closed = True
        if fd >= 0:
            os.close(fd)


#: The one cache of the process: its limit follows the open-file limit (set by the daemon at start).
OPEN_FILES = OpenFiles()


class VolumeFile:
    """A volume's file, opened on use through :data:`OPEN_FILES`."""

    def __init__(self, path: Path, cache: OpenFiles | None = None) -> None:
        self.path = path
        self.cache = cache or OPEN_FILES
        self.fd = -1
        self.users = 0
        #: Written since its last fdatasync (a sync is due before it is closed).
        self.dirty = False
        #: A sync error met while closing it to make room: raised by the next flush.
        self.error: OSError | None = None
        self.closed = False

    @contextlib.contextmanager
    def use(self) -> Iterator[int]:
        """The descriptor, open and held while the block runs (may open, may close another)."""
        if self.closed:
            raise ValueError(f"volume file {self.path} is closed")
        fd = self.cache._acquire(self)
        try:
            yield fd
        finally:
            self.cache._release(self)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[int]:
        """The descriptor if the file is open now (held while the block runs), else -1: never waits."""
        fd = -1 if self.closed else self.cache.pin_if_open(self)
        try:
            yield fd
        finally:
            if fd >= 0:
                self.cache._release(self)

    def sync(self) -> None:
        """fdatasync; raises a sync error met earlier when the file was closed to make room."""
        with self.use() as fd:
            self.dirty = False  # writes from now on set it again
            os.fdatasync(fd)
        error, self.error = self.error, None
        if error is not None:
            raise error

    def close(self) -> None:
        self.cache.forget(self)
