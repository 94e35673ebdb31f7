"""The copy engine: moves the tracks of a differential set, either direction.

Forward copies read runs of tracks from the primary end while holding
their byte range (so a host write to the same tracks is ordered after the
copy on the stream) and push them on the pair's ordered channel.  A track's
pending bit is cleared only once the mirror end acknowledged it, so a copy
interrupted by a fault resumes where it stopped.

A resync sends only what differs (the idea of DRBD's ``csums-alg``): the
mirror end's digests of a chunk's tracks are fetched before the chunk is
read, and a track whose data equals the mirror's is not sent at all (a
crash marks whole write-intent extents pending, most of whose tracks are
unchanged).  Of the tracks that differ, zero tracks cross the interconnect
as a length, not as data, and the mirror end punches a hole there: a hole
at the source stays a hole at the target.

A differential set is mostly scattered single tracks, so the engine works
in *chunks*: the runs that fit in :data:`RUN_BYTES` of tracks within
:data:`SPAN_BYTES` of the volume are read in one hop to the I/O pool and
pushed back to back, which puts them in one interconnect message.  What is
in flight is bounded in bytes (:data:`WINDOW_BYTES`), not in runs, and the
reads run ahead of the acknowledgements up to that bound.  A reverse copy
applies the runs it receives in the same chunks, one write each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator

import xxhash

from ..pairstate.pair import CopyProgress, Pair
from ..status import PairStatus
from ..storage.bitmap import TrackBitmap
from ..storage.volume import Volume, zero_track_digest
from .system import StorageSystem
from .writes import WriteOp

log = logging.getLogger("splitmirror.resync")

RUN_BYTES = 1 << 20        # tracks read in one hop (and the longest run)
SPAN_BYTES = 64 << 20      # volume bytes (gaps included) one chunk may span
WINDOW_BYTES = 16 << 20    # copy bytes in flight
DIGEST_BYTES = 64 << 20    # tracks whose mirror digests one request asks (8 bytes each)
_ZEROES = memoryview(bytes(RUN_BYTES))

Run = tuple[int, int]  # (first track, count)


def is_zero(data: bytes | memoryview) -> bool:
    view = memoryview(data)
    while view:
        n = min(len(view), len(_ZEROES))
        if view[:n] != _ZEROES[:n]:
            return False
        view = view[n:]
    return True


class CopyFailed(Exception):
    pass


TrackSource = Callable[[bytes], AsyncIterator[tuple[int, int, bytes]]]


class ByteWindow:
    """At most ``limit`` bytes in flight; a larger request runs alone.

    Released from done callbacks, so without a lock; one task acquires.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def acquire(self, size: int) -> None:
        while self.used and self.used + size > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
        self._freed.set()


