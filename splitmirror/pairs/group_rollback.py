"""Returning an async group's mirror ends to the group's last complete cut (at a takeover).

The pre-images and cuts are kept by :mod:`splitmirror.pairs.group_point`
while the mirror end applies its stream.  At a takeover this module stops
the pair's stream from applying more (a batch being applied finishes
first), writes the kept pre-images back newest first, and marks the tracks
it wrote pending: they differ from the old primary's, so the resync home
copies them (after the old primary kept its versions aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from ..datapath.writes import WriteOp
from ..errors import FailedPrecondition
from ..pairstate.pair import Pair
from ..storage.bitmap import TrackBitmap
from .context import PairContext

log = logging.getLogger("splitmirror.pairs")


@dataclasses.dataclass
class RolledBack:
    """Where a takeover left one pair of an async group."""

    point: int        # the group cut it is at (0: none known)
    seq: int          # that cut's sequence in the pair's stream
    tracks: TrackBitmap  # the tracks written back
    overflowed: bool  # its pre-images outgrew the budget: it stays where its stream stopped


class GroupRollback:
    """Guards each batch a mirror end applies, and rolls a pair back to its group point."""

    def __init__(self, context: PairContext) -> None:
        self.context = context
        self.points = context.group_points
        self._batches: dict[str, asyncio.Lock] = {}
        self._frozen: set[str] = set()

    @contextlib.asynccontextmanager
    async def batch(self, pair: Pair) -> AsyncIterator[None]:
        """Around one stream message applied: a rollback waits for it, and none starts during one."""
        if pair.name in self._frozen:
            raise FailedPrecondition(f"pair {pair.name!r} is being taken over on system "
                                     f"{self.context.system.system_id}; replicated writes are not accepted")
        lock = self._batches.setdefault(pair.name, asyncio.Lock())
        async with lock:
            yield

    async def roll_back(self, pairs: list[Pair]) -> dict[str, RolledBack]:
        """At a takeover, before the role changes: these mirror ends back to their group's point.

        Their streams apply nothing from the first rollback to the return
        (the caller changes the roles with no await after it)."""
        held = [p for p in pairs if p.mirror is not None and self.points.log(p.name) is not None]
        self._frozen.update(p.name for p in held)
        try:
            return {p.name: await self._roll_back(p) for p in held}
        finally:
            self._frozen.difference_update(p.name for p in held)

    async def _roll_back(self, pair: Pair) -> RolledBack:
        end = pair.mirror
        assert end is not None
        async with self._batches.setdefault(pair.name, asyncio.Lock()):  # a batch being applied ends first
            plan = self.points.rollback(pair.name)
            assert plan is not None
            vol = end.volume
            tracks = TrackBitmap(vol.tracks)
            if plan.undo and not plan.overflowed:
                await self.context.system.write_ops(vol, [WriteOp(u.offset, u.before) for u in plan.undo],
                                                    replicated=True)
                for u in plan.undo:
                    tracks.mark_bytes(u.offset, len(u.before), vol.track_size)
                end.bitmap.update(tracks)
            self.points.forget(pair.name)
            if plan.point_seq:
                pair.applied_seq = plan.point_seq
        if plan.overflowed:
            log.warning("pair %s: its pre-images outgrew the budget (%d bytes); it is taken over where its stream "
                        "stopped, not at the group's point", pair.name, self.points.budget)
        elif tracks:
            log.warning("pair %s: %d tracks rolled back to group %s's cut %d (sequence %d)", pair.name, len(tracks),
                        pair.row.group, plan.point, plan.point_seq)
        return RolledBack(plan.point, plan.point_seq, tracks, plan.overflowed)
