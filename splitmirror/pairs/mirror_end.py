"""The mirror end of a pair: what the primary system asks of the end copied into.

The interconnect's handlers for a pair whose mirror end this system holds
(a remote pair's SPVOL): attach a new pair, the pair commands the primary
end sends, applying the ordered write stream (backup markers included),
reading tracks back for a reverse copy, and per-track digests for verify.
A peer may only reach the pairs whose mirror end it drives.  Commands
issued here by a host for such a pair are refused: the primary drives it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

from ..datapath.copyengine import DIGEST_BYTES, read_tracks
from ..datapath.writes import WriteOp
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..names import check_name
from ..pairstate.pair import MODES, EndRole, Pair, PairEnd
from ..replication.framing import Frame, FramingError, SequenceCheck, frames_of
from ..replication.queue import BackupMarker
from ..status import MIRRORING, PairOp, PairStatus
from ..storage.bitmap import TrackBitmap
from ..storage.copytable import PairRow
from ..v1 import interconnect_pb2 as ic
from .context import PairContext
from .divergent import rolled_back_tracks, save_divergent
from .group_rollback import GroupRollback
from .membership import check_new_mirror, forget, initial_bitmap
from .verify import VERIFY_CHUNK

#: Entries one stream message may carry (a 64 MiB message of barriers is ~2M).
MAX_BATCH_ENTRIES = 1 << 18

#: Splits a backup generation where the stream reaches a backup marker.
MarkerHandler = Callable[[Pair, BackupMarker], Awaitable[None]]


def keeps_pre_images(pair: Pair) -> bool:
    """A mirror end whose writes a takeover may roll back to its group's common point."""
    row = pair.row
    return (pair.mirror is not None and row.mode == "async" and bool(row.group) and row.copy_type == "REMOTE"
            and row.status is PairStatus.DUPLEX)


