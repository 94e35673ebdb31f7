"""The common point of an async consistency group at the mirror end (sans-I/O).

The primary pushes group cuts into the streams of an async group's pairs
(:mod:`splitmirror.datapath.groupcuts`): a cut is one point of the host's
write order, the same in every stream.  Streams are applied independently,
so at any moment one pair of the group may have applied writes beyond a
cut that another pair has not reached yet.  A takeover must not start the
group from such a state (the log volume ahead of the data volume), so the
mirror end keeps undoable what it applies past the group's last complete
cut: before each write of an async group pair it keeps the bytes the write
replaces (the pre-image).  When every stream that carries a cut has
applied it, the cut is complete and the pre-images before it are dropped.
A takeover writes the kept pre-images back, newest first: every pair of
the group is then at the last complete cut, the same point of the write
order, and the tracks rolled back are pending (the resync home copies
them, after the old primary saved its versions as divergent tracks).

Nothing is held back or delayed: writes are applied and acknowledged as
before (the send window and the acknowledgements stay as they are); the
price is one read of what each such write overwrites, and memory bounded by
a budget.  A pair whose pre-images outgrow the budget stops keeping them
until the next complete cut and is then reported as not rolled back.
"""

from __future__ import annotations

import dataclasses

from ..replication.queue import GroupCut

#: Pre-image bytes all pairs together may keep.
DEFAULT_BUDGET = 256 << 20
#: Cuts of one group waiting for their streams before the oldest is forgotten.
MAX_OPEN_CUTS = 4096


@dataclasses.dataclass(slots=True)
class Undo:
    """What one applied write replaced."""

    offset: int
    before: bytes


@dataclasses.dataclass(slots=True)
class CutMark:
    """Where a cut sits in one pair's applied writes."""

    cut: int
    seq: int


@dataclasses.dataclass
class PairLog:
    """One pair's pre-images since the last complete cut it took part in."""

    group: str
    records: list[Undo | CutMark] = dataclasses.field(default_factory=list)
    bytes: int = 0
    #: The last complete cut this pair applied, and its sequence in the pair's stream (0: none yet).
    point: int = 0
    point_seq: int = 0
    #: Pre-images were dropped for the budget: this pair cannot return to its point.
    overflowed: bool = False


@dataclasses.dataclass
class Rollback:
    """What a takeover does to one pair: write ``undo`` in order, then it is at ``point``."""

    pair: str
    undo: list[Undo]
    point: int
    point_seq: int
    overflowed: bool


class GroupPoints:
    """Pre-images and cut arrivals of the async group pairs whose mirror ends are here."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.kept_bytes = 0
        self._logs: dict[str, PairLog] = {}
        #: group -> cut -> (streams that carry it, pairs that applied it)
        self._open: dict[str, dict[int, tuple[int, set[str]]]] = {}
        #: group -> its last complete cut
        self.complete: dict[str, int] = {}

    def log(self, pair: str) -> PairLog | None:
        return self._logs.get(pair)

    # -- applying ---------------------------------------------------------------------
    def room(self, pair: str, group: str, size: int) -> bool:
        """Whether a pre-image of ``size`` bytes may be kept for ``pair`` (else the pair overflows)."""
        log = self._logs.get(pair)
        if log is None:
            log = self._logs[pair] = PairLog(group)
        if log.overflowed:
            return False
        if self.kept_bytes + size > self.budget:
            self._drop(log)
            log.overflowed = True
            return False
        return True

    def keep(self, pair: str, offset: int, before: bytes) -> None:
        """``before`` is what the write about to be applied at ``offset`` replaces."""
        log = self._logs[pair]
        log.records.append(Undo(offset, before))
        log.bytes += len(before)
        self.kept_bytes += len(before)

    def applied_cut(self, pair: str, group: str, cut: GroupCut, seq: int) -> bool:
        """``pair`` applied everything before ``cut`` (its entry ``seq``); True when the cut is complete."""
        log = self._logs.get(pair)
        if log is None:
            log = self._logs[pair] = PairLog(group)
        log.records.append(CutMark(cut.cut, seq))
        cuts = self._open.setdefault(group, {})
        members, arrived = cuts.setdefault(cut.cut, (cut.members, set()))
        arrived.add(pair)
        if len(arrived) < members:
            while len(cuts) > MAX_OPEN_CUTS:  # cuts some stream never delivered
                del cuts[min(cuts)]
            return False
        self._completed(group, cut.cut)
        return True

    def _completed(self, group: str, cut: int) -> None:
        self.complete[group] = cut
        cuts = self._open.get(group, {})
        for number in [n for n in cuts if n <= cut]:
            del cuts[number]
        for log in self._logs.values():
            if log.group != group:
                continue
            for i, record in enumerate(log.records):
                if isinstance(record, CutMark) and record.cut == cut:
                    dropped = log.records[:i + 1]
                    del log.records[:i + 1]
                    freed = sum(len(r.before) for r in dropped if isinstance(r, Undo))
                    log.bytes -= freed
                    self.kept_bytes -= freed
                    log.point, log.point_seq, log.overflowed = cut, record.seq, False
                    break

    # -- leaving the group's order ----------------------------------------------------------
    def forget(self, pair: str) -> None:
        """``pair`` no longer mirrors as an async group member here (split, resync, deleted, taken over)."""
        log = self._logs.pop(pair, None)
        if log is not None:
            self.kept_bytes -= log.bytes

    def _drop(self, log: PairLog) -> None:
        self.kept_bytes -= log.bytes
        log.records.clear()
        log.bytes = 0

    # -- takeover ----------------------------------------------------------------------
    def rollback(self, pair: str) -> Rollback | None:
        """What returns ``pair`` to the last complete cut it took part in (None: no log here)."""
        log = self._logs.get(pair)
        if log is None:
            return None
        undo = [r for r in reversed(log.records) if isinstance(r, Undo)]
        return Rollback(pair, undo, log.point, log.point_seq, log.overflowed)
