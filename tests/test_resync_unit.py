"""The copy engine against a fake channel: byte window, chunking, ack-driven bits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from splitmirror.datapath import copyengine as resync
from splitmirror.datapath.writes import WriteOp
from splitmirror.pairstate.pair import Pair, PairEnd
from splitmirror.status import PairStatus
from splitmirror.storage.bitmap import TrackBitmap
from splitmirror.storage.copytable import PairRow
from splitmirror.storage.ordering import RangeOrder
from splitmirror.storage.volume import Volume

TS = 4096


class FakeChannel:
    """Records pushes; the test resolves their futures (acknowledges) by hand."""

    def __init__(self) -> None:
        self.pushed: list[tuple[int, bytes, int, bool, asyncio.Future[bool]]] = []

    def push(self, offset: int, data: bytes = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: object = None) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if flush:
            fut.set_result(True)
        self.pushed.append((offset, data, zero_length, flush, fut))
        return fut

    def unacked(self) -> list[tuple[int, bytes, int]]:
        return [(o, d, z) for o, d, z, _, f in self.pushed if not f.done()]

    def ack(self, n: int, result: bool = True) -> None:
        for *_, fut in [p for p in self.pushed if not p[4].done()][:n]:
            fut.set_result(result)


class FakeSystem:
    def __init__(self) -> None:
        self.ranges = RangeOrder()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.async_queue_bytes = 256 << 20
        self.writes: list[list[WriteOp]] = []

    def order(self, vol: Volume) -> RangeOrder:
        return self.ranges

    async def write_ops(self, vol: Volume, ops: list[WriteOp]) -> None:
        self.writes.append(ops)
        for op in ops:
            vol.pwrite(op.offset, op.data or bytes(op.zero_length))


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Volume]:
    v = Volume.create("v", tmp_path / "v.vol", 4096 * TS, TS)
    yield v
    v.close()


def make_pair(vol: Volume, bitmap: TrackBitmap, channel: FakeChannel | None = None,
              copy_type: str = "REMOTE") -> Pair:
    row = PairRow("p", vol.name, copy_type, 2001, "v-r", True, PairStatus.COPY, "sync", "")
    pair = Pair("p")
    pair.primary = PairEnd(row, vol, bitmap)
    pair.channel = channel
    return pair


@pytest.fixture
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resync, "RUN_BYTES", 8 * TS)
    monkeypatch.setattr(resync, "SPAN_BYTES", 512 * TS)
    monkeypatch.setattr(resync, "WINDOW_BYTES", 40 * TS)


async def settle() -> None:
    """Let the copy run until it waits (reads go through the I/O pool)."""
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    await settle()  # and nothing more happens


def test_chunks_respect_bytes_and_span(small_window: None) -> None:
    runs = [(t, 1) for t in range(0, 4000, 3)] + [(4000, 8), (4010, 3)]
    groups = list(resync.chunks(runs, TS))
    assert [r for g in groups for r in g] == runs
    for g in groups:
        assert sum(c for _, c in g) <= 8
        assert g[-1][0] + g[-1][1] - g[0][0] <= 512
    assert max(len(g) for g in groups) == 8  # scattered single tracks share a chunk


async def test_byte_window_blocks_until_released() -> None:
    window = resync.ByteWindow(100)
    await window.acquire(60)
    waiter = asyncio.create_task(window.acquire(60))
    await settle()
    assert not waiter.done()
    window.release(60)
    await asyncio.wait_for(waiter, 1)
    window.release(60)
    await asyncio.wait_for(window.acquire(500), 1)  # larger than the window: alone


async def test_forward_window_counts_bytes_and_bits_clear_on_ack(vol: Volume, small_window: None) -> None:
    tracks = list(range(0, 200, 2))  # 100 scattered single tracks
    for t in tracks:
        if t % 10:  # every fifth one stays a hole
            vol.pwrite(t * TS, bytes([t % 251 + 1]) * TS)
    bitmap = TrackBitmap(vol.tracks, tracks)
    channel = FakeChannel()
    system = FakeSystem()
    pair = make_pair(vol, bitmap, channel)
    task = asyncio.create_task(resync.copy_forward(system, pair))  # type: ignore[arg-type]
    await until(lambda: len(channel.pushed) >= 40)
    # 40 tracks of window: 40 single-track runs in flight (a run-count bound allowed 5).
    assert len(channel.unacked()) == 40
    assert len(bitmap) == 100  # nothing acknowledged yet
    for offset, data, zero_length in channel.unacked():
        t = offset // TS
        if t % 10:
            assert data == bytes([t % 251 + 1]) * TS and not zero_length
        else:
            assert data == b"" and zero_length == TS  # zeroes cross as a length
    channel.ack(8)  # one chunk's bytes
    await until(lambda: len(channel.pushed) >= 48)
    assert len(bitmap) == 92 and 14 not in bitmap and 16 in bitmap
    assert len(channel.unacked()) == 40  # the reads ran ahead again
    while not task.done():
        channel.ack(1000)
        await settle()
    await task
    assert not bitmap
    assert pair.counters.resync_tracks_sent == 100
    assert pair.counters.resync_bytes_sent == 80 * TS == system.bytes_sent
    # No final flush on the stream: the remote mirror end flushes its volume
    # when told the copy is done (resync-done), before the pair is DUPLEX.
    assert not any(flush for _, _, _, flush, _ in channel.pushed)


async def test_forward_interrupted_keeps_unacknowledged_bits(vol: Volume, small_window: None) -> None:
    bitmap = TrackBitmap(vol.tracks, range(0, 100, 2))
    channel = FakeChannel()
    pair = make_pair(vol, bitmap, channel)
    task = asyncio.create_task(resync.copy_forward(FakeSystem(), pair))  # type: ignore[arg-type]
    await until(lambda: len(channel.pushed) >= 40)
    channel.ack(15)
    channel.ack(1000, result=False)  # the stream broke
    with pytest.raises(resync.CopyFailed):
        await asyncio.wait_for(task, 5)
    assert sorted(bitmap) == list(range(30, 100, 2))  # resumes where it stopped


async def test_forward_reads_after_an_earlier_overlapping_write(vol: Volume, small_window: None) -> None:
    bitmap = TrackBitmap(vol.tracks, [4, 9])
    channel = FakeChannel()
    system = FakeSystem()
    order = system.ranges
    pair = make_pair(vol, bitmap, channel)
    async with order.hold(9 * TS, TS):  # a host write to a copied track, registered first
        task = asyncio.create_task(resync.copy_forward(system, pair))  # type: ignore[arg-type]
        await settle()
        assert channel.pushed == []  # ordered after the write
        vol.pwrite(9 * TS, b"n" * TS)
    await until(lambda: len(channel.pushed) >= 2)
    assert [(o, d[:1]) for o, d, _ in channel.unacked()] == [(4 * TS, b""), (9 * TS, b"n")]
    channel.ack(2)
    await asyncio.wait_for(task, 5)


async def test_reverse_writes_what_arrived_in_chunks(vol: Volume, small_window: None) -> None:
    tracks = list(range(0, 120, 3))
    bitmap = TrackBitmap(vol.tracks, tracks)
    system = FakeSystem()
    pair = make_pair(vol, bitmap)
    gate = asyncio.Event()

    def source(wanted: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
        async def gen() -> AsyncIterator[tuple[int, int, bytes]]:
            for t in sorted(TrackBitmap.from_bytes(vol.tracks, wanted)):
                if t == 60:
                    await gate.wait()
                yield t, 1, b"" if t % 2 else bytes([t + 1]) * TS
        return gen()

    task = asyncio.create_task(resync.copy_reverse(system, pair, source))  # type: ignore[arg-type]
    await until(lambda: len(bitmap) <= 20)
    assert sorted(bitmap) == list(range(60, 120, 3))  # what arrived is written; the rest pending
    gate.set()
    await asyncio.wait_for(task, 5)
    assert not bitmap
    assert all(len(ops) <= 8 for ops in system.writes) and len(system.writes) < len(tracks)
    for t in tracks:
        assert vol.pread(t * TS, TS) == (bytes(TS) if t % 2 else bytes([t + 1]) * TS)
    assert pair.counters.resync_tracks_received == len(tracks)


async def test_reverse_source_error_raises_after_writing_what_came(vol: Volume, small_window: None) -> None:
    bitmap = TrackBitmap(vol.tracks, range(10))
    system = FakeSystem()
    pair = make_pair(vol, bitmap)

    def source(wanted: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
        async def gen() -> AsyncIterator[tuple[int, int, bytes]]:
            for t in range(4):
                yield t, 1, b"x" * TS
            raise ConnectionError("link lost")
        return gen()

    with pytest.raises(ConnectionError):
        await resync.copy_reverse(system, pair, source)  # type: ignore[arg-type]
    assert sorted(bitmap) == list(range(4, 10))


async def test_read_tracks_yields_runs_with_zeroes_empty(vol: Volume, small_window: None) -> None:
    vol.pwrite(3 * TS, b"d" * TS)
    pair = make_pair(vol, TrackBitmap(vol.tracks))
    pair.mirror, pair.primary = pair.primary, None
    wanted = TrackBitmap(vol.tracks, [1, 3, 4, 20, *range(30, 45)]).to_bytes()
    got = [(f, c, d[:1]) async for f, c, d in resync.read_tracks(FakeSystem(), pair, wanted)]  # type: ignore[arg-type]
    # Track 4 is zero: it crosses as a length apart from track 3 (a hole stays a hole).
    assert got == [(1, 1, b""), (3, 1, b"d"), (4, 1, b""), (20, 1, b""), (30, 8, b""), (38, 7, b"")]


async def test_forward_ack_after_suspension_keeps_the_bits(vol: Volume, small_window: None) -> None:
    """A full async queue suspends the pair before its stream closes: an ack
    arriving then must not clear a bit that a tracked host write set again."""
    bitmap = TrackBitmap(vol.tracks, range(0, 20, 2))
    channel = FakeChannel()
    pair = make_pair(vol, bitmap, channel)
    task = asyncio.create_task(resync.copy_forward(FakeSystem(), pair))  # type: ignore[arg-type]
    await until(lambda: len(channel.pushed) >= 10)
    channel.ack(3)
    await settle()
    pair.primary.row.status = PairStatus.SUSPENDED  # type: ignore[union-attr]
    channel.ack(1000)  # acknowledged, but the tracks may have been written since
    with pytest.raises(resync.CopyFailed):
        await asyncio.wait_for(task, 5)
    assert sorted(bitmap) == list(range(6, 20, 2))


async def test_forward_async_pair_leaves_the_queue_to_host_writes(vol: Volume, small_window: None) -> None:
    """Copy entries count in an async pair's queue: a window the size of the
    queue would overflow it (and suspend the pair) with the first host write."""
    bitmap = TrackBitmap(vol.tracks, range(0, 64))
    channel = FakeChannel()
    system = FakeSystem()
    system.async_queue_bytes = 16 * TS
    pair = make_pair(vol, bitmap, channel)
    pair.primary.row.mode = "async"  # type: ignore[union-attr]
    task = asyncio.create_task(resync.copy_forward(system, pair))  # type: ignore[arg-type]
    await until(lambda: len(channel.pushed) >= 1)
    assert sum(z or len(d) for _, d, z in channel.unacked()) == 4 * TS
    while not task.done():
        channel.ack(1000)
        await settle()
    await task
    assert not bitmap


async def test_forward_sends_only_tracks_that_differ_from_the_mirror(vol: Volume, tmp_path: Path,
                                                                    small_window: None) -> None:
    """A crash marks whole extents pending; the mirror's digests leave out what it holds already."""
    mirror = Volume.create("m", tmp_path / "m.vol", vol.size, TS)
    try:
        for t in range(0, 64, 4):  # both ends hold these
            vol.pwrite(t * TS, bytes([t + 1]) * TS)
            mirror.pwrite(t * TS, bytes([t + 1]) * TS)
        vol.pwrite(9 * TS, b"new" * (TS // 3) + b"n")  # differs: data
        mirror.pwrite(21 * TS, b"old" * (TS // 3) + b"o")  # differs: zero here, a hole to punch there
        vol.pwrite(33 * TS, b"z" * 100)  # a run with data in one track only: the rest of it stays holes
        mirror.pwrite(34 * TS, b"y" * TS)
        bitmap = TrackBitmap(vol.tracks, range(0, 64))
        asked: list[list[tuple[int, int]]] = []

        async def digests(runs: list[tuple[int, int]]) -> bytes:
            asked.append(runs)
            return b"".join(mirror.track_digests(f, c) for f, c in runs)

        channel = FakeChannel()
        system = FakeSystem()
        pair = make_pair(vol, bitmap, channel)
        task = asyncio.create_task(resync.copy_forward(system, pair, digests))  # type: ignore[arg-type]
        while not task.done():
            channel.ack(1000)
            await settle()
        await task
        sent = [(o // TS, len(d), z // TS) for o, d, z, flush, _ in channel.pushed if not flush]
        assert sent == [(9, TS, 0), (21, 0, 1), (33, TS, 0), (34, 0, 1)]
        assert not bitmap and sum(c for r in asked for _, c in r) == 64
        assert pair.counters.resync_bytes_sent == 2 * TS == system.bytes_sent
        assert pair.progress is not None and pair.progress.done_tracks == 64
    finally:
        mirror.close()


async def test_forward_without_digests_splits_zero_tracks_from_data(vol: Volume, small_window: None) -> None:
    vol.pwrite(2 * TS, b"d" * TS)
    vol.pwrite(5 * TS, b"e" * TS)
    bitmap = TrackBitmap(vol.tracks, range(0, 8))
    channel = FakeChannel()
    pair = make_pair(vol, bitmap, channel)
    task = asyncio.create_task(resync.copy_forward(FakeSystem(), pair))  # type: ignore[arg-type]
    while not task.done():
        channel.ack(1000)
        await settle()
    await task
    sent = [(o // TS, len(d) // TS, z // TS) for o, d, z, flush, _ in channel.pushed if not flush]
    assert sent == [(0, 0, 2), (2, 1, 0), (3, 0, 2), (5, 1, 0), (6, 0, 2)]


def test_digests_and_reads_skip_holes_yet_equal_a_full_read(vol: Volume) -> None:
    """Tracks inside holes are digested and read as zeroes without reading them:
    the results equal those of reading every byte."""
    import xxhash

    for t, fill in ((3, b"a"), (4, b"b"), (700, b"c"), (4095, b"d")):
        vol.pwrite(t * TS, fill * TS)
    vol.pwrite(1000 * TS + 100, b"partial")  # data in part of a track
    vol.zero(4 * TS, TS)  # written, then a hole again
    for first, count in ((0, 4096), (2, 3), (699, 2), (1000, 1), (1001, 50), (4090, 6)):
        full = vol.pread(first * TS, count * TS)
        naive = b"".join(xxhash.xxh3_64_digest(full[i * TS:(i + 1) * TS]) for i in range(count))
        assert vol.track_digests(first, count) == naive, (first, count)
        view, runs = vol.sparse_read(first, count)
        assert bytes(view) == full
        holding = {t for start, n in runs for t in range(start, start + n)}
        assert {3, 700, 1000, 4095} & set(range(first, first + count)) <= holding
        assert all(first <= t < first + count for t in holding)


async def test_forward_with_everything_equal_sends_nothing_not_even_a_flush(
        vol: Volume, tmp_path: Path, small_window: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash-marked volume whose mirror holds the same: digests asked a group
    of chunks at a time, no track and no flush crosses (a remote mirror end
    flushes when told the copy is done), every bit cleared."""
    monkeypatch.setattr(resync, "DIGEST_BYTES", 100 * TS)
    mirror = Volume.create("m", tmp_path / "m.vol", vol.size, TS)
    try:
        for t in (5, 6, 300, 2000):
            vol.pwrite(t * TS, bytes([t % 250 + 1]) * TS)
            mirror.pwrite(t * TS, bytes([t % 250 + 1]) * TS)
        bitmap = TrackBitmap(vol.tracks, range(vol.tracks))
        asked: list[int] = []

        async def digests(runs: list[tuple[int, int]]) -> bytes:
            asked.append(sum(c for _, c in runs))
            return b"".join(mirror.track_digests(f, c) for f, c in runs)

        channel = FakeChannel()
        pair = make_pair(vol, bitmap, channel)
        await resync.copy_forward(FakeSystem(), pair, digests)  # type: ignore[arg-type]
        assert channel.pushed == [] and not bitmap
        assert sum(asked) == vol.tracks and max(asked) <= 100 and len(asked) <= vol.tracks // 80
        assert pair.progress is not None and pair.progress.done_tracks == vol.tracks
        # A local copy has no resync-done to flush its mirror: it flushes on its channel.
        local = make_pair(vol, TrackBitmap(vol.tracks, range(8)), FakeChannel(), copy_type="LOCAL")
        await resync.copy_forward(FakeSystem(), local, digests)  # type: ignore[arg-type]
        assert [p[3] for p in local.channel.pushed] == [True]  # type: ignore[union-attr]
    finally:
        mirror.close()
