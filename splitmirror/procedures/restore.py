"""Restores from a backup generation, coordinated from the secondary.

Restore files (the restore agent on host B copies the files):

1. ``begin`` - the primary runs ``pre_restore_hook``, fences the PVOL (host
   I/O refused, connected NBD clients too) and splits the remote pair, so
   the SPVOL becomes writable at the secondary;
2. the agent mounts the SVOL read-only and the SPVOL read-write and copies;
3. ``finish`` - the primary resyncs the PVOL from the SPVOL by bitmap (the
   OR of both ends: what the copy wrote plus what the PVOL changed), then
   unfences and runs ``post_restore_hook``.

Restore volume does the same with a reverse resync SVOL -> SPVOL in place of
the copy; the generation is split again afterwards, so it keeps its backup.

The restore's phase is kept in the secondary's copy table and the fence in
the primary's: a restore cut short by a fault is resumed by the same command
(or undone by ``abort``), and ``pair display`` says the PVOL is fenced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc

from ..errors import DataLoss, FailedPrecondition, NotFound
from ..eventsink import RESTORE, Event, caused_by
from ..pairstate.pair import Pair
from ..replication.link import relay
from ..status import PairStatus
from ..v1 import host_pb2 as pb
from ..v1 import interconnect_pb2 as ic
from .backup import BackupManager
from .hooks import run_hook
from .operations import PairOperations
from .receipts import Receipts
from .verified_reads import VerifiedReads

log = logging.getLogger("splitmirror.restore")


class RestoreManager:
    def __init__(self, manager: PairOperations, backups: BackupManager, pre_hook: str = "",
                 post_hook: str = "") -> None:
        self.manager = manager
        self.backups = backups
        self.system = manager.system
        self.pre_hook = pre_hook
        self.post_hook = post_hook
        self._running: set[str] = set()
        #: Backup receipts: a generation failing verification is refused unless forced.
        self.receipts: Receipts | None = None
        #: Host reads of generations checked track by track (a file restore reads through them).
        self.reads: VerifiedReads | None = None

    # -- shared ---------------------------------------------------------------
    async def _state(self, pair: str) -> dict[str, str] | None:
        raw = await self.system.table.get_meta(f"restore:{pair}")
        return None if raw is None else dict(json.loads(raw))

    async def _save_state(self, pair: str, state: dict[str, str] | None) -> None:
        if state is None:
            await self.system.table.delete_meta(f"restore:{pair}")
        else:
            await self.system.table.set_meta(f"restore:{pair}", json.dumps(state))
        await self.system.table.sync()

    def _step(self, pair: Pair, op: str, generation: str = "", reason: str = "", tracks: int = 0,
              nbytes: int = 0) -> None:
        self.system.events.emit(Event(RESTORE, pair=pair.name, peer=pair.peer_id, generation=generation, op=op,
                                      reason=reason, tracks=tracks, bytes=nbytes))

    def describe(self, pair: str) -> str:
        """For ``pair display``: the restore in progress, if any."""
        return "restore in progress" if pair in self._running else ""

    # -- the secondary: what host B asks ------------------------------------------
    def _remote_mirror(self, name: str) -> Pair:
        pair = self.manager.pair(name)
        if not pair.remote or pair.mirror is None:
            raise FailedPrecondition(
                f"pair {name!r} has no SPVOL on system {self.system.system_id}; restores are issued at the "
                "secondary of a remote pair")
        return pair

    def _generation(self, pair: Pair, name: str) -> Pair:
        assert pair.mirror is not None
        gens = self.backups.generations(pair)
        gen = next((g for g in gens if g.name == name), None)
        if gen is None:
            known = ", ".join(g.name for g in gens) or "none"
            raise NotFound(f"generation {name!r} is not a backup generation of pair {pair.name!r} "
                           f"(generations: {known})")
        if gen.status is not PairStatus.SPLIT or not gen.row.backup_time:
            raise FailedPrecondition(
                f"generation {name!r} is {gen.status.value}{'' if gen.row.backup_time else ' and holds no backup'}; "
                "a restore reads a SPLIT generation holding a backup")
        return gen

    async def _control(self, pair: Pair, op: int, reason: str = "") -> ic.RestoreControlReply:
        link = self.manager.links.get(pair.peer_id)
        if link is None:
            raise FailedPrecondition(f"peer system {pair.peer_id} is not configured on system {self.system.system_id}")
        try:
            reply: ic.RestoreControlReply = await link.stub.RestoreControl(
                ic.RestoreControlRequest(pair=pair.name, op=op, reason=reason),  # type: ignore[arg-type]
                metadata=link.metadata)
            return reply
        except grpc.aio.AioRpcError as exc:
            raise relay(exc, pair.peer_id) from None

    def _claim(self, name: str) -> None:
        if name in self._running:
            raise FailedPrecondition(f"a restore of pair {name!r} is already running")
        self._running.add(name)

    async def _verified(self, generation: str, force: bool) -> None:
        if self.receipts is None:
            return
        refusal = await self.receipts.refusal(generation)
        if refusal and not force:
            raise FailedPrecondition(f"{refusal}; restore refused (--force restores it anyway)")
        if refusal:
            log.warning("%s; restoring anyway (forced)", refusal)

    async def _readable(self, gen: Pair, force: bool) -> None:
        """A file restore: the receipt of the backup is intact (its tracks are checked as they are read)."""
        if self.reads is None:
            await self._verified(gen.name, force)
            return
        try:
            await self.reads.receipt(gen)
        except DataLoss as exc:
            if not force:
                raise FailedPrecondition(f"{exc.message}; restore refused (--force restores it anyway)") from None
            log.warning("%s; restoring anyway (forced)", exc.message)

    def _unforce(self, state: dict[str, str] | None) -> None:
        if self.reads is not None and state is not None:
            self.reads.forced.discard(state["generation"])

    async def begin(self, name: str, generation: str, kind: str = "files", force: bool = False) -> pb.RestoreSession:
        pair = self._remote_mirror(name)
        gen = self._generation(pair, generation)
        if kind == "files":  # (a volume restore verified the whole generation before it began)
            await self._readable(gen, force)
        state = await self._state(name)
        if state is not None and state["generation"] != generation:
            raise FailedPrecondition(
                f"an interrupted restore of pair {name!r} from generation {state['generation']!r} is pending; "
                "run it again to finish it, or abort it")
        self._claim(name)
        try:
            resumed = state is not None
            self._step(pair, "begin", generation, f"{kind}{' (resumed)' if resumed else ''}")
            await self._save_state(name, {"generation": generation, "kind": kind, "phase": "fencing"})
            await self._control(pair, ic.RESTORE_OP_FENCE, f"restore of {kind} from {generation}")
            await self._save_state(name, {"generation": generation, "kind": kind, "phase": "fenced"})
        except BaseException:
            if state is None:
                await self._save_state(name, None)
            raise
        finally:
            self._running.discard(name)
        assert pair.mirror is not None and gen.mirror is not None
        if force and kind == "files" and self.reads is not None:
            self.reads.forced.add(generation)  # its reads go unchecked until the restore ends
            log.warning("restore of pair %s from generation %s forced: its tracks are read unchecked", name,
                        generation)
        log.info("restore of pair %s from generation %s: PVOL fenced, SPVOL %s writable%s", name, generation,
                 pair.mirror.volume.name, " (resumed)" if resumed else "")
        self._step(pair, "fenced", generation, f"PVOL fenced, SPVOL {pair.mirror.volume.name} writable")
        return pb.RestoreSession(pair=name, generation=generation, svol=gen.mirror.volume.name,
                                 spvol=pair.mirror.volume.name, phase="fenced", resumed=resumed)

    async def finish(self, name: str) -> pb.RestoreReport:
        pair = self._remote_mirror(name)
        state = await self._state(name)
        if state is None:
            raise FailedPrecondition(f"no restore of pair {name!r} is in progress")
        self._claim(name)
        try:
            started = time.monotonic()
            await self._save_state(name, {**state, "phase": "resyncing"})
            self._step(pair, "resyncing", state["generation"], "SPVOL -> PVOL")
            moved = await self._control(pair, ic.RESTORE_OP_RESYNC_REVERSE)
            done = await self._control(pair, ic.RESTORE_OP_UNFENCE)
            await self._save_state(name, None)
            self._unforce(state)
            self._step(pair, "done", state["generation"], done.warning, moved.tracks, moved.bytes)
        finally:
            self._running.discard(name)
        assert pair.mirror is not None
        vol = pair.mirror.volume
        log.info("restore of pair %s done: %d tracks (%d bytes) resynced to the PVOL", name, moved.tracks,
                 moved.bytes)
        return pb.RestoreReport(pair=name, generation=state["generation"], tracks_sent=moved.tracks,
                                bytes_sent=moved.bytes, volume_size=vol.size, track_size=vol.track_size,
                                seconds=time.monotonic() - started, warning=done.warning)

    async def abort(self, name: str) -> pb.RestoreReport:
        pair = self._remote_mirror(name)
        state = await self._state(name)
        if state is None and name not in self._running and pair.status is PairStatus.DUPLEX:
            # A restore fences and splits before it changes anything: DUPLEX with none recorded is nothing.
            raise FailedPrecondition(f"no restore of pair {name!r} is running or unfinished on system "
                                     f"{self.system.system_id}: nothing to abort")
        self._claim(name)
        try:
            reply = await self._control(pair, ic.RESTORE_OP_ABORT)
            await self._save_state(name, None)
            self._unforce(state)
            self._step(pair, "aborted", (state or {}).get("generation", ""), reply.warning)
        finally:
            self._running.discard(name)
        log.warning("restore of pair %s aborted; the PVOL was not changed", name)
        assert pair.mirror is not None
        return pb.RestoreReport(pair=name, generation=(state or {}).get("generation", ""),
                                volume_size=pair.mirror.volume.size, track_size=pair.mirror.volume.track_size,
                                warning=reply.warning)

    async def restore_volume(self, name: str, generation: str, force: bool = False) -> pb.RestoreReport:
        pair = self._remote_mirror(name)
        gen = self._generation(pair, generation)
        started = time.monotonic()
        await self._verified(generation, force)
        await self.begin(name, generation, kind="volume", force=True)
        self._claim(name)
        try:
            assert gen.primary is not None
            local = len(gen.primary.bitmap) + (len(gen.mirror.bitmap) if gen.mirror else 0)
            self._step(pair, "copying-generation", generation, f"SVOL -> SPVOL, {local} tracks", local)
            with caused_by(f"restore of pair {name}"):
                await self.manager.resync(gen.name, reverse=True)
                if gen.copy_task is not None:
                    await asyncio.shield(gen.copy_task)
                if not _duplex(gen):
                    raise FailedPrecondition(f"generation {gen.name!r} could not be copied back ({gen.status.value})")
                await self.manager.split(gen.name)  # keep the backup image in the generation
        finally:
            self._running.discard(name)
        report = await self.finish(name)
        report.local_tracks = local
        report.seconds = time.monotonic() - started
        return report

    # -- the primary: what the secondary asks ---------------------------------------
    async def control(self, peer: int, req: ic.RestoreControlRequest) -> ic.RestoreControlReply:
        pair = self.manager.pair(req.pair)
        if pair.primary is None or not pair.remote or pair.peer_id != peer:
            raise NotFound(f"pair {req.pair!r} has no PVOL on system {self.system.system_id} for system {peer}")
        with caused_by(f"restore of pair {pair.name}"):
            return await self._control_here(pair, req)

    async def _control_here(self, pair: Pair, req: ic.RestoreControlRequest) -> ic.RestoreControlReply:
        assert pair.primary is not None
        pvol = pair.primary.volume.name
        reply = ic.RestoreControlReply(pvol=pvol)
        if req.op == ic.RESTORE_OP_FENCE:
            if pvol not in self.system.fences:
                await run_hook(self.pre_hook, pair, "pre-restore", self.system.system_id)
                await self.system.fence(pvol, req.reason or "restore")
            if pair.status is PairStatus.DUPLEX:
                await self.manager.split(pair.name)
            elif pair.status is PairStatus.COPY:
                await self.system.unfence(pvol)
                raise FailedPrecondition(f"pair {pair.name!r} is copying; restore once it is DUPLEX")
        elif req.op == ic.RESTORE_OP_RESYNC_REVERSE:
            before = (pair.counters.resync_tracks_received, pair.counters.resync_bytes_received)
            await self._resync(pair, reverse=True)
            reply.tracks = pair.counters.resync_tracks_received - before[0]
            reply.bytes = pair.counters.resync_bytes_received - before[1]
        elif req.op == ic.RESTORE_OP_UNFENCE:
            await self.system.unfence(pvol)
            reply.warning = await run_hook(self.post_hook, pair, "post-restore", self.system.system_id, fatal=False)
        elif req.op == ic.RESTORE_OP_ABORT:
            await self._resync(pair, reverse=False)
            await self.system.unfence(pvol)
            reply.warning = await run_hook(self.post_hook, pair, "post-restore", self.system.system_id, fatal=False)
        else:
            raise FailedPrecondition(f"unknown restore operation {req.op}")
        return reply

    async def _resync(self, pair: Pair, reverse: bool) -> None:
        if pair.status is not PairStatus.DUPLEX:
            if pair.status is not PairStatus.COPY:
                await self.manager.resync(pair.name, reverse=reverse, force=True)
            if pair.copy_task is not None:
                await asyncio.shield(pair.copy_task)
        if not _duplex(pair):
            raise FailedPrecondition(f"pair {pair.name!r} did not return to DUPLEX ({pair.status.value}"
                                     f"{': ' + pair.row.reason if pair.row.reason else ''}); the PVOL stays fenced")


def _duplex(pair: Pair) -> bool:
    return pair.status is PairStatus.DUPLEX

