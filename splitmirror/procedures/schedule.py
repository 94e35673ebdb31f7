"""Backup schedules: kept in the primary's copy table, run by the primary.

A schedule backs up a remote pair (or every remote pair of a consistency
group) every ``every`` seconds into the oldest generation of its *ring* (a
set of local pairs at the secondary; empty: every generation of the pair).
Several schedules of one pair use disjoint rings: hourly into three
generations, daily into two.

Slots are ``anchor + k * every``: the anchor is the time of day ``at`` (UTC)
of the day the schedule was set, or the time it was set.  The next slot is
kept in the copy table, so a restart keeps the timetable; a slot missed
while the daemon was down runs once at start (however many were missed), and
the next one is the first slot after that run.  Runs are one at a time, in
slot order; a run waits (bounded) for its pairs to be in step with their
peer (DUPLEX at both ends, link up, not being reconciled: right after a start
the copy table still says DUPLEX before the peer was asked), and records a
failure when they are not.  A clean stop lets a run that is taking its
backup finish (bounded), so the run is recorded and the ring goes on from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable

from ..clock import iso_time
from ..errors import FailedPrecondition, InvalidArgument, NotFound, SplitmirrorError
from ..eventsink import BACKUP, Event
from ..names import check_name
from ..pairstate.pair import Pair
from ..status import PairStatus
from ..v1 import host_pb2 as pb
from ..v1 import interconnect_pb2 as ic
from .backup import BackupManager, check_ring

log = logging.getLogger("splitmirror.schedule")

KEY = "schedule:"
MAX_SCHEDULES = 256
MIN_EVERY = 1.0
MAX_EVERY = 366 * 86400.0
MAX_COMMAND = 4096
MAX_HOOK_TIMEOUT = 3600.0
#: Longest a due run waits for its pairs to be ready (DUPLEX, link up); also
#: how long after the daemon's start a run may wait for the pairs' recovery.
MAX_READY_WAIT = 60.0
#: How long a clean stop waits for a run that is taking its backup.
STOP_GRACE = 5.0
#: Longest a scheduled check may take at the secondary.
CHECK_TIMEOUT = 3600.0
_AT = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclasses.dataclass
class Schedule:
    name: str
    pair: str
    group: str
    every: float
    at: str = ""
    ring: list[str] = dataclasses.field(default_factory=list)
    check: bool = False
    probe: str = ""
    pre_hook: str = ""
    post_hook: str = ""
    hook_timeout: float = 0.0
    anchor: float = 0.0
    next_run: float = 0.0
    last_run: float = 0.0
    last_result: str = ""
    last_error: str = ""
    last_generations: str = ""
    runs: int = 0
    last_check: str = ""

    @property
    def target(self) -> str:
        return f"group {self.group!r}" if self.group else f"pair {self.pair!r}"

    def next_slot(self, after: float) -> float:
        """The first slot strictly after ``after``."""
        k = math.floor((after - self.anchor) / self.every) + 1
        return self.anchor + k * self.every

    def message(self) -> pb.Schedule:
        return pb.Schedule(
            name=self.name, pair=self.pair, group=self.group, every_seconds=self.every, at=self.at, ring=self.ring,
            check=self.check, probe=self.probe, pre_hook=self.pre_hook, post_hook=self.post_hook,
            hook_timeout_seconds=self.hook_timeout, next_run=iso_time(self.next_run),
            last_run=iso_time(self.last_run) if self.last_run else "", last_result=self.last_result,
            last_error=self.last_error, last_generations=self.last_generations, runs=self.runs,
            last_check=self.last_check)


def duration_text(seconds: float) -> str:
    """2s, 15m, 1h, 1d: the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def anchor_of(at: str, now: float) -> float:
    """``at`` (HH:MM UTC) on the day of ``now``, or ``now`` itself."""
    if not at:
        return now
    found = _AT.match(at)
    assert found is not None
    midnight = now - now % 86400
    return midnight + int(found[1]) * 3600 + int(found[2]) * 60


