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
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import xxhash

from ..errors import InvalidArgument, OutOfRange
from .bitmap import TrackBitmap
from .files import VolumeFile

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
#: (not cached, larger, a closed file, or a filesystem without RWF_NOWAIT) is
#: read on IO_POOL.
INLINE_READ_BYTES = 256 << 10
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_nowait_reads = bool(_RWF_NOWAIT)

#: One pool for every volume: pwrite/pread/fdatasync release the GIL.
IO_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="volume-io")
#: Verification (Checksum, verify digests) reads whole volumes: it has a pool
#: of its own, so that host and replication I/O on IO_POOL never wait behind
#: it, and it goes one VERIFY_STEP at a time, so that a cancelled call (its
#: deadline passed, its client gone) stops after the step it is in.
VERIFY_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="volume-verify")
VERIFY_STEP = 4 << 20


#: Track sizes: powers of two in [MIN_TRACK_SIZE, MAX_TRACK_SIZE].  A track is
#: the unit of copies, resyncs and verify digests: one track is read, held and
#: sent whole, so a huge track makes every copy step huge (a 1 GiB track pins
#: gigabytes per step and starves the link's keepalive).
MIN_TRACK_SIZE = 4 << 10
MAX_TRACK_SIZE = 1 << 20
#: Largest volume: 16 TiB, ext4's largest file with 4 KiB blocks; with 4 KiB
#: tracks that is 2^32 tracks, all the 32-bit track bitmaps can number.
MAX_VOLUME_SIZE = 16 << 40


def validate_geometry(name: str, size: int, track_size: int) -> None:
    """Refuse a size or track size out of bounds, naming the bounds."""
    if not MIN_TRACK_SIZE <= track_size <= MAX_TRACK_SIZE or track_size & (track_size - 1):
        raise InvalidArgument(f"volume {name!r}: track size {track_size} is not a power of two from "
                              f"{MIN_TRACK_SIZE} (4 KiB) to {MAX_TRACK_SIZE} (1 MiB)")
    if size <= 0:
        raise InvalidArgument(f"volume {name!r}: size must be positive")
    if size > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"volume {name!r}: size {size} exceeds the largest volume size "
                              f"{MAX_VOLUME_SIZE} (16 TiB)")
    if size % track_size:
        raise InvalidArgument(
            f"volume {name!r}: size {size} is not a multiple of the track size {track_size}")


