"""Point-in-time backups at the remote site without leaving DUPLEX.

A backup generation is a local pair at the secondary whose primary end is
the SPVOL of a remote pair (a cascade: PVOL -> SPVOL -> SVOL).  A backup:

1. *prepare* (at the secondary): pick the generation (the named one, or the
   ring's oldest), and bring it to DUPLEX by a bitmap resync from the SPVOL;
2. *mark* (at the primary): push a backup marker on the remote pair's
   ordered write stream - for a consistency group on every pair's stream in
   one step of the event loop, i.e. at one single point of the write order;
3. *split* (at the secondary): when the stream reaches the marker, every
   write before it has been applied to the SPVOL and to the generation, so
   splitting the generation right there freezes exactly the image as of the
   marker; later writes flow on and are tracked in the generation's bitmap.

Hosts are never held: the marker is one more entry in the stream, and the
remote pair stays DUPLEX (sync) or streaming (async) throughout.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from ..clock import utc_now
from ..errors import FailedPrecondition, InvalidArgument, NotFound, SplitmirrorError, Unavailable
from ..eventsink import BACKUP, Event, caused_by
from ..names import check_name
from ..pairstate.pair import Pair
from ..replication.link import relay
from ..replication.queue import BackupMarker
from ..status import PairOp, PairStatus
from ..v1 import host_pb2 as pb
from ..v1 import interconnect_pb2 as ic
from .hooks import BackupHooks, run_command
from .operations import PairOperations

log = logging.getLogger("splitmirror.backup")

#: Meta key prefix of a consistency group's newest backup time (at the primary).
GROUP_BACKUP_KEY = "group-backup:"
#: Most generations a ring may name.
MAX_RING = 64


def check_ring(ring: Sequence[str]) -> None:
    """A ring of generations from a client: bounded, each a valid name."""
    if len(ring) > MAX_RING:
        raise InvalidArgument(f"a ring names {len(ring)} generations; at most {MAX_RING} are allowed")
    for name in ring:
        check_name("generation", name)


class BackupCancelled(FailedPrecondition):
    """A failing or timed-out pre-backup hook cancelled the backup."""

    result = "cancelled"


class BackupManager:
    def __init__(self, manager: PairOperations) -> None:
        self.manager = manager
        self.system = manager.system
        #: The daemon's --pre-backup-hook/--post-backup-hook (a schedule may give its own).
        self.hooks = BackupHooks()
        #: mirror end: generations being checked (not reused meanwhile), newest check of each.
        self.checking: set[str] = set()
        self.checks: dict[str, dict[str, Any]] = {}
        self.check_failures = 0  # since the daemon started (a metric)
        #: mirror end: host reads of a generation refused against its receipt since the start: (count, newest why).
        self.read_refusals: dict[str, tuple[int, str]] = {}
        #: mirror end: a generation was split (take its receipt); wait for that before reusing it.
        self.on_split: Callable[[Pair], None] | None = None
        self.before_reuse: Callable[[str], Awaitable[None]] | None = None
        #: mirror end: marker id -> outcome (and the SVOL flush in progress)
        self._outcomes: dict[str, ic.FinishBackupReply] = {}
        self._flushes: dict[str, asyncio.Task[None]] = {}
        #: primary: consistency group -> time of its newest backup (kept in the copy table's meta)
        self.group_backups: dict[str, str] = {}

    async def load(self) -> None:
        """Read the newest backup time of each consistency group."""
        saved = await self.system.table.meta_items(GROUP_BACKUP_KEY)
        self.group_backups = {key.removeprefix(GROUP_BACKUP_KEY): value for key, value in saved.items()}

    def emit(self, pair: Pair, op: str, generation: str = "", reason: str = "", detail: str = "") -> None:
        self.system.events.emit(Event(BACKUP, pair=pair.name, peer=pair.peer_id, generation=generation, op=op,
                                      reason=reason, detail=detail))

    # -- the secondary's side ---------------------------------------------------
    def generations(self, pair: Pair) -> list[Pair]:
        """Local pairs that copy from the mirror end (SPVOL) of ``pair``."""
        assert pair.mirror is not None
        gens = [p for p in self.system.pairs_from(pair.mirror.volume) if not p.remote]
        return sorted(gens, key=lambda p: p.name)

    def _ring_next(self, gens: list[Pair]) -> Pair:
        """Never-used generations first, then the one whose backup is oldest."""
        return min(gens, key=lambda p: (p.row.backup_time is not None, p.row.backup_time or "", p.name))

    async def prepare(self, peer: int, req: ic.PrepareBackupRequest) -> ic.PrepareBackupReply:
        pair = self.manager.mirror_pair(peer, req.pair)
        gens = self.generations(pair)
        assert pair.mirror is not None
        spvol = pair.mirror.volume.name
        sid = self.system.system_id
        if not gens:
            raise FailedPrecondition(
                f"pair {pair.name!r} has no backup generation on system {sid}: create local pairs from "
                f"SPVOL {spvol!r} there (splitmirror pair create GEN --pvol {spvol} --svol SVOL)")
        if req.ring and not req.generation:
            check_ring(req.ring)
            ring = set(req.ring)
            mine = [g for g in gens if g.name in ring]
            if not mine:
                raise FailedPrecondition(
                    f"none of the ring's generations ({', '.join(sorted(ring))}) is a generation of pair "
                    f"{pair.name!r} on system {sid} (its generations: {', '.join(g.name for g in gens)})")
            gens = mine
        if not req.generation and len(gens) > 1:
            gens = [g for g in gens if g.name not in self.checking] or gens
        if req.generation:
            chosen = next((g for g in gens if g.name == req.generation), None)
            if chosen is None:
                names = ", ".join(g.name for g in gens)
                raise NotFound(f"generation {req.generation!r} is not a local pair of SPVOL {spvol!r} on "
                               f"system {sid} (generations: {names})")
        else:
            chosen = self._ring_next(gens)
        if chosen.name in self.checking:
            raise FailedPrecondition(f"generation {chosen.name!r} is being checked (backup check); try again once "
                                     "the check is done")
        resynced = 0
        if not req.choose_only:
            with caused_by(f"backup of pair {pair.name}"):
                resynced = await self._bring_to_duplex(chosen)
        assert chosen.mirror is not None
        return ic.PrepareBackupReply(generation=chosen.name, svol=chosen.mirror.volume.name,
                                     resynced_tracks=resynced)

    async def _bring_to_duplex(self, gen: Pair) -> int:
        """Resync a generation from the SPVOL by bitmap; returns tracks copied."""
        assert gen.primary is not None
        if self.before_reuse is not None:
            await self.before_reuse(gen.name)
        if gen.status is PairStatus.DUPLEX:
            return 0
        pending = len(gen.primary.bitmap) + (len(gen.mirror.bitmap) if gen.mirror else 0)
        if gen.status in (PairStatus.SPLIT, PairStatus.SUSPENDED):
            log.info("generation %s: resyncing %d tracks before the backup", gen.name, pending)
            await self.manager.resync(gen.name, reverse=False)
        # The generation no longer holds its old backup from here on.
        for end in gen.ends:
            end.row.backup_time = None
        await self.system.save_rows(gen)
        if gen.copy_task is not None:
            await asyncio.shield(gen.copy_task)
        if not _duplex(gen):  # re-read: the copy task changed it
            raise FailedPrecondition(f"generation {gen.name!r} could not be brought in sync ({gen.status.value}"
                                     f"{': ' + gen.row.reason if gen.row.reason else ''})")
        return pending

    async def apply_marker(self, pair: Pair, marker: BackupMarker) -> None:
        """Split the generation here: everything before the marker is applied."""
        gen = self.system.pairs.get(marker.generation)
        outcome = ic.FinishBackupReply(known=True, generation=marker.generation)
        self._outcomes[marker.marker] = outcome
        if gen is None or gen.remote or gen.primary is None or pair.mirror is None \
                or gen.primary.volume is not pair.mirror.volume:
            outcome.error = f"generation {marker.generation!r} is not a local pair of pair {pair.name!r}"
        elif gen.status is not PairStatus.DUPLEX:
            outcome.error = (f"generation {gen.name!r} is {gen.status.value}, not DUPLEX, when the backup point "
                             "arrived; the previous generations are untouched")
        if outcome.error:
            log.warning("backup of pair %s failed: %s", pair.name, outcome.error)
            self.emit(pair, "failed", marker.generation, outcome.error)
            return
        assert gen is not None
        # No await before: the next entry is tracked.
        self.manager.set_status(gen, PairOp.SPLIT, f"backup of pair {pair.name}")
        for end in gen.ends:
            end.row.split_time = marker.backup_time
            end.row.backup_time = marker.backup_time
            end.row.backup_seq += 1
        for end in pair.ends:  # the remote pair's newest backup, as at its primary
            end.row.backup_time = marker.backup_time
        outcome.done = True
        outcome.backup_time = marker.backup_time
        outcome.sequence = gen.row.backup_seq
        log.info("backup of pair %s taken in generation %s (#%d) at %s", pair.name, gen.name, outcome.sequence,
                 marker.backup_time)
        self.emit(pair, "taken", gen.name, detail=f"#{outcome.sequence} at {marker.backup_time}")
        # Persist and make the SVOL durable without holding the stream.
        self._flushes[marker.marker] = asyncio.create_task(self._settle(gen, pair))

    async def _settle(self, gen: Pair, pair: Pair) -> None:
        await self.system.save_rows(gen)
        await self.system.save_rows(pair)
        if gen.mirror is not None:
            await gen.mirror.volume.flush()
            if self.on_split is not None:
                self.on_split(gen)

    async def finish(self, peer: int, req: ic.FinishBackupRequest) -> ic.FinishBackupReply:
        self.manager.mirror_pair(peer, req.pair)
        flush = self._flushes.pop(req.marker, None)
        if flush is not None:
            await flush
        outcome = self._outcomes.pop(req.marker, None)
        return outcome if outcome is not None else ic.FinishBackupReply(known=False)

    def list_local(self, pair: Pair) -> list[ic.GenerationInfo]:
        infos = []
        for gen in self.generations(pair):
            assert gen.primary is not None and gen.mirror is not None
            infos.append(ic.GenerationInfo(
                local_pair=gen.name, svol=gen.mirror.volume.name, status=gen.status.value,
                backup_time=gen.row.backup_time or "",
                changed_tracks=len(gen.primary.bitmap) if gen.row.backup_time else 0,
                sequence=gen.row.backup_seq, **self.check_fields(gen)))
        return infos

    def check_fields(self, gen: Pair) -> dict[str, Any]:
        """The newest check of the backup the generation holds now (none for an older backup)."""
        record = self.checks.get(gen.name)
        if record is None or record.get("sequence") != gen.row.backup_seq or not gen.row.backup_time \
                or record.get("backup_time") != gen.row.backup_time:
            return {}
        return {"check_verdict": record["verdict"], "check_time": record["time"],
                "check_seconds": record["seconds"], "check_reason": record["reason"]}

    async def list_generations(self, peer: int, req: ic.ListGenerationsRequest) -> ic.ListGenerationsReply:
        pair = self.manager.mirror_pair(peer, req.pair)
        return ic.ListGenerationsReply(generations=self.list_local(pair))

    # -- the primary's side ---------------------------------------------------------
    def targets(self, name: str, group: str) -> list[Pair]:
        if bool(name) == bool(group):
            raise InvalidArgument("name a remote pair or a consistency group (--group), not both")
        if name:
            pairs = [self.manager.pair(name)]
        else:
            pairs = [p for _, p in sorted(self.system.pairs.items())
                     if p.primary is not None and p.remote and p.row.group == group]
            if not pairs:
                raise NotFound(f"consistency group {group!r} has no remote pair on system {self.system.system_id}")
        for pair in pairs:
            if pair.primary is None or not pair.remote:
                raise FailedPrecondition(
                    f"pair {pair.name!r} is not a remote pair whose primary is on system {self.system.system_id}; "
                    "backups are issued at the primary of a remote pair")
        return pairs

    def check_ready(self, pairs: list[Pair]) -> None:
        for pair in pairs:
            if pair.status is not PairStatus.DUPLEX:
                raise FailedPrecondition(
                    f"pair {pair.name!r} is {pair.status.value}; a backup needs the remote pair DUPLEX")
            assert pair.link is not None
            if not pair.link.up:
                raise Unavailable(f"pair {pair.name!r}: peer system {pair.peer_id} is unreachable; no backup taken")

    async def peer_rpc(self, pair: Pair, method: str, request: object, timeout: float | None) -> object:
        """Call the peer system of ``pair`` (errors relayed as this system's)."""
        return await self._rpc(pair, method, request, timeout)

    async def _rpc(self, pair: Pair, method: str, request: object, timeout: float | None) -> object:
        assert pair.link is not None
        try:
            return await getattr(pair.link.stub, method)(request, metadata=pair.link.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise relay(exc, pair.peer_id) from None

    async def backup(self, name: str, group: str, generation: str, wait: bool, ring: Sequence[str] = (),
                     hooks: BackupHooks | None = None, schedule: str = "") -> pb.BackupReply:
        pairs = self.targets(name, group)
        if generation and len(pairs) > 1:
            raise InvalidArgument("--generation names one local pair; a group backup picks each pair's oldest")
        check_ring(ring)
        self.check_ready(pairs)
        busy = [p.name for p in pairs if p.backup_running]
        if busy:
            raise FailedPrecondition(f"a backup of pair {busy[0]!r} is already running")
        hooks = hooks if hooks is not None else self.hooks
        env = {"SPLITMIRROR_PAIR": ",".join(p.name for p in pairs), "SPLITMIRROR_GROUP": group,
               "SPLITMIRROR_SCHEDULE": schedule, "SPLITMIRROR_SYSTEM_ID": str(self.system.system_id),
               "SPLITMIRROR_VOLUME": ",".join(p.primary.volume.name for p in pairs if p.primary is not None)}
        started = time.monotonic()
        for pair in pairs:
            pair.backup_running = True
        outcome = ("failed", "")
        warning = ""
        try:
            try:
                results, prepare_seconds, completion = await _fix_point(self, pairs, group, generation, ring, hooks,
                                                                             env, started)
                outcome = ("point-fixed", "")
            except SplitmirrorError as exc:
                outcome = (getattr(exc, "result", "failed"), exc.message)
                raise
            finally:
                if hooks.post:
                    env.update(SPLITMIRROR_PHASE="post-backup", SPLITMIRROR_BACKUP_RESULT=outcome[0],
                               SPLITMIRROR_BACKUP_ERROR=outcome[1])
                    problem = await run_command(hooks.post, env, hooks.timeout, "post-backup hook")
                    if problem:
                        log.error("backup of %s: %s", env["SPLITMIRROR_PAIR"], problem)
                        for pair in pairs:
                            self.emit(pair, "hook-failed", env.get("SPLITMIRROR_GENERATION", ""), problem)
                        warning = problem
            if wait:
                await completion
            else:
                completion.add_done_callback(_log_outcome)
            # Built now: the completion updates the results' state.
            return pb.BackupReply(backups=results, latency_seconds=time.monotonic() - started,
                                  prepare_seconds=prepare_seconds, warning=warning)
        finally:
            for pair in pairs:
                pair.backup_running = False

    async def list_backups(self, name: str) -> pb.GenerationList:
        pair = self.manager.pair(name)
        if pair.mirror is not None and pair.remote:
            infos = self.list_local(pair)
        elif pair.primary is not None and pair.remote:
            reply = await self._rpc(pair, "ListGenerations", ic.ListGenerationsRequest(pair=name), 30.0)
            assert isinstance(reply, ic.ListGenerationsReply)
            infos = list(reply.generations)
        else:
            raise FailedPrecondition(f"pair {name!r} is a local pair; generations belong to remote pairs")
        refused = self.read_refusals if pair.mirror is not None else {}
        return pb.GenerationList(generations=[
            pb.Generation(remote_pair=name, local_pair=i.local_pair, svol=i.svol, status=i.status,
                          backup_time=i.backup_time, changed_tracks=i.changed_tracks, sequence=i.sequence,
                          check_verdict=i.check_verdict, check_time=i.check_time, check_seconds=i.check_seconds,
                          check_reason=i.check_reason, read_refusals=refused.get(i.local_pair, (0, ""))[0],
                          read_refusal=refused.get(i.local_pair, (0, ""))[1])
            for i in infos])


async def _fix_point(mgr: BackupManager, pairs: list[Pair], group: str, generation: str, ring: Sequence[str],
                     hooks: BackupHooks, env: dict[str, str],
                     started: float) -> tuple[list[pb.BackupResult], float, asyncio.Future[None]]:
    """Pick the generations, run the pre-hook, bring the generations in sync, push the markers.

    With a pre-hook the generations are only picked before it runs and brought
    in sync after it passed: a failing pre-hook leaves every generation (and
    the backup it holds) as it was."""
    prepared = await _prepare(mgr, pairs, generation, ring, choose_only=bool(hooks.pre))
    prepare_seconds = time.monotonic() - started
    env["SPLITMIRROR_GENERATION"] = ",".join(prep.generation for prep in prepared)
    env["SPLITMIRROR_SVOL"] = ",".join(prep.svol for prep in prepared)
    mgr.check_ready(pairs)
    if hooks.pre:
        problem = await run_command(hooks.pre, {**env, "SPLITMIRROR_PHASE": "pre-backup"}, hooks.timeout,
                                    "pre-backup hook")
        if problem:
            for pair, prep in zip(pairs, prepared, strict=True):
                mgr.emit(pair, "cancelled", prep.generation, problem)
            log.error("backup of %s cancelled: %s", env["SPLITMIRROR_PAIR"], problem)
            raise BackupCancelled(f"backup of {(group and f'group {group!r}') or f'pair {pairs[0].name!r}'} "
                                  f"cancelled: {problem}; no backup point was fixed and no generation changed")
        chosen = [prep.generation for prep in prepared]
        synced = time.monotonic()
        prepared = [(await _prepare(mgr, [pair], gen, (), choose_only=False))[0]
                    for pair, gen in zip(pairs, chosen, strict=True)]
        prepare_seconds += time.monotonic() - synced  # the time to bring them in sync, not the hook's
        mgr.check_ready(pairs)
    # One step of the event loop, no await: one point of the write order.
    backup_time = utc_now()
    markers = [BackupMarker(uuid.uuid4().hex, prep.generation, backup_time) for prep in prepared]
    futures = []
    for pair, marker in zip(pairs, markers, strict=True):
        assert pair.channel is not None
        futures.append(pair.channel.push(0, marker=marker))
    env["SPLITMIRROR_BACKUP_TIME"] = backup_time
    log.info("backup point fixed at %s for %s", backup_time, ", ".join(p.name for p in pairs))
    for pair, marker in zip(pairs, markers, strict=True):
        mgr.emit(pair, "point", marker.generation, detail=f"at {backup_time}")
    results = [pb.BackupResult(pair=p.name, generation=prep.generation, svol=prep.svol,
                               backup_time=backup_time, resynced_tracks=prep.resynced_tracks, state="pending")
               for p, prep in zip(pairs, prepared, strict=True)]
    completion = asyncio.ensure_future(_complete(mgr, pairs, markers, futures, results, group, backup_time))
    return results, prepare_seconds, completion


async def _prepare(mgr: BackupManager, pairs: list[Pair], generation: str, ring: Sequence[str],
                   choose_only: bool) -> list[ic.PrepareBackupReply]:
    """Ask the secondary to pick each pair's generation and (unless ``choose_only``) bring it in sync."""
    prepared = []
    for pair in pairs:
        reply = await mgr.peer_rpc(pair, "PrepareBackup", ic.PrepareBackupRequest(
            pair=pair.name, generation=generation, ring=ring, choose_only=choose_only), None)
        assert isinstance(reply, ic.PrepareBackupReply)
        prepared.append(reply)
    return prepared


async def _complete(mgr: BackupManager, pairs: list[Pair], markers: list[BackupMarker],
                    futures: list[asyncio.Future[bool]], results: list[pb.BackupResult], group: str = "",
                    backup_time: str = "") -> None:
    delivered = await asyncio.gather(*futures)
    errors: list[str] = []
    for pair, marker, ok, result in zip(pairs, markers, delivered, results, strict=True):
        failed = len(errors)
        try:
            outcome = await mgr.peer_rpc(pair, "FinishBackup",
                                      ic.FinishBackupRequest(pair=pair.name, marker=marker.marker), 30.0)
        except SplitmirrorError as exc:
            errors.append(f"pair {pair.name!r}: outcome unknown ({exc.message}); "
                          "see 'splitmirror backups' once the peer is back")
            mgr.emit(pair, "failed", marker.generation, errors[-1])
            continue
        assert isinstance(outcome, ic.FinishBackupReply)
        if outcome.done:
            result.state = "done"
            result.sequence = outcome.sequence
            for end in pair.ends:
                end.row.backup_time = backup_time or outcome.backup_time
            await mgr.system.save_rows(pair)
            mgr.emit(pair, "done", marker.generation, detail=f"#{outcome.sequence} at {outcome.backup_time}")
        elif not ok or not outcome.known:
            errors.append(f"pair {pair.name!r}: the link failed before the backup point reached system "
                          f"{pair.peer_id}; no backup taken, the pair keeps tracking")
        else:
            errors.append(f"pair {pair.name!r}: {outcome.error}")
        if len(errors) > failed:
            mgr.emit(pair, "failed", marker.generation, errors[-1])
    if errors:
        raise FailedPrecondition("backup failed: " + "; ".join(errors))
    if group:
        mgr.group_backups[group] = backup_time
        await mgr.system.table.set_meta(GROUP_BACKUP_KEY + group, backup_time)


def _duplex(pair: Pair) -> bool:
    return pair.status is PairStatus.DUPLEX


def _log_outcome(task: asyncio.Future[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, SplitmirrorError):
        log.warning("%s", exc.message)
    elif exc is not None:
        log.error("backup completion failed", exc_info=exc)