def validate(req: pb.Schedule) -> None:
    """Everything a client sends, checked before anything is kept."""
    if bool(req.pair) == bool(req.group):
        raise InvalidArgument("a schedule names a remote pair or a consistency group (--group), not both")
    check_name("group" if req.group else "pair", req.group or req.pair)
    if req.name:
        check_name("schedule", req.name)
    if not MIN_EVERY <= req.every_seconds <= MAX_EVERY or not math.isfinite(req.every_seconds):
        raise InvalidArgument(f"schedule: --every must be between {MIN_EVERY:g} s and 366 days, "
                              f"got {req.every_seconds:g} s")
    if req.at and not _AT.match(req.at):
        raise InvalidArgument(f"schedule: --at {req.at!r} is not HH:MM (UTC, 00:00 to 23:59)")
    check_ring(req.ring)
    for field, text in (("probe", req.probe), ("pre-backup hook", req.pre_hook),
                        ("post-backup hook", req.post_hook)):
        if len(text) > MAX_COMMAND:
            raise InvalidArgument(f"schedule: the {field} is {len(text)} characters; at most {MAX_COMMAND}")
    if not 0 <= req.hook_timeout_seconds <= MAX_HOOK_TIMEOUT or not math.isfinite(req.hook_timeout_seconds):
        raise InvalidArgument(f"schedule: the hook timeout must be between 0 and {MAX_HOOK_TIMEOUT:g} s")


