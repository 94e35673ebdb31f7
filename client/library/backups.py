"""Backup and restore calls: take a backup, list the generations, restore files or a volume."""

from __future__ import annotations

from splitmirror.v1 import host_pb2

from .connection import Connection
from .errors import ClientError

__all__ = ["BackupRestoreCalls"]


class BackupRestoreCalls(Connection):
    """Backups (issued at the primary) and restores (issued at the secondary)."""

    async def backup(self, pair: str = "", *, group: str = "", generation: str = "",
                     wait: bool = True, ring: list[str] | None = None) -> host_pb2.BackupReply:
        req = host_pb2.BackupRequest(pair=pair, group=group, generation=generation, wait=wait, ring=ring or [])
        reply: host_pb2.BackupReply = await self._call(lambda s: s.Backup, req)
        return reply

    async def list_backups(self, pair: str) -> list[host_pb2.Generation]:
        reply = await self._call(lambda s: s.ListBackups, host_pb2.PairRef(name=pair))
        return list(reply.generations)

    async def backup_listing(self, pair: str) -> host_pb2.GenerationList:
        """The generations of a remote pair and (at the primary) its schedules."""
        reply: host_pb2.GenerationList = await self._call(lambda s: s.ListBackups, host_pb2.PairRef(name=pair))
        return reply

    async def group_backup_listing(self, group: str) -> host_pb2.GenerationList:
        """The generations of every remote pair of consistency group ``group``
        held here, and (at the primary) the schedules of those pairs and of the group."""
        rows = (await self._call(lambda s: s.DisplayPairs, host_pb2.DisplayPairsRequest())).rows
        pairs = sorted({r.pair for r in rows if r.group == group and r.copy_type == "REMOTE"})
        if not pairs:
            raise ClientError("NOT_FOUND", f"consistency group {group!r} has no remote pair on {self.server}")
        listing = host_pb2.GenerationList()
        for pair in pairs:
            part = await self.backup_listing(pair)
            listing.generations.extend(part.generations)
            known = {s.name for s in listing.schedules}
            listing.schedules.extend(s for s in part.schedules if s.name not in known)
        return listing

    async def check_backup(self, generation: str, probe: str = "",
                           probe_timeout: float = 0.0) -> host_pb2.BackupCheck:
        """Check a generation at the secondary (fsck and the probe on a copy-on-write overlay)."""
        req = host_pb2.CheckBackupRequest(generation=generation, probe=probe, probe_timeout_seconds=probe_timeout)
        reply: host_pb2.BackupCheck = await self._call(lambda s: s.CheckBackup, req)
        return reply

    async def verify_backup(self, generation: str) -> host_pb2.VerifyBackupReply:
        """Re-read a generation and compare each track with its receipt (at the secondary)."""
        reply: host_pb2.VerifyBackupReply = await self._call(
            lambda s: s.VerifyBackup, host_pb2.VerifyBackupRequest(generation=generation))
        return reply

    async def set_schedule(self, schedule: host_pb2.Schedule) -> host_pb2.Schedule:
        reply: host_pb2.Schedule = await self._call(lambda s: s.SetSchedule, schedule)
        return reply

    async def list_schedules(self, pair: str = "", group: str = "") -> list[host_pb2.Schedule]:
        reply = await self._call(lambda s: s.ListSchedules, host_pb2.ListSchedulesRequest(pair=pair, group=group))
        return list(reply.schedules)

    async def delete_schedule(self, name: str = "", group: str = "") -> list[host_pb2.Schedule]:
        reply = await self._call(lambda s: s.DeleteSchedule, host_pb2.DeleteScheduleRequest(name=name, group=group))
        return list(reply.schedules)

    async def begin_restore(self, pair: str, generation: str, force: bool = False) -> host_pb2.RestoreSession:
        reply: host_pb2.RestoreSession = await self._call(
            lambda s: s.BeginRestore, host_pb2.RestoreRequest(pair=pair, generation=generation, force=force))
        return reply

    async def finish_restore(self, pair: str) -> host_pb2.RestoreReport:
        reply: host_pb2.RestoreReport = await self._call(lambda s: s.FinishRestore, host_pb2.PairRef(name=pair))
        return reply

    async def abort_restore(self, pair: str) -> host_pb2.RestoreReport:
        reply: host_pb2.RestoreReport = await self._call(lambda s: s.AbortRestore, host_pb2.PairRef(name=pair))
        return reply

    async def restore_volume(self, pair: str, generation: str, force: bool = False) -> host_pb2.RestoreReport:
        reply: host_pb2.RestoreReport = await self._call(
            lambda s: s.RestoreVolume, host_pb2.RestoreRequest(pair=pair, generation=generation, force=force))
        return reply
