"""Pair management: create, split, resync and delete, at both ends.

:class:`PairManager` is the part of a storage system that talks to peers.
The primary end drives every status change (the state machine of
:mod:`splitmirror.status` decides whether it is allowed) and tells the mirror
end over the interconnect; the ``mirror_*`` methods are the mirror end's
side of those commands, used by the interconnect servicer for remote pairs
and called directly for local pairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc

from .backup import BackupManager
from .clock import utc_now
from .datapath.copyengine import CopyFailed, copy_forward, copy_reverse, read_tracks
from .datapath.local_channel import LocalChannel
from .datapath.system import StorageSystem
from .datapath.writes import WriteOp, mark
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SplitmirrorError,
    Unavailable,
)
from .names import check_name
from .pairstate.channel import RemoteChannel
from .pairstate.pair import Pair, PairEnd
from .replication.link import PeerLink, relay
from .replication.queue import Entry
from .replication.stream import ReplicationStream
from .restore import RestoreManager
from .status import MIRRORING, TRACKING, PairOp, PairStatus, transition
from .storage.bitmap import TrackBitmap
from .storage.copytable import PairRow
from .storage.scopes import parse_scope
from .storage.volume import Volume
from .v1 import interconnect_pb2 as ic

log = logging.getLogger("splitmirror.pairs")

ASYNC_LINGER = 0.002  # seconds an async pair's stream gathers writes into one batch
CHECKPOINT_SECONDS = 1.0  # how often a running copy saves its pending bitmap

MODES = ("sync", "async")
VERIFY_CHUNK = 64 << 20  # bytes compared per step (writes to it wait meanwhile)


@dataclasses.dataclass
class Settings:
    link_timeout: float = 5.0
    auto_resync: bool = True
    max_batch_bytes: int = 4 << 20
    async_queue_bytes: int = 256 << 20
    pre_restore_hook: str = ""
    post_restore_hook: str = ""


class PairManager:
    def __init__(self, system: StorageSystem, links: dict[int, PeerLink], settings: Settings) -> None:
        self.system = system
        self.links = links
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self.backups = BackupManager(self)
        self.restores = RestoreManager(self, settings.pre_restore_hook, settings.post_restore_hook)
        system.async_queue_bytes = settings.async_queue_bytes
        system.on_overflow = self._on_overflow

    # -- startup / shutdown -----------------------------------------------------
    async def start(self) -> None:
        """Wire loaded pairs to their channels; recover after an unclean stop."""
        if not self.system.clean_start:
            await self._recover_intent()
        for pair in self.system.pairs.values():
            if pair.primary is None:
                continue
            if pair.remote:
                link = self.links.get(pair.peer_id)
                if link is None:
                    log.error("pair %s: peer system %d is not configured; pair stays as it is", pair.name,
                              pair.peer_id)
                    continue
                self._attach_remote(pair, link)
            else:
                pair.channel = LocalChannel(self.system, pair)
                if pair.status is PairStatus.COPY:
                    self._start_copy(pair)
                elif pair.status is PairStatus.SUSPENDED and self.settings.auto_resync:
                    # No peer will come back to trigger it: resync right away.
                    self._spawn(self._auto_resync_local(pair), f"resync-{pair.name}")
        self.system.intent.start()

    async def stop(self) -> None:
        for pair in self.system.pairs.values():
            if pair.copy_task is not None:
                pair.copy_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pair in self.system.pairs.values():
            if pair.channel is not None:
                await pair.channel.close()
        await self.system.intent.stop()
        await self.system.intent.clear_idle(0)

    async def _recover_intent(self) -> None:
        """After an unclean stop: mark the tracks of hot write-intent extents pending.

        A copy source may have missed its mirror in any hot extent.  A remote
        mirror end that was tracking may have taken host writes whose bits
        were not saved, but only in extents its own (not replicated) writes
        made hot: a replicated write was either acknowledged, so the primary
        knows it, or not, so the primary marked it pending.  Marking those
        would fake host writes on the SPVOL, i.e. a split brain.
        """
        hot = await self.system.table.load_intent()
        for scope, extents in hot.items():
            volume, replicated = parse_scope(scope)
            vol = self.system.volumes.get(volume)
            if vol is None:
                continue
            runs = [(first, stop - first) for e in sorted(extents)
                    for first, stop in [self.system.intent.tracks_of(e, vol.track_size, vol.tracks)]]
            for pair in self.system.pairs_of(vol):
                ends = [e for e in pair.ends if e.volume is vol and
                        (e is pair.primary or (pair.remote and not replicated and pair.status in TRACKING))]
                for end in ends:
                    for first, count in runs:
                        end.bitmap.add_range(first, first + count)
                    await self.system.table.add_runs(pair.name, vol.name, runs)
                if pair.primary is not None and pair.primary.volume is vol and pair.status in MIRRORING:
                    self._set_status(pair, PairOp.FAULT, "crash-recovery")
                    await self.system.save_rows(pair)
                if ends:
                    log.warning("pair %s: unclean stop, %d write-intent extents (%d tracks) of %s marked pending",
                                pair.name, len(extents), sum(c for _, c in runs), vol.name)
        await self.system.table.remove_intent_all()

    def _attach_remote(self, pair: Pair, link: PeerLink) -> None:
        pair.link = link
        stream = ReplicationStream(pair.name, link, pair.counters,
                                   lambda lost, reason: self._on_stream_failure(pair, lost, reason),
                                   self.settings.max_batch_bytes)
        pair.channel = RemoteChannel(stream)
        self._set_batching(pair)

    @staticmethod
    def _set_batching(pair: Pair) -> None:
        """An async pair's stream gathers writes into batches; a sync pair's sends at once."""
        if isinstance(pair.channel, RemoteChannel):
            pair.channel.stream.linger = ASYNC_LINGER if pair.row.mode == "async" else 0.0

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lookups ----------------------------------------------------------------
    def pair(self, name: str) -> Pair:
        try:
            return self.system.pairs[name]
        except KeyError:
            raise NotFound(f"pair {name!r} not found on system {self.system.system_id}") from None

    def link(self, peer: int) -> PeerLink:
        try:
            return self.links[peer]
        except KeyError:
            raise NotFound(f"peer system {peer} is not configured on system {self.system.system_id}") from None

    def _primary_end(self, pair: Pair, op: str) -> PairEnd:
        if pair.primary is None:
            raise FailedPrecondition(
                f"pair {pair.name!r} is driven by its primary system {pair.peer_id}; issue {op} there")
        return pair.primary

    # -- status -----------------------------------------------------------------
    def _set_status(self, pair: Pair, op: PairOp, reason: str = "") -> bool:
        """Apply a transition to every end held here (in memory, no await)."""
        old = pair.status
        new = transition(pair.name, old, op)
        for end in pair.ends:
            end.row.status = new
            end.row.reason = reason if new is PairStatus.SUSPENDED else ""
            if op is PairOp.SPLIT:
                end.row.split_time = utc_now()
        if new is not old:
            log.info("pair %s: %s -> %s%s", pair.name, old.value, new.value, f" ({reason})" if reason else "")
        return new is not old

    # -- create -------------------------------------------------------------------
    async def create(self, name: str, pvol: str, svol: str, peer: int, mode: str, group: str) -> Pair:
        check_name("pair", name)
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
        link = self.link(peer)
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
        pair.primary = PairEnd(row, vol, self._initial_bitmap(vol))
        pair.primary.bitmap.update(TrackBitmap.from_bytes(vol.tracks, state.allocated_bitmap))
        self._set_status(pair, PairOp.CREATE)
        self.system.pairs[name] = pair
        self._attach_remote(pair, link)
        await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)
        log.info("pair %s created: %s -> system %d volume %s (%s), %d tracks to copy", name, vol.name, peer,
                 svol, mode, len(pair.primary.bitmap))
        self._start_copy(pair)
        return pair

    async def _create_local(self, name: str, vol: Volume, svol_name: str, mode: str, group: str) -> Pair:
        svol = self.system.volumes.get(svol_name)
        if svol is None:
            svol = await self.system.create_volume(svol_name, vol.size, vol.track_size)
        self._check_new_mirror(svol, vol.size, vol.track_size)
        if svol is vol:
            raise InvalidArgument(f"pair {name!r}: primary and secondary volume are both {vol.name!r}")
        sid = self.system.system_id
        pair = Pair(name)
        pair.primary = PairEnd(PairRow(name, vol.name, "LOCAL", sid, svol.name, True, PairStatus.SIMPLEX,
                                       mode, group), vol, self._initial_bitmap(vol))
        pair.mirror = PairEnd(PairRow(name, svol.name, "LOCAL", sid, vol.name, False, PairStatus.SIMPLEX,
                                      mode, group), svol, TrackBitmap(svol.tracks))
        pair.primary.bitmap.update(self._initial_bitmap(svol))
        self._set_status(pair, PairOp.CREATE)
        self.system.pairs[name] = pair
        pair.channel = LocalChannel(self.system, pair)
        await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)
        log.info("pair %s created: %s -> %s (local), %d tracks to copy", name, vol.name, svol.name,
                 len(pair.primary.bitmap))
        self._start_copy(pair)
        return pair

    def _check_new_mirror(self, svol: Volume, size: int, track_size: int) -> None:
        if svol.size != size or svol.track_size != track_size:
            raise FailedPrecondition(
                f"volume {svol.name!r} exists on system {self.system.system_id} with size {svol.size} and "
                f"track size {svol.track_size}; the pair needs size {size} and track size {track_size}")
        users = self.system.pairs_of(svol)
        if users:
            raise FailedPrecondition(
                f"volume {svol.name!r} is already in pair {users[0].name!r} on system {self.system.system_id}")

    def _initial_bitmap(self, vol: Volume) -> TrackBitmap:
        """Tracks holding data: only these need the initial copy."""
        bitmap = TrackBitmap(vol.tracks)
        ts = vol.track_size
        for offset, length in vol.allocated_ranges():
            bitmap.add_range(offset // ts, (offset + length + ts - 1) // ts)
        return bitmap

    # -- copy task ------------------------------------------------------------------
    def _start_copy(self, pair: Pair) -> None:
        if pair.copy_task is not None and not pair.copy_task.done():
            return
        pair.copy_task = asyncio.create_task(self._copy(pair), name=f"copy-{pair.name}")

    async def _copy(self, pair: Pair) -> None:
        assert pair.primary is not None
        reverse = pair.row.direction == "reverse"
        checkpoints = asyncio.create_task(self._checkpoint_copy(pair), name=f"checkpoint-{pair.name}")
        try:
            if reverse:
                await copy_reverse(self.system, pair, lambda tracks: self._track_source(pair, tracks))
            else:
                await copy_forward(self.system, pair)
            if pair.status is not PairStatus.COPY:
                return
            if pair.remote:
                await self._command(pair, ic.PAIR_OP_RESYNC_DONE)
            self._set_status(pair, PairOp.COPY_DONE)
            for end in pair.ends:
                end.row.direction = "forward"
            await self.system.save_rows(pair)
            await self.system.save_bitmaps(pair)
        except CopyFailed as exc:
            log.warning("%s; %d tracks still pending", exc, len(pair.primary.bitmap))
            await self.system.save_bitmaps(pair)
        except (grpc.aio.AioRpcError, SplitmirrorError) as exc:
            reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc.message
            log.warning("pair %s: copy interrupted: %s", pair.name, reason)
            if pair.status is PairStatus.COPY:
                self._set_status(pair, PairOp.FAULT, "copy-interrupted")
                await self.system.save_rows(pair)
            await self.system.save_bitmaps(pair)
        except asyncio.CancelledError:
            await asyncio.shield(self.system.save_bitmaps(pair))
            raise
        except Exception:
            log.exception("pair %s: copy failed", pair.name)
            if pair.status is PairStatus.COPY:
                self._set_status(pair, PairOp.FAULT, "copy-error")
                await self.system.save_rows(pair)
            await self.system.save_bitmaps(pair)
        finally:
            checkpoints.cancel()
            pair.progress = None if pair.status is not PairStatus.COPY else pair.progress

    async def _checkpoint_copy(self, pair: Pair) -> None:
        """Save the shrinking bitmap while a copy runs, so that a copy cut
        short by kill -9 resumes near where it stopped, not from its start.
        Bits are cleared only for acknowledged tracks, so what is saved
        always covers what is still to copy."""
        saved = -1
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            progress = pair.progress
            if progress is not None and progress.done_tracks != saved:
                saved = progress.done_tracks
                await self.system.save_bitmaps(pair)

    def _track_source(self, pair: Pair, tracks: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
        if not pair.remote:
            return read_tracks(self.system, pair, tracks)
        assert pair.link is not None
        link = pair.link

        async def remote() -> AsyncIterator[tuple[int, int, bytes]]:
            async for td in link.read_tracks(pair.name, tracks):
                yield td.track, td.count, td.data

        return remote()

    async def _command(self, pair: Pair, op: int, **fields: object) -> ic.MirrorState:
        assert pair.link is not None
        try:
            return await pair.link.command(ic.PairCommandRequest(pair=pair.name, op=op, **fields))  # type: ignore[arg-type]
        except grpc.aio.AioRpcError as exc:
            raise relay(exc, pair.peer_id) from None

    # -- split ------------------------------------------------------------------------
    async def split(self, name: str) -> Pair:
        pair = self.pair(name)
        self._primary_end(pair, "split")
        transition(pair.name, pair.status, PairOp.SPLIT)  # refuse early, nothing changed
        if pair.remote:
            assert pair.link is not None
            if not pair.link.up:
                raise Unavailable(f"pair {name!r}: peer system {pair.peer_id} is unreachable; cannot split")
        assert pair.channel is not None
        # From here on new writes are tracked; earlier ones drain to the mirror.
        self._set_status(pair, PairOp.SPLIT)
        await self.system.save_rows(pair)
        drained = await pair.channel.push(0, flush=True)
        if pair.remote:
            await self._command(pair, ic.PAIR_OP_SPLIT, split_time=pair.row.split_time or "")
        if not drained:
            log.warning("pair %s: split while the link failed; unsent writes are marked pending", name)
        return pair

    # -- resync -------------------------------------------------------------------------
    async def resync(self, name: str, reverse: bool, force: bool = False) -> Pair:
        pair = self.pair(name)
        end = self._primary_end(pair, "resync")
        transition(pair.name, pair.status, PairOp.RESYNC)  # refuse early
        if pair.copy_task is not None and not pair.copy_task.done():
            raise FailedPrecondition(f"pair {name!r} is still stopping its previous copy; retry")
        if pair.remote:
            assert pair.link is not None
            if not pair.link.up:
                raise Unavailable(f"pair {name!r}: peer system {pair.peer_id} is unreachable; cannot resync")
            if pair.status is PairStatus.SUSPENDED and not (reverse or force):
                await self._refuse_split_brain(pair)
            state = await self._command(pair, ic.PAIR_OP_RESYNC_BEGIN, reverse=reverse)
            end.bitmap.update(TrackBitmap.from_bytes(end.volume.tracks, state.pending_bitmap))
            await self.system.save_bitmaps(pair)
            await self._command(pair, ic.PAIR_OP_CLEAR_BITMAP)
        else:
            assert pair.mirror is not None
            end.bitmap.update(pair.mirror.bitmap)
            pair.mirror.bitmap.clear()
            await self.system.save_bitmaps(pair)
        self._set_status(pair, PairOp.RESYNC)
        for e in pair.ends:
            e.row.direction = "reverse" if reverse else "forward"
        await self.system.save_rows(pair)
        log.info("pair %s: %s resync of %d tracks", name, "reverse" if reverse else "forward", len(end.bitmap))
        self._start_copy(pair)
        return pair

    async def _refuse_split_brain(self, pair: Pair) -> None:
        """Both ends written while suspended: the operator picks the survivor."""
        assert pair.primary is not None
        mine = len(pair.primary.bitmap)
        theirs = (await self._command(pair, ic.PAIR_OP_STATUS)).pending_tracks
        if mine and theirs:
            sid = self.system.system_id
            raise FailedPrecondition(
                f"pair {pair.name!r} is split-brained: both ends were written while SUSPENDED "
                f"(system {sid}: {mine} tracks, system {pair.peer_id}: {theirs} tracks); "
                f"'pair resync --force' keeps system {sid}'s data, "
                f"'pair resync --reverse' keeps system {pair.peer_id}'s data")

    # -- mode ---------------------------------------------------------------------------
    async def set_mode(self, name: str, mode: str) -> Pair:
        if mode not in MODES:
            raise InvalidArgument(f"pair {name!r}: mode must be sync or async, not {mode!r}")
        pair = self.pair(name)
        self._primary_end(pair, "set-mode")
        if pair.row.mode == mode:
            return pair
        if pair.remote:
            await self._command(pair, ic.PAIR_OP_SET_MODE, mode=mode)
        old = pair.row.mode
        for end in pair.ends:
            end.row.mode = mode
        self._set_batching(pair)
        await self.system.save_rows(pair)
        log.info("pair %s: mode %s -> %s", name, old, mode)
        if mode == "sync" and pair.channel is not None and pair.status in MIRRORING:
            await pair.channel.push(0)  # drain: what was queued is applied now
        return pair

    def _on_overflow(self, pair: Pair) -> None:
        """An async queue is full: suspend now (no await), then clean up."""
        if self._set_status(pair, PairOp.FAULT, "queue-full"):
            self._spawn(self._after_overflow(pair), f"overflow-{pair.name}")

    async def _after_overflow(self, pair: Pair) -> None:
        await self.system.save_rows(pair)
        if isinstance(pair.channel, RemoteChannel):
            await pair.channel.stream.close()  # unacknowledged writes become pending bits
        if pair.remote:
            with contextlib.suppress(SplitmirrorError):
                await self._command(pair, ic.PAIR_OP_SUSPEND, reason="queue-full")
        if self.settings.auto_resync and pair.status is PairStatus.SUSPENDED:
            await asyncio.sleep(0.2)
            with contextlib.suppress(SplitmirrorError):
                await self.resync(pair.name, reverse=False)

    # -- verify ---------------------------------------------------------------------------
    async def verify(self, name: str, repair: bool) -> tuple[int, list[int], bool]:
        """Compare per-track digests of both ends; no data crosses."""
        pair = self.pair(name)
        end = self._primary_end(pair, "verify")
        if pair.status is not PairStatus.DUPLEX:
            raise FailedPrecondition(f"pair {name!r} is {pair.status.value}; verify compares a DUPLEX pair")
        assert pair.channel is not None
        vol = end.volume
        ts = vol.track_size
        chunk = max(1, VERIFY_CHUNK // ts)
        mismatches: list[int] = []
        for first in range(0, vol.tracks, chunk):
            count = min(chunk, vol.tracks - first)
            async with self.system.order(vol).hold(first * ts, count * ts):
                if not await pair.channel.push(0):  # barrier: earlier writes applied
                    raise Unavailable(f"pair {name!r}: the mirror became unreachable during verify")
                here = await vol.run(functools.partial(vol.track_digests, first, count))
                there = await self._mirror_digests(pair, first, count)
            mismatches.extend(first + i for i in range(count) if here[8 * i:8 * i + 8] != there[8 * i:8 * i + 8])
        log.info("pair %s: verify checked %d tracks, %d mismatching", name, vol.tracks, len(mismatches))
        repaired = False
        if repair and mismatches:
            for track in mismatches:
                end.bitmap.add(track)
            await self.system.save_bitmaps(pair)
            # Suspend and resync as one step: no automatic resync may slip in.
            busy, pair.reconciling = pair.reconciling, True
            try:
                if pair.status is PairStatus.DUPLEX:
                    self._set_status(pair, PairOp.FAULT, "verify-repair")
                    await self.system.save_rows(pair)
                    if pair.remote:
                        await self._command(pair, ic.PAIR_OP_SUSPEND, reason="verify-repair")
                await self.resync(name, reverse=False, force=True)
            finally:
                pair.reconciling = busy
            repaired = True
        return vol.tracks, mismatches, repaired

    async def _mirror_digests(self, pair: Pair, first: int, count: int) -> bytes:
        if not pair.remote:
            assert pair.mirror is not None
            mvol = pair.mirror.volume
            return await mvol.run(lambda: mvol.track_digests(first, count))
        assert pair.link is not None
        try:
            reply = await pair.link.stub.TrackDigests(
                ic.TrackDigestsRequest(pair=pair.name, first_track=first, count=count),
                metadata=pair.link.metadata, timeout=max(30.0, self.settings.link_timeout))
        except grpc.aio.AioRpcError as exc:
            raise relay(exc, pair.peer_id) from None
        return bytes(reply.digests)

    async def mirror_digests(self, peer: int, req: ic.TrackDigestsRequest) -> ic.TrackDigestsReply:
        pair = self._mirror_pair(peer, req.pair)
        assert pair.mirror is not None
        vol = pair.mirror.volume
        if req.count == 0 or req.first_track + req.count > vol.tracks or req.count > (VERIFY_CHUNK // 4096):
            raise InvalidArgument(f"pair {pair.name!r}: bad track range {req.first_track}+{req.count}")
        digests = await vol.run(lambda: vol.track_digests(req.first_track, req.count))
        return ic.TrackDigestsReply(algorithm="xxh3-64", digests=digests)

    # -- delete ---------------------------------------------------------------------------
    async def delete(self, name: str) -> None:
        pair = self.pair(name)
        self._primary_end(pair, "delete")
        transition(pair.name, pair.status, PairOp.DELETE)
        if pair.copy_task is not None:
            pair.copy_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pair.copy_task
        if pair.remote:
            try:
                await self._command(pair, ic.PAIR_OP_DELETE)
            except Unavailable:
                log.warning("pair %s: peer system %d unreachable; deleting the local row only", name,
                            pair.peer_id)
        await self._forget(pair)

    async def _forget(self, pair: Pair) -> None:
        if pair.channel is not None:
            channel, pair.channel = pair.channel, None
            await channel.close()
        for end in pair.ends:
            end.row.status = PairStatus.SIMPLEX
            await self.system.table.remove_pair(end.row.name, end.row.volume)
        self.system.pairs.pop(pair.name, None)
        log.info("pair %s deleted", pair.name)

    # -- faults -----------------------------------------------------------------------------
    async def _on_stream_failure(self, pair: Pair, lost: list[Entry], reason: str) -> None:
        # No await before the status change: writes arriving from now on are
        # tracked instead of queued.
        changed = pair.status in MIRRORING and self._set_status(pair, PairOp.FAULT, reason)
        assert pair.primary is not None
        end = pair.primary
        ts = end.volume.track_size
        runs = [r for e in lost if not e.flush and e.length
                for r in [mark(end.bitmap, e.offset, e.length, ts)] if r]
        if runs:
            await self.system.table.add_runs(pair.name, end.volume.name, runs)
        if changed:
            if pair.link is not None:
                pair.link.suspect(reason)
            await self.system.save_rows(pair)

    async def _auto_resync_local(self, pair: Pair) -> None:
        try:
            await self.resync(pair.name, reverse=False)
        except SplitmirrorError as exc:
            log.warning("pair %s: automatic resync failed: %s", pair.name, exc.message)

    async def on_peer_down(self, link: PeerLink) -> None:
        for pair in list(self.system.pairs.values()):
            if not pair.remote or pair.peer_id != link.peer_id or pair.status not in MIRRORING:
                continue
            self._set_status(pair, PairOp.FAULT, link.reason or "peer-down")
            await self.system.save_rows(pair)
            if pair.primary is not None and isinstance(pair.channel, RemoteChannel):
                await pair.channel.stream.close()

    async def on_peer_up(self, link: PeerLink) -> None:
        for pair in self.pairs_with(link.peer_id):
            if pair.primary is not None and not pair.reconciling:
                pair.reconciling = True
                await self._reconcile_once(pair)

    def on_hello(self, link: PeerLink, reply: ic.HelloReply) -> None:
        """Every keepalive answer: catch a mirror end that suspended itself
        while we saw no fault (it lost us briefly), and retry automatic
        resyncs that failed while the link stayed up."""
        peer_status = {state.pair: state.status for state in reply.mirrors}
        now = time.monotonic()
        for pair in self.pairs_with(link.peer_id):
            if pair.primary is None or pair.reconciling:
                continue
            if pair.status is PairStatus.DUPLEX:
                pair.retry.reset()
                stale = peer_status.get(pair.name) == PairStatus.SUSPENDED.value
            else:
                stale = (pair.status is PairStatus.SUSPENDED and self.settings.auto_resync
                         and (pair.copy_task is None or pair.copy_task.done()) and pair.retry.due(now))
            if stale:
                pair.reconciling = True
                self._spawn(self._reconcile_once(pair), f"reconcile-{pair.name}")

    async def _reconcile_once(self, pair: Pair) -> None:
        try:
            await self._reconcile(pair)
        except SplitmirrorError as exc:
            log.warning("pair %s: reconnect handling failed: %s", pair.name, exc.message)
        finally:
            pair.reconciling = False
            if pair.status is PairStatus.SUSPENDED:
                pair.retry.failed(time.monotonic(), self.settings.link_timeout)

    async def _reconcile(self, pair: Pair) -> None:
        """After a reconnect: bring both ends back to agreement."""
        state = await self._command(pair, ic.PAIR_OP_STATUS)
        remote = PairStatus(state.status)
        if pair.status is PairStatus.DUPLEX and remote is PairStatus.DUPLEX:
            return
        if pair.status is PairStatus.COPY:
            if remote is not PairStatus.COPY:
                await self._command(pair, ic.PAIR_OP_RESYNC_BEGIN, reverse=pair.row.direction == "reverse")
            self._start_copy(pair)
            return
        if pair.status is PairStatus.SPLIT:
            if remote in MIRRORING:  # a split the peer never heard of (crash)
                await self._command(pair, ic.PAIR_OP_SPLIT, split_time=pair.row.split_time or "")
            return
        quiet = pair.status is PairStatus.DUPLEX and state.pending_tracks == 0
        if pair.status is PairStatus.DUPLEX:
            self._set_status(pair, PairOp.FAULT, f"peer {pair.peer_id} was {remote.value}")
            await self.system.save_rows(pair)
        if pair.status is PairStatus.SUSPENDED and (quiet or self.settings.auto_resync):
            log.info("pair %s: peer %d back, resyncing automatically", pair.name, pair.peer_id)
            try:
                await self.resync(pair.name, reverse=False)
            except FailedPrecondition as exc:
                log.warning("%s; not resyncing automatically", exc.message)

    # -- the mirror end's side --------------------------------------------------------------
    def _mirror_pair(self, peer: int, name: str) -> Pair:
        pair = self.system.pairs.get(name)
        if pair is None or pair.mirror is None or pair.peer_id != peer:
            raise NotFound(f"pair {name!r} has no secondary end on system {self.system.system_id} "
                           f"for system {peer}")
        return pair

    def _mirror_state(self, pair: Pair, with_bitmap: bool = False, allocated: bool = False) -> ic.MirrorState:
        assert pair.mirror is not None
        end = pair.mirror
        state = ic.MirrorState(pair=pair.name, status=pair.status.value, volume=end.volume.name,
                               pending_tracks=len(end.bitmap), size=end.volume.size,
                               track_size=end.volume.track_size)
        if with_bitmap:
            state.pending_bitmap = end.bitmap.to_bytes()
        if allocated:
            state.allocated_bitmap = self._initial_bitmap(end.volume).to_bytes()
        return state

    async def mirror_attach(self, peer: int, req: ic.AttachMirrorRequest) -> ic.MirrorState:
        check_name("pair", req.pair)
        check_name("volume", req.svol)
        existing = self.system.pairs.get(req.pair)
        if existing is not None:
            owner = existing.peer_id if existing.mirror is not None else self.system.system_id
            raise AlreadyExists(f"pair {req.pair!r} already exists on system {self.system.system_id} "
                                f"(owned by system {owner})")
        svol = self.system.volumes.get(req.svol)
        if svol is None:
            svol = await self.system.create_volume(req.svol, req.size, req.track_size)
        else:
            self._check_new_mirror(svol, req.size, req.track_size)
        row = PairRow(req.pair, svol.name, "REMOTE", peer, req.pvol, False, PairStatus.SIMPLEX,
                      req.mode or "sync", req.group)
        pair = Pair(req.pair)
        pair.mirror = PairEnd(row, svol, TrackBitmap(svol.tracks))
        self._set_status(pair, PairOp.CREATE)
        self.system.pairs[req.pair] = pair
        await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)
        return self._mirror_state(pair, allocated=True)

    async def mirror_command(self, peer: int, req: ic.PairCommandRequest) -> ic.MirrorState:
        pair = self._mirror_pair(peer, req.pair)
        assert pair.mirror is not None
        op = req.op
        if op == ic.PAIR_OP_STATUS:
            return self._mirror_state(pair)
        if op == ic.PAIR_OP_SPLIT:
            self._set_status(pair, PairOp.SPLIT)
            pair.mirror.row.split_time = req.split_time or pair.mirror.row.split_time
        elif op == ic.PAIR_OP_SUSPEND:
            self._set_status(pair, PairOp.FAULT, req.reason or "suspended by primary")
        elif op == ic.PAIR_OP_RESYNC_BEGIN:
            if pair.status is PairStatus.DUPLEX:
                self._set_status(pair, PairOp.FAULT, "resync requested by primary")
            if pair.status is not PairStatus.COPY:
                self._set_status(pair, PairOp.RESYNC)
            pair.mirror.row.direction = "reverse" if req.reverse else "forward"
            await self.system.save_rows(pair)
            return self._mirror_state(pair, with_bitmap=True)
        elif op == ic.PAIR_OP_CLEAR_BITMAP:
            pair.mirror.bitmap.clear()
            await self.system.save_bitmaps(pair)
            return self._mirror_state(pair)
        elif op == ic.PAIR_OP_RESYNC_DONE:
            if pair.status is not PairStatus.DUPLEX:
                self._set_status(pair, PairOp.COPY_DONE)
            pair.mirror.row.direction = "forward"
            await self.system.volumes[pair.mirror.volume.name].flush()
        elif op == ic.PAIR_OP_DELETE:
            state = self._mirror_state(pair)
            await self._forget(pair)
            state.status = PairStatus.SIMPLEX.value
            return state
        elif op == ic.PAIR_OP_SET_MODE:
            if req.mode not in MODES:
                raise InvalidArgument(f"pair {pair.name!r}: unknown mode {req.mode!r}")
            pair.mirror.row.mode = req.mode
        else:
            raise InvalidArgument(f"pair {pair.name!r}: unknown pair command {op}")
        await self.system.save_rows(pair)
        return self._mirror_state(pair)

    async def mirror_apply(self, pair: Pair, entries: list[ic.WriteEntry]) -> None:
        """Apply a batch of the ordered stream to the mirror end, in order."""
        assert pair.mirror is not None
        if pair.status not in MIRRORING:
            # E.g. a batch delayed by a healed partition, arriving after this
            # end suspended itself: applying it would fake host writes here.
            raise FailedPrecondition(f"pair {pair.name!r} is {pair.status.value} on system "
                                     f"{self.system.system_id}; replicated writes are not accepted")
        vol = pair.mirror.volume
        ops: list[WriteOp] = []
        for e in entries:
            if e.backup_marker:
                if ops:
                    await self.system.write_ops(vol, ops, replicated=True)
                    ops = []
                await self.backups.apply_marker(pair, e)
                continue
            if e.flush:
                if ops:
                    await self.system.write_ops(vol, ops, replicated=True)
                    ops = []
                await self.system.flush_volume(vol)
                continue
            data = e.data  # each access to a bytes field copies it: once only
            length = e.zero_length or len(data)
            if not length:
                continue  # a barrier: acknowledged with the batch
            vol.check_range(e.offset, length)
            ops.append(WriteOp(e.offset, data, e.zero_length))
            self.system.bytes_received += len(data)
            if e.resync:
                pair.counters.resync_tracks_received += length // vol.track_size
                pair.counters.resync_bytes_received += len(data)
            else:
                pair.counters.replicated_writes += 1
                pair.counters.replicated_bytes += len(data)
        if ops:
            await self.system.write_ops(vol, ops, replicated=True)

    def mirror_read_tracks(self, peer: int, name: str, tracks: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
        pair = self._mirror_pair(peer, name)
        assert pair.mirror is not None
        try:
            TrackBitmap.from_bytes(pair.mirror.volume.tracks, tracks)
        except ValueError as exc:
            raise InvalidArgument(f"pair {name!r}: the track bitmap from system {peer} does not parse "
                                  f"({exc})") from None
        return read_tracks(self.system, pair, tracks)

    def pairs_with(self, peer: int) -> list[Pair]:
        return [p for p in self.system.pairs.values() if p.remote and p.peer_id == peer]