class BackupScheduler:
    """The schedules of this system and the task that runs them."""

    def __init__(self, backups: BackupManager, clock: Callable[[], float] = time.time) -> None:
        self.backups = backups
        self.system = backups.system
        self.clock = clock
        self.schedules: dict[str, Schedule] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Checks of new backups (schedules with --check) in progress.
        self._checks: set[asyncio.Task[None]] = set()
        #: When the scheduler started (slots before it were missed while the daemon was down).
        self._up_since = 0.0
        self._stopping = False
        #: Set while no run is taking a backup (a clean stop waits for it, bounded).
        self._settled = asyncio.Event()
        self._settled.set()

    async def load(self) -> None:
        saved = await self.system.table.meta_items(KEY)
        for key, raw in saved.items():
            try:
                fields = json.loads(raw)
                schedule = Schedule(**fields)
            except (ValueError, TypeError) as exc:
                log.error("schedule %s in the copy table cannot be read (%s); ignored", key, exc)
                continue
            self.schedules[schedule.name] = schedule

    def start(self) -> None:
        self._up_since = self.clock()
        self._task = asyncio.create_task(self._loop(), name="backup-scheduler")

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._checks):
            task.cancel()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):  # a backup under way: let it finish and be recorded
                await asyncio.wait_for(self._settled.wait(), STOP_GRACE)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _save(self, schedule: Schedule) -> None:
        await self.system.table.set_meta(KEY + schedule.name, json.dumps(dataclasses.asdict(schedule)))
        await self.system.table.sync()

    # -- commands -------------------------------------------------------------------
    async def set(self, req: pb.Schedule) -> pb.Schedule:
        validate(req)
        self.backups.targets(req.pair, req.group)  # a remote pair (or group) whose primary is here
        name = req.name or f"{req.pair or req.group}-every-{duration_text(req.every_seconds)}"
        old = self.schedules.get(name)
        if old is not None and (old.pair, old.group) != (req.pair, req.group):
            raise FailedPrecondition(f"schedule {name!r} backs up {old.target}; delete it first or pick "
                                     "another --name")
        if old is None and len(self.schedules) >= MAX_SCHEDULES:
            raise FailedPrecondition(f"system {self.system.system_id} keeps at most {MAX_SCHEDULES} schedules")
        for other in self.schedules.values():
            if other.name == name or (other.pair, other.group) != (req.pair, req.group):
                continue
            shared = set(other.ring) & set(req.ring)
            if not other.ring or not req.ring or shared:
                what = ", ".join(sorted(shared)) if shared else "every generation"
                raise FailedPrecondition(
                    f"schedule {other.name!r} of the same {other.target} uses {what}; schedules of one target "
                    "need disjoint rings of generations (--generations)")
        now = self.clock()
        schedule = Schedule(name=name, pair=req.pair, group=req.group, every=req.every_seconds, at=req.at,
                            ring=list(req.ring), check=req.check, probe=req.probe, pre_hook=req.pre_hook,
                            post_hook=req.post_hook, hook_timeout=req.hook_timeout_seconds,
                            anchor=anchor_of(req.at, now))
        if old is not None:  # keep the history of a changed schedule
            for field in ("last_run", "last_result", "last_error", "last_generations", "runs", "last_check"):
                setattr(schedule, field, getattr(old, field))
        schedule.next_run = schedule.next_slot(now)
        self.schedules[name] = schedule
        await self._save(schedule)
        log.info("schedule %s: backup of %s every %s%s, next at %s", name, schedule.target,
                 duration_text(schedule.every), f" at {schedule.at} UTC" if schedule.at else "",
                 iso_time(schedule.next_run))
        self._wake.set()
        return schedule.message()

    def matching(self, pair: str, group: str) -> list[Schedule]:
        """Schedules of ``pair`` (and of its consistency group), or of ``group``; all when neither."""
        if not pair and not group:
            return sorted(self.schedules.values(), key=lambda s: s.name)
        groups = {group} if group else set()
        held = self.system.pairs.get(pair) if pair else None
        if held is not None and held.row.group:
            groups.add(held.row.group)
        return sorted((s for s in self.schedules.values() if (pair and s.pair == pair) or s.group in groups),
                      key=lambda s: s.name)

    async def delete(self, name: str, group: str) -> list[Schedule]:
        if name in self.schedules and not group:
            gone = [self.schedules[name]]
        else:
            gone = [s for s in self.schedules.values() if (group and s.group == group) or (name and s.pair == name)]
        if not gone:
            raise NotFound(f"no schedule {'of group ' + repr(group) if group else repr(name)} on system "
                           f"{self.system.system_id}")
        for schedule in gone:
            del self.schedules[schedule.name]
            await self.system.table.delete_meta(KEY + schedule.name)
        await self.system.table.sync()
        self._wake.set()
        return gone

    # -- running ---------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            due = sorted((s for s in self.schedules.values() if s.next_run <= now), key=lambda s: s.next_run)
            for schedule in due:
                if self._stopping:
                    return
                if self.schedules.get(schedule.name) is schedule:
                    try:
                        await self._run(schedule)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("schedule %s: run failed", schedule.name)
                        schedule.next_run = schedule.next_slot(self.clock())
            if due:
                continue
            delay = min((s.next_run - now for s in self.schedules.values()), default=3600.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(max(delay, 0.01), 3600.0))

    async def _ready(self, schedule: Schedule) -> None:
        """Wait (bounded) until the schedule's pairs can be backed up: up to its period (5 s to a
        minute), or until the daemon has been up a minute (its pairs' recovery after a start)."""
        wait = min(max(schedule.every, 5.0), MAX_READY_WAIT)
        wait = max(wait, self._up_since + MAX_READY_WAIT - self.clock())
        deadline = time.monotonic() + wait
        while True:
            try:
                pairs = self.backups.targets(schedule.pair, schedule.group)
                self.backups.check_ready(pairs)
                in_step(pairs)
                return
            except SplitmirrorError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.25)

    async def _run(self, schedule: Schedule) -> None:
        started = self.clock()
        slot = schedule.next_run
        missed = 1 + max(0, math.floor((started - schedule.next_run) / schedule.every))
        # Slots before this process started passed while the daemon was down;
        # later ones while earlier runs (of this or another schedule) took the time.
        why = "while down" if slot < self._up_since else "while earlier runs ran"
        if missed > 1:
            log.warning("schedule %s: %d slots passed %s; running once now", schedule.name, missed, why)
        result, error, generations = "done", "", ""
        reply: pb.BackupReply | None = None
        try:
            try:
                await self._ready(schedule)
                if self._stopping:  # nothing taken: the slot stays due and runs at the next start
                    return
                hooks = self.backups.hooks.over(schedule.pre_hook, schedule.post_hook, schedule.hook_timeout)
                self._settled.clear()  # from here a clean stop waits (bounded) for the run to be recorded
                reply = await self.backups.backup(schedule.pair, schedule.group, "", True, schedule.ring, hooks,
                                                  schedule.name)
                generations = ",".join(f"{b.pair}:{b.generation}" for b in reply.backups)
                if reply.warning:
                    error = reply.warning
            except SplitmirrorError as exc:
                result, error = getattr(exc, "result", "failed"), exc.message
            except asyncio.CancelledError:
                if not self._settled.is_set():  # stopped past the grace while taking the backup: say so
                    await self._record(schedule, started, slot, missed, why, "interrupted",
                                       "primaryd stopped before the backup finished; 'splitmirror backups' "
                                       "shows what the generations hold", "")
                raise
            await self._record(schedule, started, slot, missed, why, result, error, generations)
        finally:
            self._settled.set()
        if reply is not None and schedule.check:
            task = asyncio.create_task(self._check(schedule, reply), name=f"check-{schedule.name}")
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _record(self, schedule: Schedule, started: float, slot: float, missed: int, why: str, result: str,
                      error: str, generations: str) -> None:
        """Keep a run's outcome with its schedule, and say it (an event, a log line)."""
        schedule.runs += 1
        schedule.last_run = started
        schedule.last_result, schedule.last_error = result, error
        if generations:
            schedule.last_generations = generations
        schedule.next_run = schedule.next_slot(self.clock())
        if self.schedules.get(schedule.name) is schedule:
            await self._save(schedule)
        detail = (f"schedule {schedule.name}: {result}" + (f" into {generations}" if generations else "")
                  + f" for slot {iso_time(slot)}")
        if missed > 1:
            detail += f" (ran once for {missed} slots missed {why})"
        self.system.events.emit(Event(BACKUP, pair=schedule.pair, generation=generations, op="scheduled",
                                      reason=error or result, detail=detail))
        log.info("%s%s; next at %s", detail, f": {error}" if error else "", iso_time(schedule.next_run))

    async def _check(self, schedule: Schedule, reply: pb.BackupReply) -> None:
        """Check each generation the run filled, at the secondary; keep the verdict with the schedule."""
        verdicts = []
        for b in reply.backups:
            pair = self.system.pairs.get(b.pair)
            try:
                if pair is None:
                    raise NotFound(f"pair {b.pair!r} is gone")
                outcome = await self.backups.peer_rpc(pair, "CheckGeneration", ic.CheckGenerationRequest(
                    pair=b.pair, generation=b.generation, probe=schedule.probe), CHECK_TIMEOUT)
                assert isinstance(outcome, ic.CheckGenerationReply)
                verdicts.append(f"{b.generation} {outcome.verdict}" + (f": {outcome.reason}" if outcome.reason
                                                                        else f" in {outcome.seconds:.1f}s"))
            except SplitmirrorError as exc:
                verdicts.append(f"{b.generation} not checked: {exc.message}")
        schedule.last_check = "; ".join(verdicts)
        if self.schedules.get(schedule.name) is schedule:
            await self._save(schedule)


def in_step(pairs: list[Pair]) -> None:
    """Refuse pairs not yet in step with their peer: being reconciled (as just
    after a start or a reconnect), or not DUPLEX at the peer by its last
    keepalive answer (right after a start the copy table says DUPLEX here
    before the peer was asked)."""
    said: dict[int, dict[str, str]] = {}  # peer -> its pairs' statuses (read once: a group may be large)
    for pair in pairs:
        if pair.reconciling:
            raise FailedPrecondition(f"pair {pair.name!r} is being reconciled with system {pair.peer_id}")
        assert pair.link is not None
        if pair.peer_id not in said:
            said[pair.peer_id] = {s.pair: s.status for s in pair.link.peer_roles}
        theirs = said[pair.peer_id].get(pair.name, "")
        if theirs != PairStatus.DUPLEX.value:
            raise FailedPrecondition(f"pair {pair.name!r} is {theirs or 'not known yet'} at system {pair.peer_id}; "
                                     "a backup needs it DUPLEX at both ends")
