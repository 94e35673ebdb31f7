"""Backup checks: prove a split generation restorable, at the secondary.

``check`` attaches the generation's SVOL through a copy-on-write overlay
(:mod:`.overlay`: the SVOL file is opened read-only, every write stays in
the overlay), replays the journal and runs ``e2fsck -fn`` there, mounts the
filesystem and runs the operator's probe in it (e.g. start PostgreSQL on
the copy and run a query).  The verdict, duration and output tail are kept
in the copy table (``check:GENERATION``) and shown by ``backups``; a failure
is an event and counts in a metric.  A generation being checked is not
reused by a backup meanwhile, and its SVOL digest is taken before and after.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..clock import utc_now
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..eventsink import BACKUP, Event
from ..names import check_name
from ..pairstate.pair import CopyProgress, Pair
from ..status import PairStatus
from ..v1 import host_pb2 as pb
from ..v1 import interconnect_pb2 as ic
from .backup import BackupManager
from .hooks import command_output
from .overlay import missing_tools, overlay, run

log = logging.getLogger("splitmirror.check")

KEY = "check:"
PROBE_TIMEOUT = 600.0
FSCK_TIMEOUT = 1800.0
MAX_PROBE = 4096
TAIL = 2048


class GenerationChecker:
    def __init__(self, backups: BackupManager) -> None:
        self.backups = backups
        self.system = backups.system

    async def load(self) -> None:
        for key, raw in (await self.system.table.meta_items(KEY)).items():
            if key.removeprefix(KEY) not in self.system.pairs:  # the generation was deleted
                await self.system.table.delete_meta(key)
                continue
            try:
                self.backups.checks[key.removeprefix(KEY)] = dict(json.loads(raw))
            except ValueError:
                log.error("check record %s in the copy table cannot be read; ignored", key)

    def _locate(self, name: str) -> tuple[Pair, Pair]:
        """The generation ``name`` and the remote pair whose SPVOL it copies."""
        check_name("generation", name)
        gen = self.system.pairs.get(name)
        if gen is None or gen.remote or gen.primary is None or gen.mirror is None:
            raise NotFound(f"generation {name!r} is not a local pair with both ends on system "
                           f"{self.system.system_id}")
        remote = next((p for p in self.system.pairs.values()
                       if p.remote and p.mirror is not None and p.mirror.volume is gen.primary.volume), None)
        if remote is None:
            raise NotFound(f"local pair {name!r} does not copy the SPVOL of a remote pair; it is not a backup "
                           "generation")
        if gen.status is not PairStatus.SPLIT or not gen.row.backup_time:
            raise FailedPrecondition(f"generation {name!r} is {gen.status.value}"
                                     f"{'' if gen.row.backup_time else ' and holds no backup'}; "
                                     "a check reads a SPLIT generation holding a backup")
        return gen, remote

    async def check(self, name: str, probe: str = "", probe_timeout: float = 0.0) -> pb.BackupCheck:
        if len(probe) > MAX_PROBE:
            raise InvalidArgument(f"backup check: the probe is {len(probe)} characters; at most {MAX_PROBE}")
        if not 0 <= probe_timeout <= 86400:
            raise InvalidArgument("backup check: the probe timeout must be between 0 and 86400 seconds")
        gen, remote = self._locate(name)
        if name in self.backups.checking:
            raise FailedPrecondition(f"generation {name!r} is being checked already")
        problem = missing_tools()
        if problem:
            raise FailedPrecondition(f"backup check needs {', '.join(problem)} on system {self.system.system_id}")
        assert gen.mirror is not None
        svol = gen.mirror.volume
        self.backups.checking.add(name)
        started = time.monotonic()
        report = pb.BackupCheck(generation=name, remote_pair=remote.name, backup_time=gen.row.backup_time or "",
                                sequence=gen.row.backup_seq, checked_at=utc_now())
        output: list[str] = []
        try:
            await svol.flush()
            before = await svol.digest(0, svol.size, _phase(gen, "check: reading the SVOL", svol.size))
            report.reason = await self._examine(svol.path, gen, remote, probe, probe_timeout or PROBE_TIMEOUT,
                                                output)
            after = await svol.digest(0, svol.size, _phase(gen, "check: re-reading the SVOL", svol.size))
            if after != before:  # never expected: the overlay opens the SVOL read-only
                report.reason = f"SVOL {svol.name} changed during the check ({before} -> {after})"
            report.svol_digest = after
        finally:
            self.backups.checking.discard(name)
            gen.verify_progress = None
        report.verdict = "failed" if report.reason else "passed"
        report.seconds = time.monotonic() - started
        report.output = "\n".join(output)[-TAIL:]
        await self._record(report, remote)
        return report

    async def _examine(self, source: Path, gen: Pair, remote: Pair, probe: str, probe_timeout: float,
                       output: list[str]) -> str:
        """Run fsck and the probe on the overlay; the reason of a failure, or ""."""
        workdir = self.system.data_dir / "checks"
        assert gen.mirror is not None
        _phase(gen, "check: attaching a copy-on-write overlay")
        async with overlay(source, workdir) as view:
            _phase(gen, "check: replaying the journal")
            code, out = await run(["e2fsck", "-E", "journal_only", "-y", str(view.disk)], FSCK_TIMEOUT)
            out = out.replace(str(view.disk), f"SVOL {gen.mirror.volume.name}")
            output.append(out.strip())
            if code not in (0, 1):
                return f"e2fsck could not replay the journal (exit status {code}): {_last(out)}"
            _phase(gen, "check: e2fsck -fn")
            code, out = await run(["e2fsck", "-fn", str(view.disk)], FSCK_TIMEOUT)
            out = out.replace(str(view.disk), f"SVOL {gen.mirror.volume.name}")
            output.append(out.strip())
            if code != 0:
                return f"e2fsck found errors in the file system (exit status {code}): {_last(out)}"
            _phase(gen, "check: mounting")
            mount = await view.mount()
            if probe:
                _phase(gen, "check: running the probe")
                env = {"SPLITMIRROR_MOUNT": str(mount), "SPLITMIRROR_GENERATION": gen.name,
                       "SPLITMIRROR_PAIR": remote.name, "SPLITMIRROR_BACKUP_TIME": gen.row.backup_time or "",
                       "SPLITMIRROR_PHASE": "check"}
                problem, out = await command_output(f"cd {_quote(mount)} && {probe}", env, probe_timeout,
                                                    "probe")
                output.append(out.strip())
                if problem:
                    return problem
        return ""

    async def _record(self, report: pb.BackupCheck, remote: Pair) -> None:
        record = {"verdict": report.verdict, "time": report.checked_at, "seconds": round(report.seconds, 3),
                  "reason": report.reason, "sequence": report.sequence, "backup_time": report.backup_time,
                  "output": report.output}
        self.backups.checks[report.generation] = record
        await self.system.table.set_meta(KEY + report.generation, json.dumps(record))
        await self.system.table.sync()
        event = Event(BACKUP, pair=remote.name, peer=remote.peer_id, generation=report.generation,
                      op="checked" if report.verdict == "passed" else "check-failed", reason=report.reason,
                      detail=f"#{report.sequence} of {report.backup_time} in {report.seconds:.1f}s")
        self.system.events.emit(event)
        if report.verdict == "passed":
            log.info("generation %s (#%d) checked: passed in %.1fs", report.generation, report.sequence,
                     report.seconds)
        else:
            self.backups.check_failures += 1
            log.error("generation %s (#%d) check failed: %s", report.generation, report.sequence, report.reason)

    async def check_for_peer(self, peer: int, req: ic.CheckGenerationRequest) -> ic.CheckGenerationReply:
        """A schedule with --check at the primary asks for the generation a backup just filled."""
        pair = self.backups.manager.mirror_pair(peer, req.pair)
        if req.generation not in {g.name for g in self.backups.generations(pair)}:
            raise NotFound(f"generation {req.generation!r} is not a generation of pair {pair.name!r}")
        report = await self.check(req.generation, req.probe)
        return ic.CheckGenerationReply(verdict=report.verdict, reason=report.reason, seconds=report.seconds)


def _phase(gen: Pair, what: str, size: int = 0) -> Callable[[int], None]:
    """Show the check's step as the generation's activity (``pair display``, the CLI's
    progress); a step over ``size`` bytes also has a percentage, rate and ETA, kept by
    the callback returned (bytes done)."""
    assert gen.mirror is not None
    track_size = gen.mirror.volume.track_size
    progress = gen.verify_progress = CopyProgress(what, -(-size // track_size), track_size)

    def done(n: int) -> None:
        progress.done_tracks = min(progress.total_tracks, progress.done_tracks + -(-n // track_size))

    return done


def _last(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"

