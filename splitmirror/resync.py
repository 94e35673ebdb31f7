"""The copy engine: moves the tracks of a differential set, either direction.

Forward copies read each run of tracks from the primary end while holding
its byte range (so a host write to the same tracks is ordered after the
copy on the stream) and push it on the pair's ordered channel.  A track's
pending bit is cleared only once the mirror end acknowledged it, so a copy
interrupted by a fault resumes where it stopped.  Runs of zeroes cross the
interconnect as a length, not as data.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable

from .pair import CopyProgress, Pair
from .system import StorageSystem, WriteOp

log = logging.getLogger("splitmirror.resync")

RUN_BYTES = 1 << 20        # bytes per copy message
WINDOW_BYTES = 16 << 20    # copy bytes in flight
_ZEROES = memoryview(bytes(RUN_BYTES))


def is_zero(data: bytes) -> bool:
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


async def copy_forward(system: StorageSystem, pair: Pair) -> None:
    """Copy the primary end's pending tracks to the mirror end."""
    assert pair.primary is not None and pair.channel is not None
    end = pair.primary
    vol = end.volume
    ts = vol.track_size
    runs = list(end.bitmap.runs(max(1, RUN_BYTES // ts)))
    progress = CopyProgress("forward", sum(c for _, c in runs), ts)
    pair.progress = progress
    window = asyncio.Semaphore(max(1, WINDOW_BYTES // RUN_BYTES))
    inflight: set[asyncio.Future[bool]] = set()
    failed = False

    def settle(fut: asyncio.Future[bool], first: int, count: int, sent: int) -> None:
        nonlocal failed
        window.release()
        inflight.discard(fut)
        if fut.cancelled() or not fut.result():
            failed = True
            return
        end.bitmap.remove_range(first, first + count)
        progress.done_tracks += count
        progress.bytes_moved += sent
        pair.counters.resync_tracks_sent += count
        pair.counters.resync_bytes_sent += sent
        system.bytes_sent += sent

    for first, count in runs:
        await window.acquire()
        if failed or pair.channel is None:
            window.release()
            break
        offset, length = first * ts, count * ts
        async with system.order(vol).hold(offset, length):
            data = await vol.read(offset, length)
            if is_zero(data):
                fut = pair.channel.push(offset, zero_length=length, resync=True)
                sent = 0
            else:
                fut = pair.channel.push(offset, data, resync=True)
                sent = length
        inflight.add(fut)
        fut.add_done_callback(functools.partial(settle, first=first, count=count, sent=sent))
    if inflight:
        await asyncio.wait(list(inflight))
    if failed or pair.channel is None:
        raise CopyFailed(f"copy of pair {pair.name!r} interrupted")
    if not await pair.channel.push(0, flush=True):
        raise CopyFailed(f"copy of pair {pair.name!r} interrupted at the final flush")


async def copy_reverse(system: StorageSystem, pair: Pair, source: TrackSource) -> None:
    """Copy the pending tracks from the mirror end back into the primary end."""
    assert pair.primary is not None
    end = pair.primary
    vol = end.volume
    ts = vol.track_size
    progress = CopyProgress("reverse", len(end.bitmap), ts)
    pair.progress = progress
    async for first, count, data in source(end.bitmap.to_bytes()):
        offset, length = first * ts, count * ts
        op = WriteOp(offset, data) if data else WriteOp(offset, zero_length=length)
        await system.write_ops(vol, [op])
        end.bitmap.remove_range(first, first + count)
        progress.done_tracks += count
        progress.bytes_moved += len(data)
        pair.counters.resync_tracks_received += count
        pair.counters.resync_bytes_received += len(data)
        system.bytes_received += len(data)
    await vol.flush()


async def read_tracks(system: StorageSystem, pair: Pair, tracks: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
    """The mirror end's side of a reverse copy: runs of tracks with their data."""
    from .bitmap import TrackBitmap

    assert pair.mirror is not None
    vol = pair.mirror.volume
    ts = vol.track_size
    bitmap = TrackBitmap.from_bytes(vol.tracks, tracks)
    progress = CopyProgress("reverse", len(bitmap), ts)
    pair.progress = progress  # shown at the mirror end while it is the source
    for first, count in bitmap.runs(max(1, RUN_BYTES // ts)):
        if first + count > vol.tracks:
            break
        data = await vol.read(first * ts, count * ts)
        yield first, count, b"" if is_zero(data) else data
        progress.done_tracks += count
        progress.bytes_moved += len(data)