@dataclasses.dataclass(frozen=True)
class ChunkBounds:
    """How far one chunk reaches: ``tracks`` of data within ``span`` tracks of the volume."""

    tracks: int
    span: int

    @classmethod
    def of(cls, track_size: int, limit: int = 0) -> ChunkBounds:
        """At most ``limit`` (RUN_BYTES) of tracks within SPAN_BYTES."""
        most = max(1, (limit or RUN_BYTES) // track_size)
        return cls(most, max(most, SPAN_BYTES // track_size))

    def admits(self, start: int, size: int, first: int, count: int) -> bool:
        """Whether run (first, count) joins a chunk that starts at track
        ``start`` and holds ``size`` tracks."""
        return size + count <= self.tracks and first + count - start <= self.span


def chunks(runs: Iterable[Run], track_size: int, limit: int = 0) -> Iterator[list[Run]]:
    """Group consecutive runs within :meth:`ChunkBounds.of` ``(track_size, limit)``."""
    bounds = ChunkBounds.of(track_size, limit)
    chunk: list[Run] = []
    size = 0
    for first, count in runs:
        if chunk and not bounds.admits(chunk[0][0], size, first, count):
            yield chunk
            chunk, size = [], 0
        chunk.append((first, count))
        size += count
    if chunk:
        yield chunk


#: The mirror end's digests (xxh3-64, 8 bytes each) of the tracks of some runs, in order.
MirrorDigests = Callable[[list[Run]], Awaitable[bytes]]

_SAME, _ZERO, _DATA = 0, 1, 2


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """Consecutive tracks to send: their data, or ``b""`` for zeroes."""

    first: int
    count: int
    data: bytes


def plan_chunk(vol: Volume, chunk: list[Run], theirs: bytes | None = None) -> tuple[list[Piece], int]:
    """Read a chunk's runs: the pieces to send, and how many tracks need none.

    With ``theirs`` (the mirror's digests of the chunk's tracks) a track
    equal to the mirror's is left out; zero tracks are pieces without data.
    Tracks inside holes are not read (nor hashed): they are zeroes.  On the
    I/O pool: one hop for the chunk.
    """
    ts = vol.track_size
    zero = zero_track_digest(ts)
    pieces: list[Piece] = []
    same = 0
    index = 0
    for first, count in chunk:
        view, data_runs = vol.sparse_read(first, count)
        if theirs is None and (not data_runs or is_zero(view)):
            pieces.append(Piece(first, count, b""))
            continue
        kinds = []
        holding = iter(data_runs)
        run = next(holding, None)
        for i in range(count):
            track = first + i
            while run is not None and run[0] + run[1] <= track:
                run = next(holding, None)
            at = 8 * (index + i)
            mirror = theirs[at:at + 8] if theirs is not None else None
            if run is None or track < run[0]:  # inside a hole: zeroes, unread
                kinds.append(_SAME if mirror == zero else _ZERO)
                continue
            data = view[i * ts:(i + 1) * ts]
            if mirror is not None and xxhash.xxh3_64_digest(data) == mirror:
                kinds.append(_SAME)
            else:
                kinds.append(_ZERO if is_zero(data) else _DATA)
        index += count
        if kinds.count(_DATA) == count:
            pieces.append(Piece(first, count, bytes(view)))
            continue
        pos = 0
        for kind, group in itertools.groupby(kinds):
            n = len(list(group))
            if kind == _SAME:
                same += n
            else:
                pieces.append(Piece(first + pos, n, bytes(view[pos * ts:(pos + n) * ts]) if kind == _DATA else b""))
            pos += n
    return pieces, same


class MirrorAsk:
    """The mirror's digests of a copy's chunks, asked a group of chunks at a
    time (up to :data:`DIGEST_BYTES` of tracks in one request), the next
    group while the current one is read and pushed."""

    def __init__(self, digests: MirrorDigests | None, todo: list[list[Run]], track_size: int) -> None:
        self._digests = digests
        self._groups: list[list[Run]] = []  # the runs of each group
        self._tracks: list[int] = []  # the tracks of each group
        self._where: list[tuple[int, int]] = []  # chunk -> (group, byte offset of its digests in the group's)
        most = max(1, DIGEST_BYTES // track_size)
        for chunk in todo:
            count = sum(c for _, c in chunk)
            if not self._tracks or self._tracks[-1] + count > most:
                self._groups.append([])
                self._tracks.append(0)
            self._where.append((len(self._groups) - 1, 8 * self._tracks[-1]))
            self._groups[-1].extend(chunk)
            self._tracks[-1] += count
        self._asked: dict[int, asyncio.Future[bytes]] = {}

    def _ask(self, group: int) -> asyncio.Future[bytes]:
        if group not in self._asked:
            assert self._digests is not None
            self._asked[group] = asyncio.ensure_future(self._digests(self._groups[group]))
        return self._asked[group]

    async def of(self, chunk: int) -> bytes:
        """The digests of chunk ``chunk``'s tracks (the whole group's, when they do not match its size)."""
        group, at = self._where[chunk]
        fut = self._ask(group)
        if group + 1 < len(self._groups):
            self._ask(group + 1)
        theirs = await fut
        tracks = self._tracks[group]
        if len(theirs) != 8 * tracks:
            return theirs
        end = self._where[chunk + 1][1] if chunk + 1 < len(self._where) and self._where[chunk + 1][0] == group \
            else 8 * tracks
        return theirs[at:end]

    async def cancel(self) -> None:
        for fut in self._asked.values():
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(BaseException):
                await fut


async def copy_forward(system: StorageSystem, pair: Pair, digests: MirrorDigests | None = None,
                       window_bytes: int = 0) -> None:
    """Copy the primary end's pending tracks to the mirror end.

    With ``digests`` (the mirror end's, see :data:`MirrorDigests`), tracks
    the mirror already holds are not sent; those of the next chunk are
    asked while the current one is read and pushed.  At most
    ``window_bytes`` (default :data:`WINDOW_BYTES`) of tracks are in flight
    (a link's copies share a window).
    """
    assert pair.primary is not None and pair.channel is not None
    end = pair.primary
    vol = end.volume
    ts = vol.track_size
    window_bytes = window_bytes or WINDOW_BYTES
    if pair.row.mode == "async":
        # Copy entries count in the async queue, which suspends the pair
        # when full: leave most of it to host writes.
        window_bytes = min(window_bytes, max(ts, system.async_queue_bytes // 4))
    chunk_bytes = min(RUN_BYTES, window_bytes)
    runs = list(end.bitmap.runs(max(1, chunk_bytes // ts)))
    progress = CopyProgress("forward", sum(c for _, c in runs), ts)
    pair.progress = progress
    window = ByteWindow(window_bytes)
    inflight: set[asyncio.Future[bool]] = set()
    failed = False
    # The COPY this copy runs in: a status that left it (and maybe came
    # back) ends the copy, whose digests and reads may predate writes
    # tracked meanwhile, at either end.
    session = pair.status_changes

    def current() -> bool:
        return pair.status is PairStatus.COPY and pair.status_changes == session

    def settle(fut: asyncio.Future[bool], first: int, count: int, sent: int) -> None:
        nonlocal failed
        window.release(count * ts)
        inflight.discard(fut)
        if fut.cancelled() or not fut.result() or not current():
            # Suspended meanwhile (a full async queue does so before the
            # stream closes): a host write may have set these bits again
            # after the read, so they stay for the next resync.
            failed = True
            return
        end.bitmap.remove_range(first, first + count)
        progress.done_tracks += count
        progress.bytes_moved += sent
        pair.counters.resync_tracks_sent += count
        pair.counters.resync_bytes_sent += sent
        system.bytes_sent += sent

    todo = list(chunks(runs, ts, chunk_bytes))
    asked = MirrorAsk(digests, todo, ts)
    try:
        for index, chunk in enumerate(todo):
            size = sum(c for _, c in chunk) * ts
            await window.acquire(size)
            if failed or pair.channel is None:
                window.release(size)
                break
            theirs: bytes | None = None
            if digests is not None:
                # Asked before the chunk is held: a host write meanwhile is on
                # the stream after the mirror's state digested, and the read
                # below sees it, so "equal" still means equal once applied.
                theirs = await asked.of(index)
                if len(theirs) != 8 * (size // ts):
                    log.warning("pair %s: the mirror sent %d bytes of digests for %d tracks; sending them all",
                                pair.name, len(theirs), size // ts)
                    theirs = None
            start, stop = chunk[0][0] * ts, (chunk[-1][0] + chunk[-1][1]) * ts
            # One range (gaps included) taken at once: holding the runs one by
            # one could deadlock against a host write spanning two of them.
            async with system.order(vol).hold(start, stop - start):
                pieces, same = await vol.run(functools.partial(plan_chunk, vol, chunk, theirs))
                channel = pair.channel
                if channel is None or not current():  # torn down or suspended meanwhile
                    window.release(size)
                    failed = True
                    break
                # No await from here to the last push: the chunk's entries are
                # consecutive on the stream, which sends them in one batch.
                if same:
                    # Equal at the mirror: done without sending (the bits of
                    # tracks a host writes from now on are set after this).
                    for first, count in _gaps(chunk, pieces):
                        end.bitmap.remove_range(first, first + count)
                    progress.done_tracks += same
                    window.release(same * ts)
                for piece in pieces:
                    if piece.data:
                        fut = channel.push(piece.first * ts, piece.data, resync=True)
                    else:
                        fut = channel.push(piece.first * ts, zero_length=piece.count * ts, resync=True)
                    inflight.add(fut)
                    fut.add_done_callback(functools.partial(settle, first=piece.first, count=piece.count,
                                                            sent=len(piece.data)))
    finally:
        await asked.cancel()
    if inflight:
        await asyncio.wait(list(inflight))
    if failed or pair.channel is None:
        raise CopyFailed(f"copy of pair {pair.name!r} interrupted")
    # Every track pushed is acknowledged (applied) by now.  A remote mirror
    # end makes its volume durable when told the copy is done (resync-done
    # flushes it before the pair is DUPLEX), so only a local copy flushes its
    # mirror here: a thousand small resyncs wait for one fsync each, not two.
    if not pair.remote and not await pair.channel.push(0, flush=True):
        raise CopyFailed(f"copy of pair {pair.name!r} interrupted at the final flush")


def _gaps(chunk: list[Run], pieces: list[Piece]) -> Iterator[Run]:
    """The tracks of ``chunk`` that no piece covers (pieces in track order)."""
    at = 0
    for first, count in chunk:
        pos, stop = first, first + count
        while at < len(pieces) and pieces[at].first < stop:
            if pieces[at].first > pos:
                yield pos, pieces[at].first - pos
            pos = pieces[at].first + pieces[at].count
            at += 1
        if pos < stop:
            yield pos, stop - pos


async def copy_reverse(system: StorageSystem, pair: Pair, source: TrackSource) -> None:
    """Copy the pending tracks from the mirror end back into the primary end.

    A reader task receives runs, up to WINDOW_BYTES ahead, while the runs
    received before are written: each write takes what has arrived, within
    one chunk's bounds.
    """
    assert pair.primary is not None
    end = pair.primary
    vol = end.volume
    ts = vol.track_size
    progress = CopyProgress("reverse", len(end.bitmap), ts)
    pair.progress = progress
    bounds = ChunkBounds.of(ts)
    window = ByteWindow(WINDOW_BYTES)
    arrived: collections.deque[tuple[int, int, bytes]] = collections.deque()
    more = asyncio.Event()
    finished = False

    async def receive() -> None:
        nonlocal finished
        try:
            async for first, count, data in source(end.bitmap.to_bytes()):
                await window.acquire(count * ts)
                arrived.append((first, count, data))
                more.set()
        finally:
            finished = True
            more.set()

    reader = asyncio.create_task(receive(), name=f"copy-reverse-{pair.name}")
    try:
        while True:
            while not arrived and not finished:
                more.clear()
                await more.wait()
            if not arrived:
                break
            batch = [arrived.popleft()]
            size = batch[0][1]
            while arrived:
                first, count, _ = arrived[0]
                if not bounds.admits(batch[0][0], size, first, count):
                    break
                batch.append(arrived.popleft())
                size += count
            ops = [WriteOp(first * ts, data) if data else WriteOp(first * ts, zero_length=count * ts)
                   for first, count, data in batch]
            await system.write_ops(vol, ops)
            window.release(size * ts)
            moved = sum(len(data) for _, _, data in batch)
            for first, count, _ in batch:
                end.bitmap.remove_range(first, first + count)
            progress.done_tracks += size
            progress.bytes_moved += moved
            pair.counters.resync_tracks_received += size
            pair.counters.resync_bytes_received += moved
            system.bytes_received += moved
        await reader  # raises what interrupted the source, after what came is written
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    await vol.flush()


async def read_tracks(system: StorageSystem, pair: Pair, tracks: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
    """The mirror end's side of a reverse copy: runs of tracks with their data."""
    assert pair.mirror is not None
    vol = pair.mirror.volume
    ts = vol.track_size
    bitmap = TrackBitmap.from_bytes(vol.tracks, tracks)
    progress = CopyProgress("reverse", len(bitmap), ts)
    pair.progress = progress  # shown at the mirror end while it is the source
    runs = (run for run in bitmap.runs(max(1, RUN_BYTES // ts)) if run[0] + run[1] <= vol.tracks)
    for chunk in chunks(runs, ts):
        pieces, _ = await vol.run(functools.partial(plan_chunk, vol, chunk))
        for piece in pieces:  # zero tracks without data: they stay holes at the target
            yield piece.first, piece.count, piece.data
            progress.done_tracks += piece.count
            progress.bytes_moved += len(piece.data)
