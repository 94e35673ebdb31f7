"""A storage system: its volumes, its copy table and the write path.

Both daemons run one :class:`StorageSystem`.  Every write to a volume, from a
host (gRPC or NBD) or from a pair's mirror stream, goes through
:meth:`StorageSystem.write_ops`: pending bits for suspended pairs are made
durable first, the write is queued on the stream of every mirroring pair
that copies from this volume, applied locally, and acknowledged once the
mirrors applied it (sync).  Pair management lives in
:mod:`splitmirror.pairs`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from .clock import utc_now
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .names import check_name
from .pairstate.pair import Pair, PairEnd
from .status import MIRRORING, TRACKING, PairStatus
from .storage.bitmap import TrackBitmap
from .storage.copytable import CopyTable, VolumeRow
from .storage.intent import IntentLog
from .storage.ordering import RangeOrder
from .storage.scopes import replicated_scope
from .storage.volume import DEFAULT_TRACK_SIZE, Volume, validate_geometry

log = logging.getLogger("splitmirror.system")

@dataclasses.dataclass(frozen=True, slots=True)
class WriteOp:
    """One write: ``data`` at ``offset``, or ``zero_length`` zero bytes."""

    offset: int
    data: bytes = b""
    zero_length: int = 0

    @property
    def length(self) -> int:
        return self.zero_length or len(self.data)


class StorageSystem:
    """Volumes, pairs and the write path of one storage system."""

    def __init__(self, system_id: int, role: str, data_dir: Path) -> None:
        self.system_id = system_id
        self.role = role
        self.data_dir = data_dir
        self.volume_dir = data_dir / "volumes"
        self.table = CopyTable(data_dir / "copytable.sqlite")
        self.intent = IntentLog(self.table, before_clear=self.persist_bitmaps)
        self._dirty: set[tuple[str, str]] = set()  # (pair, volume) bitmaps changed since saved
        self.volumes: dict[str, Volume] = {}
        self.pairs: dict[str, Pair] = {}
        self.fences: dict[str, str] = {}
        self._order: dict[str, RangeOrder] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.clean_start = True
        self.nbd_port = 0
        #: Async pairs: bytes the queue may hold before the pair suspends.
        self.async_queue_bytes = 256 << 20
        #: Called (synchronously) when an async pair's queue would overflow.
        self.on_overflow: Callable[[Pair], None] | None = None

    # -- lifecycle ----------------------------------------------------------
    async def open(self) -> None:
        self.volume_dir.mkdir(parents=True, exist_ok=True)
        await self.table.open()
        self.clean_start = await self.table.get_meta("clean_shutdown") in (None, "1")
        await self.table.set_meta("clean_shutdown", "0")
        for vrow in await self.table.load_volumes():
            path = self._volume_path(vrow.name)
            vol = await asyncio.to_thread(Volume.open, vrow.name, path, vrow.size, vrow.track_size)
            self.volumes[vol.name] = vol
            self._order[vol.name] = RangeOrder()
        for prow in await self.table.load_pairs():
            pvol = self.volumes.get(prow.volume)
            if pvol is None:
                log.error("copy table row of pair %s names missing volume %s; row ignored", prow.name,
                          prow.volume)
                continue
            bitmap = await self.table.load_bitmap(prow.name, prow.volume, pvol.tracks)
            pair = self.pairs.setdefault(prow.name, Pair(prow.name))
            end = PairEnd(prow, pvol, bitmap)
            if prow.primary:
                pair.primary = end
            else:
                pair.mirror = end
        for key, reason in (await self.table.meta_items("fence:")).items():
            self.fences[key.removeprefix("fence:")] = reason
        log.info("system %d (%s): %d volumes, %d pairs loaded from %s (%s start)", self.system_id, self.role,
                 len(self.volumes), len(self.pairs), self.data_dir, "clean" if self.clean_start else "unclean")

    async def close(self) -> None:
        for pair in self.pairs.values():
            for end in pair.ends:
                await self.table.save_bitmap(end.row.name, end.row.volume, end.bitmap)
        await self.table.set_meta("clean_shutdown", "1")
        await self.table.close()
        for vol in self.volumes.values():
            vol.close()

    def _volume_path(self, name: str) -> Path:
        check_name("volume", name)
        path = (self.volume_dir / f"{name}.vol").resolve()
        if path.parent != self.volume_dir.resolve():  # confinement, belt and braces
            raise InvalidArgument(f"invalid volume name {name!r}")
        return path

    # -- volumes ------------------------------------------------------------
    def volume(self, name: str) -> Volume:
        try:
            return self.volumes[name]
        except KeyError:
            raise NotFound(f"volume {name!r} not found on system {self.system_id}") from None

    async def create_volume(self, name: str, size: int, track_size: int = 0) -> Volume:
        check_name("volume", name)
        track_size = track_size or DEFAULT_TRACK_SIZE
        validate_geometry(name, size, track_size)
        if name in self.volumes:
            raise AlreadyExists(f"volume {name!r} already exists on system {self.system_id}")
        path = self._volume_path(name)
        if path.exists():
            path.unlink()  # left over from a crash between file creation and table insert
        vol = await asyncio.to_thread(Volume.create, name, path, size, track_size)
        self.volumes[name] = vol
        self._order[name] = RangeOrder()
        await self.table.add_volume(VolumeRow(name, size, track_size, utc_now()))
        log.info("volume %s created: %d bytes, track size %d", name, size, track_size)
        return vol

    async def delete_volume(self, name: str) -> None:
        vol = self.volume(name)
        in_pairs = [p.name for p in self.pairs_of(vol)]
        if in_pairs:
            raise FailedPrecondition(
                f"volume {name!r} is in pair {', '.join(map(repr, in_pairs))}; delete the pair first")
        if self._order[name].busy:
            raise FailedPrecondition(f"volume {name!r} has I/O in progress")
        del self.volumes[name]
        del self._order[name]
        await self.table.remove_volume(name)
        vol.close()
        await asyncio.to_thread(vol.path.unlink, True)
        log.info("volume %s deleted", name)

    def pairs_of(self, vol: Volume) -> list[Pair]:
        return [p for p in self.pairs.values() if any(e.volume is vol for e in p.ends)]

    def pairs_from(self, vol: Volume) -> list[Pair]:
        """Pairs that copy from ``vol`` (it is their primary end here)."""
        return [p for p in self.pairs.values() if p.primary is not None and p.primary.volume is vol]

    def pair_into(self, vol: Volume) -> Pair | None:
        """The pair that copies into ``vol`` (it is its mirror end), if any."""
        for p in self.pairs.values():
            if p.mirror is not None and p.mirror.volume is vol:
                return p
        return None

    def role_of(self, vol: Volume) -> str:
        roles: list[str] = []
        into = self.pair_into(vol)
        if into is not None:
            roles.append("SPVOL" if into.remote else "SVOL")
        if self.pairs_from(vol):
            roles.append("PVOL")
        return "+".join(roles) or "SIMPLEX"

    def write_refusal(self, vol: Volume) -> str | None:
        """Why hosts may not write ``vol`` now, or None."""
        if vol.name in self.fences:
            return f"volume {vol.name!r} fenced for restore ({self.fences[vol.name]})"
        into = self.pair_into(vol)
        if into is not None:
            if not into.remote:
                return f"volume {vol.name!r} is the SVOL of pair {into.name!r} and read-only to hosts"
            if into.status in MIRRORING:
                return (f"volume {vol.name!r} is the SPVOL of pair {into.name!r} ({into.status.value}); "
                        "hosts may write it only while the pair is SPLIT or SUSPENDED")
        for p in self.pairs_from(vol):
            if p.status is PairStatus.COPY and p.row.direction == "reverse":
                return f"volume {vol.name!r} is the target of a reverse resync of pair {p.name!r}"
        return None

    async def fence(self, name: str, reason: str) -> None:
        """Refuse host I/O (gRPC and NBD, connected clients too) on a volume."""
        self.volume(name)
        self.fences[name] = reason
        await self.table.set_meta(f"fence:{name}", reason)
        await self.table.sync()
        log.warning("volume %s fenced: %s", name, reason)

    async def unfence(self, name: str) -> None:
        if self.fences.pop(name, None) is not None:
            await self.table.delete_meta(f"fence:{name}")
            await self.table.sync()
            log.info("volume %s unfenced", name)

    # -- host I/O -------------------------------------------------------------
    async def host_read(self, name: str, offset: int, length: int) -> bytes:
        vol = self.volume(name)
        vol.check_range(offset, length)
        if name in self.fences:
            raise FailedPrecondition(f"volume {name!r} fenced for restore ({self.fences[name]})")
        # Ordered against writes in flight: a read never sees half a batch.
        async with self._order[name].hold(offset, length):
            return await vol.read(offset, length)

    async def host_write(self, name: str, offset: int, data: bytes, fua: bool = False) -> None:
        vol = self.volume(name)
        vol.check_range(offset, len(data))
        self.check_host_writable(vol)
        await self.write_ops(vol, [WriteOp(offset, data)])
        if fua:
            await self.flush_volume(vol)

    async def host_write_zeroes(self, name: str, offset: int, length: int) -> None:
        vol = self.volume(name)
        vol.check_range(offset, length)
        self.check_host_writable(vol)
        await self.write_ops(vol, [WriteOp(offset, zero_length=length)])

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
        """Durable here and on every mirror end that receives this volume."""
        waits = [p.channel.push(0, flush=True) for p in self.pairs_from(vol)
                 if p.channel is not None and p.status in MIRRORING and p.row.direction == "forward"]
        await asyncio.gather(vol.flush(), self.table.sync())
        if waits:
            await asyncio.gather(*waits)

    # -- the write path -------------------------------------------------------
    async def write_ops(self, vol: Volume, ops: list[WriteOp], *, replicated: bool = False) -> None:
        """Apply ``ops`` in order to ``vol`` and to everything mirrored from it.

        ``replicated`` marks the writes a remote mirror end applies for its
        primary: their write-intent extents are kept apart from host writes.
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

    # -- copy table -----------------------------------------------------------
    async def save_rows(self, pair: Pair) -> None:
        """Persist status rows, durably: a status change is never lost."""
        for end in pair.ends:
            await self.table.save_pair(end.row)
        await self.table.sync()

    async def save_bitmaps(self, pair: Pair) -> None:
        for end in pair.ends:
            await self.table.save_bitmap(end.row.name, end.row.volume, end.bitmap)


def _call_release(release: Callable[[], None], _done: asyncio.Future[bool]) -> None:
    release()


def mark(bitmap: TrackBitmap, offset: int, length: int, track_size: int) -> tuple[int, int] | None:
    """Set the bits of a byte range; the track run to persist if any was new."""
    if bitmap.mark_bytes(offset, length, track_size) == 0:
        return None
    first = offset // track_size
    return first, (offset + length + track_size - 1) // track_size - first