class MirrorEnd:
    """The handlers of the pairs whose mirror end is here."""

    role = EndRole.MIRROR

    def __init__(self, context: PairContext, rollback: GroupRollback) -> None:
        self.context = context
        self.system = context.system
        self.rollback = rollback
        #: Set by the daemon's wiring to the backup procedure; without it a
        #: batch that carries a backup marker is refused.
        self.marker_handler: MarkerHandler | None = None

    # -- lookups --------------------------------------------------------------------------
    def pair_for(self, peer: int, name: str) -> Pair:
        """The pair ``name`` whose mirror end is here and whose primary is ``peer``."""
        pair = self.system.pairs.get(name)
        if pair is None or pair.mirror is None or pair.peer_id != peer:
            raise NotFound(f"pair {name!r} has no secondary end on system {self.system.system_id} "
                           f"for system {peer}")
        return pair

    def state(self, pair: Pair, with_bitmap: bool = False, allocated: bool = False) -> ic.MirrorState:
        assert pair.mirror is not None
        end = pair.mirror
        state = ic.MirrorState(pair=pair.name, status=pair.status.value, volume=end.volume.name,
                               pending_tracks=len(end.bitmap), size=end.volume.size,
                               track_size=end.volume.track_size, epoch=end.row.epoch, primary=False,
                               applied_seq=pair.applied_seq)
        if with_bitmap:
            state.pending_bitmap = end.bitmap.to_bytes()
        if allocated:
            state.allocated_bitmap = initial_bitmap(end.volume).to_bytes()
        return state

    # -- what the primary end asks ----------------------------------------------------------
    async def attach(self, peer: int, req: ic.AttachMirrorRequest) -> ic.MirrorState:
        check_name("pair", req.pair)
        check_name("volume", req.svol)
        check_name("volume", req.pvol)
        if req.group:
            check_name("consistency group", req.group)
        existing = self.system.pairs.get(req.pair)
        if existing is not None:
            owner = existing.peer_id if existing.mirror is not None else self.system.system_id
            raise AlreadyExists(f"pair {req.pair!r} already exists on system {self.system.system_id} "
                                f"(owned by system {owner})")
        svol = self.system.volumes.get(req.svol)
        if svol is None:
            svol = await self.system.create_volume(req.svol, req.size, req.track_size)
        else:
            check_new_mirror(self.system, svol, req.size, req.track_size)
        row = PairRow(req.pair, svol.name, "REMOTE", peer, req.pvol, False, PairStatus.SIMPLEX,
                      req.mode or "sync", req.group)
        pair = Pair(req.pair)
        pair.mirror = PairEnd(row, svol, TrackBitmap(svol.tracks))
        self.context.set_status(pair, PairOp.CREATE)
        self.system.pairs[req.pair] = pair
        await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)
        return self.state(pair, allocated=True)

    async def command(self, peer: int, req: ic.PairCommandRequest) -> ic.MirrorState:
        pair = self.pair_for(peer, req.pair)
        assert pair.mirror is not None
        op = req.op
        if op == ic.PAIR_OP_STATUS:
            return self.state(pair)
        if op in (ic.PAIR_OP_SPLIT, ic.PAIR_OP_RESYNC_BEGIN, ic.PAIR_OP_RESYNC_DONE, ic.PAIR_OP_DELETE,
                  ic.PAIR_OP_SET_MODE):
            # Out of (or back into) the group's order: nothing before this is to be rolled back.
            self.context.group_points.forget(pair.name)
        if op == ic.PAIR_OP_SPLIT:
            self.context.set_status(pair, PairOp.SPLIT)
            pair.mirror.row.split_time = req.split_time or pair.mirror.row.split_time
        elif op == ic.PAIR_OP_SUSPEND:
            self.context.set_status(pair, PairOp.FAULT, req.reason or "suspended by primary")
        elif op == ic.PAIR_OP_RESYNC_BEGIN:
            role = pair.mirror.row.role
            if role.fenced_by == peer and not req.reverse and not role.divergent:
                # Tracks the new primary rolled back to its group's point: our
                # acknowledged writes there, as much ours as the pending ones.
                pair.mirror.bitmap.update(rolled_back_tracks(pair, peer, req.keep_tracks))
            if role.fenced_by == peer and pair.mirror.bitmap and not req.reverse and not role.divergent:
                # An old primary's own writes since the takeover: kept aside first.
                await save_divergent(self.system, pair)
            if pair.status is PairStatus.DUPLEX:
                self.context.set_status(pair, PairOp.FAULT, "resync requested by primary")
            if pair.status is not PairStatus.COPY:
                self.context.set_status(pair, PairOp.RESYNC)
            pair.mirror.row.direction = "reverse" if req.reverse else "forward"
            await self.system.save_rows(pair)
            return self.state(pair, with_bitmap=True)
        elif op == ic.PAIR_OP_CLEAR_BITMAP:
            pair.mirror.bitmap.clear()
            await self.system.save_bitmaps(pair)
            return self.state(pair)
        elif op == ic.PAIR_OP_RESYNC_DONE:
            if pair.status is not PairStatus.DUPLEX:
                self.context.set_status(pair, PairOp.COPY_DONE)
            pair.mirror.row.direction = "forward"
            pair.mirror.row.role.fenced_by = 0  # mirrored again: an SPVOL like any other
            await self.system.volumes[pair.mirror.volume.name].flush()
        elif op == ic.PAIR_OP_DELETE:
            state = self.state(pair)
            await forget(self.system, pair)
            state.status = PairStatus.SIMPLEX.value
            return state
        elif op == ic.PAIR_OP_SET_MODE:
            if req.mode not in MODES:
                raise InvalidArgument(f"pair {pair.name!r}: unknown mode {req.mode!r}")
            pair.mirror.row.mode = req.mode
        else:
            raise InvalidArgument(f"pair {pair.name!r}: unknown pair command {op}")
        await self.system.save_rows(pair)
        return self.state(pair)

    async def apply(self, pair: Pair, batch: ic.ReplicateBatch, sequence: SequenceCheck) -> int:
        """Apply one message of the ordered stream to the mirror end, in order.

        Returns the sequence number of its last entry (0: none).  A message
        that does not parse, or whose entries break the stream's sequence
        or reach outside the volume, suspends the pair here: what came
        before the break is applied, nothing after it.
        """
        self.check_mirroring(pair)
        try:
            frames = frames_of(batch, MAX_BATCH_ENTRIES)
        except FramingError as exc:
            await self.refuse_stream(pair, f"malformed batch ({exc})")
        return await self.apply_frames(pair, frames, sequence)

    def check_mirroring(self, pair: Pair) -> None:
        if pair.mirror is None:  # taken over meanwhile
            raise FailedPrecondition(f"pair {pair.name!r} has no mirror end on system {self.system.system_id} any "
                                     "more; replicated writes are not accepted")
        if pair.status not in MIRRORING:
            # E.g. a batch delayed by a healed partition, arriving after this
            # end suspended itself: applying it would fake host writes here.
            raise FailedPrecondition(f"pair {pair.name!r} is {pair.status.value} on system "
                                     f"{self.system.system_id}; replicated writes are not accepted")

    async def apply_frames(self, pair: Pair, frames: list[Frame], sequence: SequenceCheck) -> int:
        """:meth:`apply` for entries already decoded (the data connection's batches)."""
        self.check_mirroring(pair)
        assert pair.mirror is not None
        vol = pair.mirror.volume
        good, why = len(frames), ""
        for i, f in enumerate(frames):
            why = sequence.accept(f.seq)
            if not why and f.length and f.marker is None and not f.flush \
                    and f.offset + f.length > vol.size:
                why = f"entry {f.seq} writes {f.length} bytes at {f.offset}, outside volume {vol.name!r} " \
                      f"({vol.size} bytes)"
            if why:
                good = i
                break
        async with self.rollback.batch(pair):
            await self._apply_frames(pair, frames[:good])
        if good:
            pair.applied_seq = frames[good - 1].seq
        if why:
            await self.refuse_stream(pair, why)
        return frames[-1].seq if frames else 0

    async def refuse_stream(self, pair: Pair, why: str) -> NoReturn:
        """Suspend the pair here and end the stream: nothing more is applied."""
        self.context.set_status(pair, PairOp.FAULT, "stream-refused")
        await self.system.save_rows(pair)
        raise InvalidArgument(f"pair {pair.name!r}: replication stream refused on system "
                              f"{self.system.system_id}: {why}; the pair is suspended")

    async def _apply_frames(self, pair: Pair, frames: list[Frame]) -> None:
        assert pair.mirror is not None
        vol = pair.mirror.volume
        group = pair.row.group
        keeping = keeps_pre_images(pair)
        ops: list[WriteOp] = []
        for e in frames:
            if e.cut is not None:
                if ops:
                    await self._write(pair, ops, keeping)
                    ops = []
                if group:
                    self.context.group_points.applied_cut(pair.name, group, e.cut, e.seq)
                continue
            if e.marker is not None:
                if ops:
                    await self._write(pair, ops, keeping)
                    ops = []
                await self._backup_point(pair, e.marker)
                continue
            if e.flush:
                if ops:
                    await self._write(pair, ops, keeping)
                    ops = []
                await self.system.flush_volume(vol)
                continue
            data = e.data
            length = e.length
            if not length:
                continue  # a barrier: acknowledged with the batch
            ops.append(WriteOp(e.offset, data, e.zero_length))
            self.system.bytes_received += len(data)
            if e.resync:
                pair.counters.resync_tracks_received += length // vol.track_size
                pair.counters.resync_bytes_received += len(data)
            else:
                pair.counters.replicated_writes += 1
                pair.counters.replicated_bytes += len(data)
        if ops:
            await self._write(pair, ops, keeping)

    async def _write(self, pair: Pair, ops: list[WriteOp], keeping: bool) -> None:
        """Apply replicated writes; an async group pair keeps what they replace first."""
        assert pair.mirror is not None
        vol = pair.mirror.volume
        points = self.context.group_points
        if keeping and points.room(pair.name, pair.row.group, sum(op.length for op in ops)):
            before = await vol.run(lambda: [vol.pread(op.offset, op.length) for op in ops])
            for op, image in zip(ops, before, strict=True):
                points.keep(pair.name, op.offset, image)
        await self.system.write_ops(vol, ops, replicated=True)

    async def _backup_point(self, pair: Pair, marker: BackupMarker) -> None:
        """Every write before the marker is applied: hand it to the backup procedure."""
        if self.marker_handler is None:
            raise FailedPrecondition(f"pair {pair.name!r}: system {self.system.system_id} cannot take the backup "
                                     f"{marker.marker!r} (no backup procedure)")
        await self.marker_handler(pair, marker)

    def read_tracks(self, peer: int, name: str, tracks: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
        pair = self.pair_for(peer, name)
        assert pair.mirror is not None
        try:
            TrackBitmap.from_bytes(pair.mirror.volume.tracks, tracks)
        except ValueError as exc:
            raise InvalidArgument(f"pair {name!r}: the track bitmap from system {peer} does not parse "
                                  f"({exc})") from None
        return read_tracks(self.system, pair, tracks)

    async def digests(self, peer: int, req: ic.TrackDigestsRequest) -> ic.TrackDigestsReply:
        pair = self.pair_for(peer, req.pair)
        assert pair.mirror is not None
        vol = pair.mirror.volume
        if req.tracks:
            runs = self._digest_runs(pair, peer, req.tracks)
            return ic.TrackDigestsReply(algorithm="xxh3-64", digests=await vol.run(
                lambda: b"".join(vol.track_digests(first, count) for first, count in runs)))
        if req.count == 0 or req.first_track + req.count > vol.tracks:
            raise InvalidArgument(f"pair {pair.name!r}: bad track range {req.first_track}+{req.count}")
        if req.count * vol.track_size > VERIFY_CHUNK:
            raise InvalidArgument(f"pair {pair.name!r}: {req.count} tracks of {vol.track_size} bytes exceed the "
                                  f"{VERIFY_CHUNK}-byte limit of one digest request")
        digests = await vol.verify_digests(req.first_track, req.count)
        return ic.TrackDigestsReply(algorithm="xxh3-64", digests=digests)

    @staticmethod
    def _digest_runs(pair: Pair, peer: int, tracks: bytes) -> list[tuple[int, int]]:
        """The runs of a track bitmap a peer asks digests of, within the limits."""
        assert pair.mirror is not None
        vol = pair.mirror.volume
        most = DIGEST_BYTES // vol.track_size
        try:
            bitmap = TrackBitmap.from_bytes(vol.tracks, tracks)
        except ValueError as exc:
            raise InvalidArgument(f"pair {pair.name!r}: the track bitmap from system {peer} does not parse "
                                  f"({exc})") from None
        if len(bitmap) > most:
            raise InvalidArgument(f"pair {pair.name!r}: digests of {len(bitmap)} tracks of {vol.track_size} bytes "
                                  f"asked at once; the limit is {most} ({DIGEST_BYTES} bytes)")
        runs = list(bitmap.runs())
        if sum(count for _, count in runs) != len(bitmap):  # runs() stops at the last track
            raise InvalidArgument(f"pair {pair.name!r}: the track bitmap from system {peer} goes beyond "
                                  f"volume {vol.name!r} ({vol.tracks} tracks)")
        return runs

    # -- commands a host issues here: the primary drives the pair ----------------------------
    @staticmethod
    def _refuse(pair: Pair, op: str) -> NoReturn:
        raise FailedPrecondition(
            f"pair {pair.name!r} is driven by its primary system {pair.peer_id}; issue {op} there")

    async def split(self, pair: Pair) -> Pair:
        self._refuse(pair, "split")

    async def resync(self, pair: Pair, reverse: bool, force: bool = False,
                     known: ic.MirrorState | None = None) -> Pair:
        self._refuse(pair, "resync")

    async def delete(self, pair: Pair) -> None:
        self._refuse(pair, "delete")

    async def set_mode(self, pair: Pair, mode: str) -> Pair:
        self._refuse(pair, "set-mode")

    async def verify(self, pair: Pair, repair: bool) -> tuple[int, list[int], bool]:
        self._refuse(pair, "verify")
