"""The primary end of a pair: the commands issued where a pair is driven from.

Create, split, resync, delete, set-mode and verify of the pairs whose
primary end this system holds (a remote pair's PVOL or SPVOL copying on;
both ends of a local pair).  The primary end drives every status change
(the state machine of :mod:`splitmirror.status` decides whether it is
allowed) and tells the mirror end over the interconnect;
:mod:`splitmirror.pairs.mirror_end` is the other side of those commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from ..datapath.local_channel import LocalChannel
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from ..eventsink import SPLIT_BRAIN, Event
from ..names import check_name
from ..pairstate.channel import RemoteChannel
from ..pairstate.pair import MODES, EndRole, Pair, PairEnd
from ..replication.link import PeerLink, relay
from ..replication.queue import Entry
from ..replication.stream import ReplicationStream
from ..status import MIRRORING, PairOp, PairStatus, transition
from ..storage.bitmap import TrackBitmap
from ..storage.copytable import PairRow
from ..storage.volume import Volume
from ..v1 import interconnect_pb2 as ic
from .context import PairContext
from .copying import Copier
from .membership import check_new_mirror, forget, initial_bitmap
from .peer import command
from .verify import Verifier

log = logging.getLogger("splitmirror.pairs")

#: What to do with the entries a broken replication stream hands back.
StreamFailureHandler = Callable[[Pair, list[Entry], str], Awaitable[None]]


class PrimaryEnd:
    """The commands of the pairs whose primary end is here."""

    role = EndRole.PRIMARY

    def __init__(self, context: PairContext, copier: Copier, verifier: Verifier,
                 on_stream_failure: StreamFailureHandler) -> None:
        self.context = context
        self.system = context.system
        self.settings = context.settings
        self.copier = copier
        self.verifier = verifier
        self.on_stream_failure = on_stream_failure

    @staticmethod
    def _end(pair: Pair) -> PairEnd:
        assert pair.primary is not None  # the manager sends this module only pairs it holds the primary end of
        return pair.primary

    # -- create -------------------------------------------------------------------
    async def create(self, name: str, pvol: str, svol: str, peer: int, mode: str, group: str) -> Pair:
        check_name("pair", name)
        if group:
            check_name("consistency group", group)
        if mode not in MODES:
            raise InvalidArgument(f"pair {name!r}: mode must be sync or async, not {mode!r}")
        if name in self.system.pairs:
            raise AlreadyExists(f"pair {name!r} already exists on system {self.system.system_id}")
        vol = self.system.volume(pvol)
        if self.system.pair_into(vol) is not None and not self.system.pair_into(vol).remote:  # type: ignore[union-attr]
            raise FailedPrecondition(f"volume {pvol!r} is an SVOL and cannot be the primary of a pair")
        if peer and peer == self.system.system_id:
            peer = 0
        if peer:
            return await self._create_remote(name, vol, svol, peer, mode, group)
        return await self._create_local(name, vol, svol, mode, group)

    async def _create_remote(self, name: str, vol: Volume, svol: str, peer: int, mode: str, group: str) -> Pair:
        link = self.context.link(peer)
        check_name("volume", svol)
        try:
            state = await link.stub.AttachMirror(
                ic.AttachMirrorRequest(pair=name, pvol=vol.name, svol=svol, size=vol.size,
                                       track_size=vol.track_size, mode=mode, group=group),
                metadata=link.metadata, timeout=max(self.settings.link_timeout, 10.0))
        except grpc.aio.AioRpcError as exc:
            raise relay(exc, peer) from None
        row = PairRow(name, vol.name, "REMOTE", peer, svol, True, PairStatus.SIMPLEX, mode, group)
        pair = Pair(name)
        pair.primary = PairEnd(row, vol, initial_bitmap(vol))
        pair.primary.bitmap.update(TrackBitmap.from_bytes(vol.tracks, state.allocated_bitmap))
        self.context.set_status(pair, PairOp.CREATE)
        self.system.pairs[name] = pair
        self.attach_remote(pair, link)
        await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)
        log.info("pair %s created: %s -> system %d volume %s (%s), %d tracks to copy", name, vol.name, peer,
                 svol, mode, len(pair.primary.bitmap))
        self.copier.start(pair)
        return pair

    async def _create_local(self, name: str, vol: Volume, svol_name: str, mode: str, group: str) -> Pair:
        svol = self.system.volumes.get(svol_name)
        if svol is None:
            svol = await self.system.create_volume(svol_name, vol.size, vol.track_size)
        check_new_mirror(self.system, svol, vol.size, vol.track_size)
        if svol is vol:
            raise InvalidArgument(f"pair {name!r}: primary and secondary volume are both {vol.name!r}")
        sid = self.system.system_id
        pair = Pair(name)
        pair.primary = PairEnd(PairRow(name, vol.name, "LOCAL", sid, svol.name, True, PairStatus.SIMPLEX,
                                       mode, group), vol, initial_bitmap(vol))
        pair.mirror = PairEnd(PairRow(name, svol.name, "LOCAL", sid, vol.name, False, PairStatus.SIMPLEX,
                                      mode, group), svol, TrackBitmap(svol.tracks))
        pair.primary.bitmap.update(initial_bitmap(svol))
        self.context.set_status(pair, PairOp.CREATE)
        self.system.pairs[name] = pair
        pair.channel = LocalChannel(self.system, pair)
        await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)
        log.info("pair %s created: %s -> %s (local), %d tracks to copy", name, vol.name, svol.name,
                 len(pair.primary.bitmap))
        self.copier.start(pair)
        return pair

    # -- the stream to a remote mirror end ------------------------------------------------
    def attach_remote(self, pair: Pair, link: PeerLink) -> None:
        pair.link = link
        stream = ReplicationStream(pair.name, link, pair.counters,
                                   lambda lost, reason: self.on_stream_failure(pair, lost, reason),
                                   self.settings.max_batch_bytes)
        pair.channel = RemoteChannel(stream)

    # -- split ------------------------------------------------------------------------
    async def split(self, pair: Pair) -> Pair:
        name = pair.name
        transition(pair.name, pair.status, PairOp.SPLIT)  # refuse early, nothing changed
        if pair.remote:
            assert pair.link is not None
            if not pair.link.up:
                raise Unavailable(f"pair {name!r}: peer system {pair.peer_id} is unreachable; cannot split")
        assert pair.channel is not None
        # From here on new writes are tracked; earlier ones drain to the mirror.
        self.context.set_status(pair, PairOp.SPLIT)
        await self.system.save_rows(pair)
        drained = await pair.channel.push(0, flush=True)
        if pair.remote:
            await command(pair, ic.PAIR_OP_SPLIT, split_time=pair.row.split_time or "")
        if not drained:
            log.warning("pair %s: split while the link failed; unsent writes are marked pending", name)
        return pair

    # -- resync -------------------------------------------------------------------------
    async def resync(self, pair: Pair, reverse: bool, force: bool = False,
                     known: ic.MirrorState | None = None) -> Pair:
        """Resync by bitmap; ``known``: the mirror end's state, asked just now
        (the split-brain check then needs no call of its own)."""
        name = pair.name
        end = self._end(pair)
        transition(pair.name, pair.status, PairOp.RESYNC)  # refuse early
        if pair.copy_task is not None and not pair.copy_task.done():
            raise FailedPrecondition(f"pair {name!r} is still stopping its previous copy; retry")
        if pair.remote:
            assert pair.link is not None
            if not pair.link.up:
                raise Unavailable(f"pair {name!r}: peer system {pair.peer_id} is unreachable; cannot resync")
            if pair.status is PairStatus.SUSPENDED and not (reverse or force):
                await self._refuse_split_brain(pair, known)
            state = await command(pair, ic.PAIR_OP_RESYNC_BEGIN, reverse=reverse,
                                  keep_tracks=self._rolled_back(pair, end.volume.tracks))
            end.bitmap.update(TrackBitmap.from_bytes(end.volume.tracks, state.pending_bitmap))
            await self.system.save_bitmaps(pair)
            await command(pair, ic.PAIR_OP_CLEAR_BITMAP)
        else:
            assert pair.mirror is not None
            end.bitmap.update(pair.mirror.bitmap)
            pair.mirror.bitmap.clear()
            await self.system.save_bitmaps(pair)
        self.context.set_status(pair, PairOp.RESYNC)
        for e in pair.ends:
            e.row.direction = "reverse" if reverse else "forward"
        await self.system.save_rows(pair)
        log.info("pair %s: %s resync of %d tracks", name, "reverse" if reverse else "forward", len(end.bitmap))
        self.copier.start(pair)
        return pair

    @staticmethod
    def _rolled_back(pair: Pair, size: int) -> bytes:
        """Tracks this end rolled back to its group's point at its takeover (the old primary keeps its versions)."""
        role = pair.row.role
        if role.how != "takeover" or not role.undone_runs:
            return b""
        tracks = TrackBitmap(size)
        for first, count in role.undone_runs:
            tracks.add_range(first, min(size, first + count))
        return tracks.to_bytes()

    async def _refuse_split_brain(self, pair: Pair, known: ic.MirrorState | None = None) -> None:
        """Both ends written while suspended: the operator picks the survivor."""
        assert pair.primary is not None
        mine = len(pair.primary.bitmap)
        theirs = (known or await command(pair, ic.PAIR_OP_STATUS)).pending_tracks
        if mine and theirs:
            sid = self.system.system_id
            self.system.events.emit(Event(
                SPLIT_BRAIN, pair=pair.name, volume=pair.primary.volume.name, peer=pair.peer_id,
                status=pair.status.value, reason="both ends written while SUSPENDED", tracks=mine + theirs,
                detail=f"system {sid}: {mine} tracks, system {pair.peer_id}: {theirs} tracks"))
            raise FailedPrecondition(
                f"pair {pair.name!r} is split-brained: both ends were written while SUSPENDED "
                f"(system {sid}: {mine} tracks, system {pair.peer_id}: {theirs} tracks); "
                f"'pair resync --force' keeps system {sid}'s data, "
                f"'pair resync --reverse' keeps system {pair.peer_id}'s data")

    # -- mode ---------------------------------------------------------------------------
    async def set_mode(self, pair: Pair, mode: str) -> Pair:
        name = pair.name
        if pair.row.mode == mode:
            return pair
        if pair.remote:
            await command(pair, ic.PAIR_OP_SET_MODE, mode=mode)
        old = pair.row.mode
        for end in pair.ends:
            end.row.mode = mode
        await self.system.save_rows(pair)
        log.info("pair %s: mode %s -> %s", name, old, mode)
        if mode == "sync" and pair.channel is not None and pair.status in MIRRORING:
            await pair.channel.push(0)  # drain: what was queued is applied now
        return pair

    # -- delete ---------------------------------------------------------------------------
    async def delete(self, pair: Pair) -> None:
        name = pair.name
        transition(pair.name, pair.status, PairOp.DELETE)
        if pair.copy_task is not None:
            pair.copy_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pair.copy_task
        if pair.remote:
            try:
                await command(pair, ic.PAIR_OP_DELETE)
            except Unavailable:
                log.warning("pair %s: peer system %d unreachable; deleting the local row only", name,
                            pair.peer_id)
        await forget(self.system, pair)

    # -- verify ---------------------------------------------------------------------------
    async def verify(self, pair: Pair, repair: bool) -> tuple[int, list[int], bool]:
        return await self.verifier.verify(pair, repair)
