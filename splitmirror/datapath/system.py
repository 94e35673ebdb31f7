"""A storage system: its volumes, its pairs, fences and the copy table.

Both daemons run one :class:`StorageSystem`.  It holds the volumes and the
pairs loaded from the copy table, fences, and what each volume is to hosts
(its role, whether they may write it).  The write path that every write
goes through is :mod:`splitmirror.datapath.writes`, mixed in here; pair
management lives in :mod:`splitmirror.pairs`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
from pathlib import Path

from ..clock import utc_now
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..eventsink import FENCE, UNFENCE, DiscardEvents, Event, EventSink
from ..names import check_name
from ..pairstate.index import PairIndex
from ..pairstate.pair import Pair, PairEnd, spvol_refusal
from ..status import PairStatus
from ..storage.copytable import CopyTable, VolumeRow
from ..storage.intent import IntentLog
from ..storage.ordering import RangeOrder
from ..storage.volume import DEFAULT_TRACK_SIZE, Volume, validate_geometry
from .groupcuts import GroupCuts
from .writes import WritePath

log = logging.getLogger("splitmirror.system")


class StorageSystem(WritePath):
    """Volumes, pairs and (through :class:`WritePath`) the write path of one storage system."""

    def __init__(self, system_id: int, role: str, data_dir: Path) -> None:
        self.system_id = system_id
        self.role = role
        self.data_dir = data_dir
        self.volume_dir = data_dir / "volumes"
        self.table = CopyTable(data_dir / "copytable.sqlite")
        self.intent = IntentLog(self.table, before_clear=self.persist_bitmaps)
        self._dirty = set()
        self.volumes: dict[str, Volume] = {}
        #: Pair name -> pair, indexed by volume and by peer (lookups per write cost
        #: the pairs of the volume written, not every pair of the system).
        self.pairs = PairIndex()
        self.group_cuts = GroupCuts(self.pairs)
        self.fences = {}
        self._order = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        #: Interconnect calls received, by (calling peer, method): the metrics show them.
        self.calls_received: collections.Counter[tuple[int, str]] = collections.Counter()
        self.clean_start = True
        self.nbd_port = 0
        self.metrics_port = 0
        self.async_queue_bytes = 256 << 20
        self.on_overflow = None
        self.read_check = None
        #: Where status changes, copies, fences... are reported (the daemon's event log).
        self.events: EventSink = DiscardEvents()

    # -- lifecycle ----------------------------------------------------------
    async def open(self) -> None:
        self.volume_dir.mkdir(parents=True, exist_ok=True)
        await self.table.open()
        self.clean_start = await self.table.get_meta("clean_shutdown") in (None, "1")
        try:
            await self._load()
        except BaseException:
            # Nothing was written: the data stays as it was found (a clean
            # stop stays clean, and the next start does not resync everything).
            for vol in self.volumes.values():
                vol.close()
            self.volumes.clear()
            await self.table.close()
            raise
        # From here on writes may happen before a clean stop records them.
        await self.table.set_meta("clean_shutdown", "0")
        log.info("system %d (%s): %d volumes, %d pairs loaded from %s (%s start)", self.system_id, self.role,
                 len(self.volumes), len(self.pairs), self.data_dir, "clean" if self.clean_start else "unclean")

    async def _load(self) -> None:
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
        try:
            vol = await asyncio.to_thread(Volume.create, name, path, size, track_size)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise InvalidArgument(f"volume {name!r}: size {size} is larger than the file system of "
                                      f"{self.volume_dir} can hold") from None
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"volume {name!r}: no space left in {self.volume_dir}") from None
            raise
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
        """Pairs holding an end on ``vol`` (from the index: no walk over every pair)."""
        return [p for p in self.pairs.of_volume(vol.name) if any(e.volume is vol for e in p.ends)]

    def pairs_from(self, vol: Volume) -> list[Pair]:
        """Pairs that copy from ``vol`` (it is their primary end here)."""
        return [p for p in self.pairs.of_volume(vol.name) if p.primary is not None and p.primary.volume is vol]

    def pair_into(self, vol: Volume) -> Pair | None:
        """The pair that copies into ``vol`` (it is its mirror end), if any."""
        for p in self.pairs.of_volume(vol.name):
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
            refusal = spvol_refusal(vol, into)
            if refusal:
                return refusal
        for p in self.pairs_from(vol):
            if p.hold_writes:
                return f"volume {vol.name!r}: {p.hold_writes}"
            if p.status is PairStatus.COPY and p.row.direction == "reverse":
                return f"volume {vol.name!r} is the target of a reverse resync of pair {p.name!r}"
        return None

    async def fence(self, name: str, reason: str) -> None:
        """Refuse host I/O (gRPC and NBD, connected clients too) on a volume."""
        self.volume(name)
        self.fences[name] = reason
        await self.table.set_meta(f"fence:{name}", reason)
        await self.table.sync()
        self.events.emit(Event(FENCE, volume=name, reason=reason))
        log.warning("volume %s fenced: %s", name, reason)

    async def unfence(self, name: str) -> None:
        if self.fences.pop(name, None) is not None:
            await self.table.delete_meta(f"fence:{name}")
            await self.table.sync()
            self.events.emit(Event(UNFENCE, volume=name))
            log.info("volume %s unfenced", name)

    # -- copy table -----------------------------------------------------------
    async def save_rows(self, pair: Pair) -> None:
        """Persist status rows, durably: a status change is never lost."""
        await self.save_rows_of([pair])

    async def save_rows_of(self, pairs: list[Pair]) -> None:
        """Persist the status rows of many pairs: one transaction, one sync."""
        await self.table.save_pairs([end.row for pair in pairs for end in pair.ends])
        await self.table.sync()

    async def save_bitmaps(self, pair: Pair) -> None:
        await asyncio.gather(*(self.table.save_bitmap(end.row.name, end.row.volume, end.bitmap) for end in pair.ends))
