"""The write path of a storage system: host I/O and the writes mirror streams apply.

Every write to a volume, from a host (gRPC or NBD) or from a pair's mirror
stream, goes through :meth:`WritePath.write_ops`: the extent is recorded in
the write-intent log, pending bits for suspended pairs are set, the write is
queued on the stream of every mirroring pair that copies from this volume,
applied locally, and acknowledged once the mirrors applied it (sync).

:class:`WritePath` is the write pipeline part of
:class:`~splitmirror.datapath.system.StorageSystem`, which mixes it in and
owns the state it works on (volumes, pairs, fences, copy table, intent log).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Protocol

from ..errors import FailedPrecondition
from ..pairstate.index import PairIndex
from ..pairstate.pair import Pair
from ..status import MIRRORING, TRACKING
from ..storage.bitmap import TrackBitmap
from ..storage.copytable import CopyTable
from ..storage.intent import IntentLog
from ..storage.ordering import RangeOrder
from ..storage.scopes import replicated_scope
from ..storage.volume import Volume
from .groupcuts import GroupCuts


@dataclasses.dataclass(frozen=True, slots=True)
class WriteOp:
    """One write: ``data`` at ``offset``, or ``zero_length`` zero bytes."""

    offset: int
    data: bytes | memoryview = b""
    zero_length: int = 0

    @property
    def length(self) -> int:
        return self.zero_length or len(self.data)


class ReadCheck(Protocol):
    """Host reads that are checked before hosts see them (a backup generation's SVOL against its receipt)."""

    def covers(self, vol: Volume) -> bool:
        """Are reads of ``vol`` checked? Asked at every host read: cheap."""
        ...

    async def read(self, vol: Volume, offset: int, length: int) -> bytes:
        """The checked range; raises a :class:`~splitmirror.errors.SplitmirrorError` naming what failed."""
        ...


class WritePath(abc.ABC):
    """Host I/O, write ordering and tracking writes while split/suspended."""

    # The storage system's state this pipeline works on.
    table: CopyTable
    intent: IntentLog
    pairs: PairIndex
    fences: dict[str, str]
    _order: dict[str, RangeOrder]  # volume -> its write order
    _dirty: set[tuple[str, str]]   # (pair, volume) bitmaps changed since saved
    #: Async pairs: bytes the queue may hold before the pair suspends.
    async_queue_bytes: int
    #: Called (synchronously) when an async pair's queue would overflow.
    on_overflow: Callable[[Pair], None] | None
    #: Common points of the async consistency groups' write order.
    group_cuts: GroupCuts
    #: Checks host reads of some volumes (set by the procedures layer), or None.
    read_check: ReadCheck | None

    # The storage system's lookups this pipeline uses.
    @abc.abstractmethod
    def volume(self, name: str) -> Volume: ...

    @abc.abstractmethod
    def pairs_of(self, vol: Volume) -> list[Pair]: ...

    @abc.abstractmethod
    def pairs_from(self, vol: Volume) -> list[Pair]: ...

    @abc.abstractmethod
    def write_refusal(self, vol: Volume) -> str | None: ...

    # -- host I/O -------------------------------------------------------------
    async def host_read(self, name: str, offset: int, length: int) -> bytes:
        vol = self.volume(name)
        vol.check_range(offset, length)
        if name in self.fences:
            raise FailedPrecondition(f"volume {name!r} fenced for restore ({self.fences[name]})")
        # Ordered against writes in flight: a read never sees half a batch.
        async with self._order[name].hold(offset, length):
            check = self.read_check
            if check is not None and check.covers(vol):
                return await check.read(vol, offset, length)
            return await vol.read(offset, length)

    async def host_write(self, name: str, offset: int, data: bytes, fua: bool = False) -> None:
        vol = self.volume(name)
        vol.check_range(offset, len(data))
        self.check_host_writable(vol)
        await self.write_ops(vol, [WriteOp(offset, data)], host=True)
        if fua:
            await self.flush_volume(vol)

    async def host_write_zeroes(self, name: str, offset: int, length: int) -> None:
        vol = self.volume(name)
        vol.check_range(offset, length)
        self.check_host_writable(vol)
        await self.write_ops(vol, [WriteOp(offset, zero_length=length)], host=True)

    def check_host_writable(self, vol: Volume) -> None:
        refusal = self.write_refusal(vol)
        if refusal:
            raise FailedPrecondition(refusal)

    async def host_flush(self, name: str) -> None:
        vol = self.volume(name)
        if name in self.fences:
            raise FailedPrecondition(f"volume {name!r} fenced for restore ({self.fences[name]})")
        await self.flush_volume(vol)

    async def flush_volume(self, vol: Volume) -> None:
        """Durable here and on every sync mirror end that receives this volume.

        An async mirror end gets the flush in its stream (it makes everything
        before it durable there, in order) but the host does not wait for it:
        async promises local durability; the mirror's distance is the lag.
        """
        waits: list[asyncio.Future[bool]] = []
        for pair in self._mirroring(vol):
            assert pair.channel is not None
            if pair.row.mode == "async":
                pair.channel.flush_later()
            else:
                waits.append(pair.channel.push(0, flush=True))
        await asyncio.gather(vol.flush(), self.table.sync())
        if waits:
            await asyncio.gather(*waits)

    # -- the write path -------------------------------------------------------
    async def write_ops(self, vol: Volume, ops: list[WriteOp], *, replicated: bool = False,
                        host: bool = False) -> None:
        """Apply ``ops`` in order to ``vol`` and to everything mirrored from it.

        ``replicated`` marks the writes a remote mirror end applies for its
        primary: their write-intent extents are kept apart from host writes.
        ``host`` writes are checked again once ordered: a swap or a fence may
        have changed the volume's role while they waited.
        """
        start = min(op.offset for op in ops)
        end = max(op.offset + op.length for op in ops)
        length = end - start
        if not self.pairs_of(vol):
            async with self._order[vol.name].hold(start, length):
                await vol.apply([(op.offset, op.data, op.zero_length) for op in ops])
            return
        # The extent is durable in the write-intent log before any pending
        # bit is set in memory or any byte is mirrored: after a crash, its
        # tracks are where the ends may differ.
        scope = replicated_scope(vol.name) if replicated else vol.name
        async with self.intent.covering(scope, start, length):
            waits: list[asyncio.Future[bool]] = []
            async with self._order[vol.name].hold(start, length):
                if host:
                    self.check_host_writable(vol)
                payload = sum(len(op.data) for op in ops)
                for pair in self._mirroring(vol):
                    if pair.row.mode == "async" and self.on_overflow is not None \
                            and pair.queued_bytes() + payload > self.async_queue_bytes:
                        self.on_overflow(pair)  # the pair is SUSPENDED now: tracked below
                self._track(vol, ops)
                # No await from here to the pushes: the statuses seen are current.
                for pair in self._mirroring(vol):
                    assert pair.channel is not None
                    futs = [pair.channel.push(op.offset, op.data, zero_length=op.zero_length) for op in ops]
                    if pair.row.mode == "async":
                        # Acknowledged after the local write; the extent stays
                        # recorded until the mirror has applied the write.
                        release = self.intent.pin(scope, start, length)
                        futs[-1].add_done_callback(functools.partial(_call_release, release))
                        if pair.row.group:
                            self.group_cuts.touch(pair.row.group)
                    else:
                        waits.extend(futs)
                await vol.apply([(op.offset, op.data, op.zero_length) for op in ops])
            if waits:
                # False means the pair was suspended meanwhile and the tracks
                # are already marked pending: the write is safe either way.
                await asyncio.gather(*waits)

    def _mirroring(self, vol: Volume) -> list[Pair]:
        return [p for p in self.pairs_from(vol)
                if p.channel is not None and p.status in MIRRORING and p.row.direction == "forward"]

    def _track(self, vol: Volume, ops: Iterable[WriteOp]) -> None:
        """Mark pending bits of suspended pairs on either end of ``vol``.

        In memory only (no await, so no status change can slip between the
        check and the mark): the write-intent extent held around the write
        covers these tracks until the bitmap is persisted, which happens
        before the extent is cleared (see :meth:`persist_bitmaps`).
        """
        for pair in self.pairs_of(vol):
            if pair.status not in TRACKING:
                continue
            for end in pair.ends:
                if end.volume is vol and any([mark(end.bitmap, op.offset, op.length, vol.track_size)
                                              for op in ops]):
                    self._dirty.add((pair.name, vol.name))

    async def persist_bitmaps(self) -> None:
        """Save the bitmaps changed since the last save (before intent is cleared)."""
        dirty, self._dirty = self._dirty, set()
        for pair_name, volume in sorted(dirty):
            pair = self.pairs.get(pair_name)
            for end in pair.ends if pair else []:
                if end.volume.name == volume:
                    await self.table.save_bitmap(pair_name, volume, end.bitmap)

    def order(self, vol: Volume) -> RangeOrder:
        return self._order[vol.name]


def _call_release(release: Callable[[], None], _done: asyncio.Future[bool]) -> None:
    release()


def mark(bitmap: TrackBitmap, offset: int, length: int, track_size: int) -> tuple[int, int] | None:
    """Set the bits of a byte range; the track run to persist if any was new."""
    if bitmap.mark_bytes(offset, length, track_size) == 0:
        return None
    first = offset // track_size
    return first, (offset + length + track_size - 1) // track_size - first