@functools.cache
def zero_track_digest(track_size: int) -> bytes:
    """xxh3-64 of a track of zeroes (a track inside a hole)."""
    return xxhash.xxh3_64_digest(bytes(track_size))


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class Volume:
    """A volume file (opened on use, see :mod:`splitmirror.storage.files`)."""

    def __init__(self, name: str, path: Path, size: int, track_size: int) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.track_size = track_size
        #: Opened on use: at most OPEN_FILES.limit volume files are open at once.
        self._file = VolumeFile(path)
        #: Tracks written since a backup receipt was taken (None: not tracked).
        self.written: TrackBitmap | None = None

    @property
    def tracks(self) -> int:
        return self.size // self.track_size

    # -- lifecycle ----------------------------------------------------------
    @classmethod
    def create(cls, name: str, path: Path, size: int, track_size: int) -> Volume:
        """Create a sparse file (refuses to overwrite one)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            path.unlink()
            raise
        finally:
            os.close(fd)
        return cls(name, path, size, track_size)

    @classmethod
    def open(cls, name: str, path: Path, size: int, track_size: int) -> Volume:
        """A volume of an existing file (opened on first use, as every volume's)."""
        vol = cls(name, path, size, track_size)
        with vol._file.use() as fd:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        return vol

    def close(self) -> None:
        self._file.close()

    # -- checks ---------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if length <= 0:
            raise InvalidArgument(f"volume {self.name!r}: zero-length I/O at offset {offset}")
        if offset < 0 or offset + length > self.size:
            raise OutOfRange(
                f"volume {self.name!r}: I/O at offset {offset} length {length} is beyond its size {self.size}")

    # -- synchronous primitives (run on IO_POOL) ----------------------------
    def pread(self, offset: int, length: int) -> bytes:
        with self._file.use() as fd:
            data = os.pread(fd, length, offset)
        if len(data) < length:  # never for a sized sparse file, but be exact
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        if self.written is not None and len(data):
            self.written.mark_bytes(offset, len(data), self.track_size)
        with self._file.use() as fd:
            _pwrite_all(fd, data, offset)
            self._file.dirty = True

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeroes, punching a hole where the fs can."""
        if self.written is not None and length:
            self.written.mark_bytes(offset, length, self.track_size)
        if _fallocate is not None:
            with self._file.use() as fd:
                rc = _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
                self._file.dirty = True
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
        self._file.sync()

    def allocated_ranges(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """``(offset, length)`` of the data (non-hole) ranges of the file."""
        end = self.size if end is None else end
        ranges: list[tuple[int, int]] = []
        pos = start
        with self._file.use() as fd:
            while pos < end:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    raise
                if data >= end:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                ranges.append((data, hole - data))
                pos = hole
        return ranges

    def allocated_bytes(self) -> int:
        return os.stat(self.path).st_blocks * 512

    def _hash_step(self, h: xxhash.xxh3_128, offset: int, length: int) -> None:
        """Feed ``length`` bytes at ``offset`` to ``h``; holes as zeroes, unread."""
        end = offset + length
        for data, size in self.allocated_ranges(offset, end):
            while offset < data:  # a hole: zeroes, without reading them
                n = min(len(ZERO_CHUNK), data - offset)
                h.update(ZERO_CHUNK[:n])
                offset += n
            h.update(self.pread(data, size))
            offset = data + size
        while offset < end:
            n = min(len(ZERO_CHUNK), end - offset)
            h.update(ZERO_CHUNK[:n])
            offset += n

    async def digest(self, offset: int, length: int, done: Callable[[int], None] | None = None) -> str:
        """xxh3-128 of a range, on VERIFY_POOL, one VERIFY_STEP at a time
        (cancelling the caller stops it after the current step); ``done`` hears
        the bytes of each step hashed (progress)."""
        loop = asyncio.get_running_loop()
        h = xxhash.xxh3_128()
        end = offset + length
        while offset < end:
            n = min(VERIFY_STEP, end - offset)
            await loop.run_in_executor(VERIFY_POOL, self._hash_step, h, offset, n)
            offset += n
            if done is not None:
                done(n)
        return h.hexdigest()

    async def verify_digests(self, first: int, count: int) -> bytes:
        """:meth:`track_digests` on VERIFY_POOL, a VERIFY_STEP of tracks at a time."""
        loop = asyncio.get_running_loop()
        per_step = max(1, VERIFY_STEP // self.track_size)
        out = bytearray()
        for start in range(first, first + count, per_step):
            n = min(per_step, first + count - start)
            out += await loop.run_in_executor(VERIFY_POOL, self.track_digests, start, n)
        return bytes(out)

    def data_runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """The runs ``(first, count)`` of tracks ``first..first+count-1`` that
        hold data: a track wholly inside a hole is all zeroes, unread."""
        ts = self.track_size
        runs: list[tuple[int, int]] = []
        for offset, length in self.allocated_ranges(first * ts, (first + count) * ts):
            start, stop = offset // ts, -(-(offset + length) // ts)
            if runs and runs[-1][0] + runs[-1][1] >= start:
                start = runs[-1][0]
                runs.pop()
            runs.append((start, min(stop, first + count) - start))
        return runs

    def sparse_read(self, first: int, count: int) -> tuple[memoryview, list[tuple[int, int]]]:
        """Tracks ``first..first+count-1``, reading only those that hold data
        (:meth:`data_runs`, also returned); holes come back as zeroes."""
        ts = self.track_size
        runs = self.data_runs(first, count)
        buf = bytearray(count * ts)
        view = memoryview(buf)
        for start, n in runs:
            data = self.pread(start * ts, n * ts)
            view[(start - first) * ts:(start - first + n) * ts] = data
        return view, runs

    def track_digests(self, first: int, count: int) -> bytes:
        """xxh3-64 of each track, 8 bytes big endian each (online verify, resync).

        Tracks inside holes are not read: their digest is the zero track's."""
        ts = self.track_size
        zero = zero_track_digest(ts)
        out = bytearray(zero * count)
        per_read = max(1, (4 << 20) // ts)
        for start, n in self.data_runs(first, count):
            for at in range(start, start + n, per_read):
                k = min(per_read, start + n - at)
                data = memoryview(self.pread(at * ts, k * ts))
                for i in range(k):
                    pos = 8 * (at - first + i)
                    out[pos:pos + 8] = xxhash.xxh3_64_digest(data[i * ts:(i + 1) * ts])
        return bytes(out)

    # -- asynchronous front ---------------------------------------------------
    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(IO_POOL, fn)

    async def read(self, offset: int, length: int) -> bytes:
        if _nowait_reads and length <= INLINE_READ_BYTES:
            cached = self._read_cached(offset, length)
            if cached is not None:
                return cached
        return await self.run(lambda: self.pread(offset, length))

    def _read_cached(self, offset: int, length: int) -> bytes | None:
        """The range if the file is open and the page cache holds all of it, else None; never waits."""
        global _nowait_reads
        with self._file.pinned() as fd:
            if fd < 0:
                return None
            buf = bytearray(length)
            try:
                n = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                _nowait_reads = False  # this kernel or filesystem cannot: the pool reads from now on
                return None
        return bytes(buf) if n == length else None

    async def write(self, offset: int, data: bytes) -> None:
        await self.run(lambda: self.pwrite(offset, data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.run(lambda: self.zero(offset, length))

    async def flush(self) -> None:
        await self.run(self.fdatasync)

    async def apply(self, entries: Sequence[tuple[int, bytes | memoryview, int]]) -> None:
        """Apply ``(offset, data, zero_length)`` entries in order, in one hop."""

        def apply_all() -> None:
            for offset, data, zero_length in entries:
                if zero_length:
                    self.zero(offset, zero_length)
                else:
                    self.pwrite(offset, data)

        if sum(len(d) for _, d, z in entries if not z) <= INLINE_WRITE_BYTES and not any(z for *_, z in entries):
            # On the loop only while the file is open: opening it (or closing
            # another to make room, which may sync) is the I/O pool's job.
            with self._file.pinned() as fd:
                if fd >= 0:
                    for offset, data, _ in entries:
                        if self.written is not None:
                            self.written.mark_bytes(offset, len(data), self.track_size)
                        _pwrite_all(fd, data, offset)
                    self._file.dirty = True
                    return
        await self.run(apply_all)
