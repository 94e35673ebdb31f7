"""Volumes: sparse files read and written with ``os.pread``/``os.pwrite``.

Every call that touches the disk runs on the volume I/O thread pool, never
on the event loop.  Range checks happen before anything is read or written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import xxhash

from ..errors import InvalidArgument, OutOfRange

T = TypeVar("T")

DEFAULT_TRACK_SIZE = 8192
ZERO_CHUNK = bytes(1 << 20)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int

#: Batches of writes up to this size go straight to the page cache from the
#: event loop: measured here, pwrite takes ~9 us for 8 KiB and ~30 us for
#: 64 KiB, while a hop to a worker thread and back costs ~150 us.  Larger
#: batches, reads, hole punching and fdatasync always run on IO_POOL.
INLINE_WRITE_BYTES = 64 << 10

#: Reads up to this size first try the page cache from the event loop:
#: ``preadv2(RWF_NOWAIT)`` never waits for the disk (it fails with EAGAIN when
#: a page is not cached), and a cached 4 KiB read costs a few microseconds
#: against the ~150 us of a hop to a worker thread and back.  Anything else
#: (not cached, larger, or a kernel or filesystem without RWF_NOWAIT) is read
#: on IO_POOL.
INLINE_READ_BYTES = 256 << 10
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

#: One pool for every volume: pwrite/pread/fdatasync release the GIL.
IO_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="volume-io")


def validate_geometry(name: str, size: int, track_size: int) -> None:
    if track_size < 4096 or track_size & (track_size - 1):
        raise InvalidArgument(f"volume {name!r}: track size {track_size} is not a power of two >= 4096")
    if size <= 0:
        raise InvalidArgument(f"volume {name!r}: size must be positive")
    if size % track_size:
        raise InvalidArgument(
            f"volume {name!r}: size {size} is not a multiple of the track size {track_size}")


class Volume:
    """An open volume file."""

    def __init__(self, name: str, path: Path, size: int, track_size: int, fd: int) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.track_size = track_size
        self._fd = fd
        self._nowait = bool(_RWF_NOWAIT)  # cleared when the filesystem refuses RWF_NOWAIT

    @property
    def tracks(self) -> int:
        return self.size // self.track_size

    # -- lifecycle ----------------------------------------------------------
    @classmethod
    def create(cls, name: str, path: Path, size: int, track_size: int) -> Volume:
        """Create a sparse file (refuses to overwrite one)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        return cls(name, path, size, track_size, fd)

    @classmethod
    def open(cls, name: str, path: Path, size: int, track_size: int) -> Volume:
        fd = os.open(path, os.O_RDWR)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        return cls(name, path, size, track_size, fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- checks ---------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if length <= 0:
            raise InvalidArgument(f"volume {self.name!r}: zero-length I/O at offset {offset}")
        if offset < 0 or offset + length > self.size:
            raise OutOfRange(
                f"volume {self.name!r}: I/O at offset {offset} length {length} is beyond its size {self.size}")

    # -- synchronous primitives (run on IO_POOL) ----------------------------
    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # never for a sized sparse file, but be exact
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeroes, punching a hole where the fs can."""
        if _fallocate is not None:
            rc = _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if rc == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(ctypes.get_errno(), f"fallocate on {self.path}")
        end = offset + length
        while offset < end:
            n = min(len(ZERO_CHUNK), end - offset)
            self.pwrite(offset, ZERO_CHUNK[:n])
            offset += n

    def fdatasync(self) -> None:
        os.fdatasync(self._fd)

    def allocated_ranges(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """``(offset, length)`` of the data (non-hole) ranges of the file."""
        end = self.size if end is None else end
        ranges: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            ranges.append((data, hole - data))
            pos = hole
        return ranges

    def allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def digest(self, offset: int, length: int) -> str:
        h = xxhash.xxh3_128()
        end = offset + length
        while offset < end:
            n = min(4 << 20, end - offset)
            h.update(self.pread(offset, n))
            offset += n
        return h.hexdigest()

    def track_digests(self, first: int, count: int) -> bytes:
        """xxh3-64 of each track, 8 bytes big endian each (online verify)."""
        ts = self.track_size
        out = bytearray()
        per_read = max(1, (4 << 20) // ts)
        for start in range(first, first + count, per_read):
            n = min(per_read, first + count - start)
            data = memoryview(self.pread(start * ts, n * ts))
            for i in range(n):
                out += xxhash.xxh3_64_digest(data[i * ts:(i + 1) * ts])
        return bytes(out)

    # -- asynchronous front ---------------------------------------------------
    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(IO_POOL, fn)

    async def read(self, offset: int, length: int) -> bytes:
        if self._nowait and length <= INLINE_READ_BYTES:
            cached = self._read_cached(offset, length)
            if cached is not None:
                return cached
        return await self.run(lambda: self.pread(offset, length))

    def _read_cached(self, offset: int, length: int) -> bytes | None:
        """The range if the page cache holds all of it, else None; never waits for the disk."""
        buf = bytearray(length)
        try:
            n = os.preadv(self._fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            self._nowait = False
            return None
        return bytes(buf) if n == length else None

    async def write(self, offset: int, data: bytes) -> None:
        await self.run(lambda: self.pwrite(offset, data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.run(lambda: self.zero(offset, length))

    async def flush(self) -> None:
        await self.run(self.fdatasync)

    async def apply(self, entries: Sequence[tuple[int, bytes, int]]) -> None:
        """Apply ``(offset, data, zero_length)`` entries in order, in one hop."""

        def apply_all() -> None:
            for offset, data, zero_length in entries:
                if zero_length:
                    self.zero(offset, zero_length)
                else:
                    self.pwrite(offset, data)

        if sum(len(d) for _, d, z in entries if not z) <= INLINE_WRITE_BYTES and not any(z for *_, z in entries):
            apply_all()
        else:
            await self.run(apply_all)
