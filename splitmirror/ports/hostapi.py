"""The host API servicer: volumes, host I/O and pairs over gRPC."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..clock import iso_time, seconds_since
from ..errors import DeadlineExceeded, InvalidArgument, SplitmirrorError
from ..eventsink import Event
from ..observe.events import EventLog
from ..observe.iometer import IoMeter, measured
from ..pairs.manager import PairManager
from ..pairstate.pair import Pair, PairEnd
from ..procedures.backup import BackupManager
from ..procedures.check import GenerationChecker
from ..procedures.receipts import Receipts
from ..procedures.restore import RestoreManager
from ..procedures.schedule import BackupScheduler
from ..storage.volume import Volume
from ..v1 import host_pb2 as pb
from ..v1 import host_pb2_grpc as pb_grpc
from .access import AccessPolicy

log = logging.getLogger("splitmirror.hostapi")

Req = TypeVar("Req")
Rep = TypeVar("Rep")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Rep]]

#: Largest Read length and Write payload of one request (the NBD server's too).
MAX_IO = 32 << 20
#: Checksum and VerifyPair calls one client may have running at once.
MAX_VERIFY_PER_CLIENT = 2


def refusals(method: Handler[Req, Rep]) -> Handler[Req, Rep]:
    """Check the caller's role and rate; turn user errors into their gRPC status;
    log internal ones with context."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Rep:
        try:
            volume = getattr(request, "volume", None) or getattr(request, "name", None)
            with self.policy.admitted(method.__name__, context, volume if isinstance(volume, str) else None):
                return await method(self, request, context)
        except SplitmirrorError as exc:
            await context.abort(exc.code, exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed for %s", method.__name__, context.peer())
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the daemon log")
        raise AssertionError("unreachable")

    return wrapper


class HostApiServicer(pb_grpc.HostApiServicer):
    def __init__(self, manager: PairManager, backups: BackupManager, restores: RestoreManager,
                 policy: AccessPolicy | None = None, events: EventLog | None = None,
                 meter: IoMeter | None = None, schedules: BackupScheduler | None = None,
                 checker: GenerationChecker | None = None, receipts: Receipts | None = None) -> None:
        self.manager = manager
        self.receipts = receipts or Receipts(backups)
        self.checker = checker or GenerationChecker(backups)
        self.schedules = schedules or BackupScheduler(backups)
        self.backups = backups
        self.restores = restores
        self.policy = policy or AccessPolicy(tls=False)
        self.system = manager.system
        self.events = events
        #: Host I/O latency and bytes (None: metrics off, nothing measured).
        self.meter = meter

    # -- volumes ------------------------------------------------------------
    def _volume_msg(self, vol: Volume) -> pb.Volume:
        refusal = self.system.write_refusal(vol)
        return pb.Volume(name=vol.name, size=vol.size, track_size=vol.track_size, tracks=vol.tracks,
                         allocated_bytes=vol.allocated_bytes(), role=self.system.role_of(vol),
                         host_writable=refusal is None, fence_reason=self.system.fences.get(vol.name, ""))

    @refusals
    async def CreateVolume(self, request: pb.CreateVolumeRequest, context: Context) -> pb.Volume:
        vol = await self.system.create_volume(request.name, request.size, request.track_size)
        return self._volume_msg(vol)

    @refusals
    async def ListVolumes(self, request: pb.ListVolumesRequest, context: Context) -> pb.ListVolumesReply:
        return pb.ListVolumesReply(volumes=[self._volume_msg(v) for _, v in sorted(self.system.volumes.items())])

    @refusals
    async def GetVolume(self, request: pb.VolumeRef, context: Context) -> pb.Volume:
        return self._volume_msg(self.system.volume(request.name))

    @refusals
    async def DeleteVolume(self, request: pb.VolumeRef, context: Context) -> pb.Empty:
        await self.system.delete_volume(request.name)
        return pb.Empty()

    # -- I/O --------------------------------------------------------------------
    @refusals
    async def Write(self, request: pb.WriteRequest, context: Context) -> pb.WriteReply:
        data = request.data
        if len(data) > MAX_IO:  # before the payload is copied anywhere (queued, replicated)
            raise InvalidArgument(f"volume {request.volume!r}: write of {len(data)} bytes exceeds the limit of "
                                  f"{MAX_IO} bytes (32 MiB) per request; split it")
        await measured(self.meter, self.system.volumes, request.volume, "write", len(data),
                       self.system.host_write(request.volume, request.offset, data, request.fua))
        return pb.WriteReply(written=len(data))

    @refusals
    async def Read(self, request: pb.ReadRequest, context: Context) -> pb.ReadReply:
        if request.length > MAX_IO:
            raise InvalidArgument(f"volume {request.volume!r}: read of {request.length} bytes exceeds the limit of "
                                  f"{MAX_IO} bytes (32 MiB) per request; split it")
        return pb.ReadReply(data=await measured(self.meter, self.system.volumes, request.volume, "read", -1,
                                                self.system.host_read(request.volume, request.offset, request.length)))

    @refusals
    async def Flush(self, request: pb.VolumeRef, context: Context) -> pb.Empty:
        await measured(self.meter, self.system.volumes, request.name, "flush", 0, self.system.host_flush(request.name))
        return pb.Empty()

    @refusals
    async def Checksum(self, request: pb.ChecksumRequest, context: Context) -> pb.ChecksumReply:
        vol = self.system.volume(request.volume)
        length = request.length or vol.size - request.offset
        vol.check_range(request.offset, length)
        with self.policy.bounded("Checksum/VerifyPair", MAX_VERIFY_PER_CLIENT, context):
            digest = await within_deadline(context, f"checksum of volume {vol.name!r}",
                                           vol.digest(request.offset, length))
        return pb.ChecksumReply(algorithm="xxh3-128", digest=digest)

    # -- pairs ------------------------------------------------------------------
    def _row(self, pair: Pair, end: PairEnd) -> pb.PairRow:
        row = end.row
        msg = pb.PairRow(pair=row.name, volume=row.volume, copy_type=row.copy_type,
                         pair_system_id=row.pair_system_id, mirror_volume=row.mirror_volume, primary=row.primary,
                         status=row.status.value, mode=row.mode, group=row.group,
                         pending_tracks=len(end.bitmap), split_time=row.split_time or "", reason=row.reason,
                         direction=row.direction)
        since = self.events.status_since.get(row.name) if self.events is not None else None
        if since is not None:  # the event log's last status change of the pair
            msg.status_since, msg.status_age_seconds = iso_time(since), max(0.0, time.time() - since)
        fence = self.system.fences.get(row.volume)
        if fence:
            msg.reason = f"fenced: {fence}"
        elif self.restores.describe(row.name):
            msg.reason = self.restores.describe(row.name)
        if row.primary and row.mode == "async":
            msg.queue_bytes = pair.queued_bytes()
            msg.lag_seconds = pair.lag_seconds()
        if row.copy_type == "REMOTE":
            role = row.role
            msg.epoch, msg.role_change, msg.role_since, msg.role_seq = row.epoch, role.how, role.since, role.seq
            msg.fenced_by, msg.divergent_volume = role.fenced_by, role.divergent
        if row.copy_type == "REMOTE" and row.backup_time:
            msg.backup_time = row.backup_time
            msg.backup_age_seconds = seconds_since(row.backup_time)
        progress = pair.progress
        if row.status.value == "COPY" and progress is not None:
            msg.has_progress = True
            msg.progress = progress.percent
            msg.rate_bytes_per_s = progress.rate
            msg.eta_seconds = progress.eta
            msg.copy_total_tracks = progress.total_tracks
            msg.copy_done_tracks = progress.done_tracks
        elif row.primary and pair.verify_progress is not None:
            verify = pair.verify_progress
            # a verify, or a backup check's current step (a percentage only where it reads the SVOL)
            msg.activity, msg.has_progress, msg.progress = verify.direction, verify.total_tracks > 0, verify.percent
            msg.rate_bytes_per_s, msg.eta_seconds = verify.rate, verify.eta
        return msg

    def _rows(self, pairs: list[Pair]) -> pb.PairList:
        groups = sorted({p.row.group for p in pairs if p.row.group} & set(self.backups.group_backups))
        return pb.PairList(rows=[self._row(p, e) for p in pairs for e in p.ends],
                           groups=[pb.GroupBackup(group=g, backup_time=self.backups.group_backups[g],
                                                  backup_age_seconds=seconds_since(self.backups.group_backups[g]))
                                   for g in groups])

    @refusals
    async def CreatePair(self, request: pb.CreatePairRequest, context: Context) -> pb.PairList:
        pair = await self.manager.create(request.name, request.pvol, request.svol, request.peer,
                                         request.mode or "sync", request.group)
        return self._rows([pair])

    @refusals
    async def DisplayPairs(self, request: pb.DisplayPairsRequest, context: Context) -> pb.PairList:
        if request.name:
            return self._rows([self.manager.pair(request.name)])
        return self._rows([p for _, p in sorted(self.system.pairs.items())])

    @refusals
    async def SplitPair(self, request: pb.PairRef, context: Context) -> pb.PairList:
        return self._rows([await self.manager.split(request.name)])

    @refusals
    async def ResyncPair(self, request: pb.ResyncPairRequest, context: Context) -> pb.PairList:
        return self._rows([await self.manager.resync(request.name, request.reverse, request.force)])

    @refusals
    async def DeletePair(self, request: pb.PairRef, context: Context) -> pb.Empty:
        await self.manager.delete(request.name)
        return pb.Empty()

    @refusals
    async def SetPairMode(self, request: pb.SetPairModeRequest, context: Context) -> pb.PairList:
        return self._rows([await self.manager.set_mode(request.name, request.mode)])

    @refusals
    async def VerifyPair(self, request: pb.VerifyPairRequest, context: Context) -> pb.VerifyReply:
        with self.policy.bounded("Checksum/VerifyPair", MAX_VERIFY_PER_CLIENT, context):
            checked, mismatches, repaired = await within_deadline(
                context, f"verify of pair {request.name!r}", self.manager.verify(request.name, request.repair))
        return pb.VerifyReply(pair=request.name, tracks_checked=checked, mismatches=mismatches, repaired=repaired,
                              algorithm="xxh3-64")

    @refusals
    async def TakeoverPair(self, request: pb.RoleChangeRequest, context: Context) -> pb.PairList:
        return self._rows(await self.manager.takeover(request.name, request.group, request.force))

    @refusals
    async def SwapPair(self, request: pb.RoleChangeRequest, context: Context) -> pb.PairList:
        return self._rows(await self.manager.swap(request.name, request.group))

    @refusals
    async def Backup(self, request: pb.BackupRequest, context: Context) -> pb.BackupReply:
        return await self.backups.backup(request.pair, request.group, request.generation, request.wait,
                                         list(request.ring))

    @refusals
    async def ListBackups(self, request: pb.PairRef, context: Context) -> pb.GenerationList:
        listing = await self.backups.list_backups(request.name)
        listing.schedules.extend(s.message() for s in self.schedules.matching(request.name, ""))
        return listing

    @refusals
    async def CheckBackup(self, request: pb.CheckBackupRequest, context: Context) -> pb.BackupCheck:
        return await self.checker.check(request.generation, request.probe, request.probe_timeout_seconds)

    @refusals
    async def VerifyBackup(self, request: pb.VerifyBackupRequest, context: Context) -> pb.VerifyBackupReply:
        return await self.receipts.verify(request.generation)

    @refusals
    async def SetSchedule(self, request: pb.Schedule, context: Context) -> pb.Schedule:
        return await self.schedules.set(request)

    @refusals
    async def ListSchedules(self, request: pb.ListSchedulesRequest, context: Context) -> pb.ScheduleList:
        return pb.ScheduleList(schedules=[s.message() for s in self.schedules.matching(request.pair, request.group)])

    @refusals
    async def DeleteSchedule(self, request: pb.DeleteScheduleRequest, context: Context) -> pb.ScheduleList:
        gone = await self.schedules.delete(request.name, request.group)
        return pb.ScheduleList(schedules=[s.message() for s in gone])

    @refusals
    async def BeginRestore(self, request: pb.RestoreRequest, context: Context) -> pb.RestoreSession:
        return await self.restores.begin(request.pair, request.generation, force=request.force)

    @refusals
    async def FinishRestore(self, request: pb.PairRef, context: Context) -> pb.RestoreReport:
        return await self.restores.finish(request.name)

    @refusals
    async def AbortRestore(self, request: pb.PairRef, context: Context) -> pb.RestoreReport:
        return await self.restores.abort(request.name)

    @refusals
    async def RestoreVolume(self, request: pb.RestoreRequest, context: Context) -> pb.RestoreReport:
        return await self.restores.restore_volume(request.pair, request.generation, request.force)

    @refusals
    async def GetStats(self, request: pb.StatsRequest, context: Context) -> pb.Stats:
        # Replicated host writes are counted per pair; copies and reverse
        # copies by the system as they happen.
        replicated = sum(p.counters.replicated_bytes for p in self.system.pairs.values()
                         if p.remote and p.primary is not None)
        stats = pb.Stats(system_id=self.system.system_id, role=self.system.role, nbd_port=self.system.nbd_port,
                         interconnect_bytes_sent=self.system.bytes_sent + replicated,
                         interconnect_bytes_received=self.system.bytes_received)
        for name, pair in sorted(self.system.pairs.items()):
            c = pair.counters
            stats.pairs.append(pb.PairCounters(
                pair=name, replicated_writes=c.replicated_writes, replicated_bytes=c.replicated_bytes,
                resync_tracks_sent=c.resync_tracks_sent, resync_bytes_sent=c.resync_bytes_sent,
                resync_tracks_received=c.resync_tracks_received, resync_bytes_received=c.resync_bytes_received,
                mode=pair.row.mode, primary=pair.primary is not None))
            if pair.primary is not None and pair.row.mode == "async":
                stats.pairs[-1].lag_seconds = pair.lag_seconds()
                stats.pairs[-1].lag_bytes = pair.queued_bytes()
        return stats

    async def Events(self, request: pb.EventsRequest, context: Context) -> AsyncIterator[pb.Event]:
        try:
            # Counted against the client's calls in flight while it streams:
            # one client cannot hold every slot with followers.
            with self.policy.admitted("Events", context):
                if self.events is None:
                    raise InvalidArgument(f"system {self.system.system_id} keeps no events")
                async for event in self.events.read(request.since, request.follow):
                    yield event_message(event)
        except SplitmirrorError as exc:
            await context.abort(exc.code, exc.message)
        except Exception:
            log.exception("Events failed for %s", context.peer())
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in Events; see the daemon log")


async def within_deadline(context: Context, what: str, work: Awaitable[Rep]) -> Rep:
    """``work``, stopped when the caller's deadline passes (a cancelled call
    is stopped by gRPC cancelling the handler)."""
    remaining = context.time_remaining()
    try:
        async with asyncio.timeout(remaining):
            return await work
    except TimeoutError:
        raise DeadlineExceeded(f"{what} stopped at the caller's deadline") from None


def event_message(event: Event) -> pb.Event:
    return pb.Event(seq=event.seq, timestamp=event.timestamp, time=iso_time(event.timestamp), kind=event.kind,
                    pair=event.pair, volume=event.volume, peer=event.peer, generation=event.generation, op=event.op,
                    old_status=event.old_status, status=event.status, reason=event.reason, detail=event.detail,
                    tracks=event.tracks, bytes=event.bytes, progress=event.progress)

