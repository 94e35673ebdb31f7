"""Group cuts at the primary: common points of an async consistency group's write order.

Each async pair has its own stream, applied at the mirror at its own pace,
so without help a consistency group's volumes reach the mirror at different
points of the host's write order (a database's log ahead of its data).  The
primary therefore marks common points: after a step of the event loop in
which writes were queued for an async pair of a group, it pushes one
:class:`~splitmirror.replication.queue.GroupCut` into the stream of every
async pair of that group that mirrors, with no await between the pushes.
Each stream then holds before the cut exactly the writes queued before it,
in every stream alike.  The mirror end keeps what it applies after the
last cut every stream of the group delivered undoable, and a takeover
rolls the group back to that cut (:mod:`splitmirror.pairs.group_point`).

Cuts are taken once per loop step and group, not per write: a cut costs one
33-byte entry per stream.
"""

from __future__ import annotations

import asyncio
import time

from ..pairstate.index import PairIndex
from ..pairstate.pair import Pair
from ..replication.queue import GroupCut
from ..status import PairStatus


def cut_member(pair: Pair) -> bool:
    """An async remote pair of a group whose primary end is here and mirrors now."""
    row = pair.row
    return (pair.primary is not None and pair.channel is not None and row.mode == "async" and bool(row.group)
            and row.copy_type == "REMOTE" and row.status is PairStatus.DUPLEX and row.direction == "forward")


class GroupCuts:
    """Takes the cuts of the async consistency groups whose primary ends are here."""

    def __init__(self, pairs: PairIndex) -> None:
        self.pairs = pairs
        # Cut numbers only grow, across restarts too: they start at the clock.
        self._next = time.time_ns()
        self._due: set[str] = set()
        self.taken = 0

    def touch(self, group: str) -> None:
        """Writes were queued for an async pair of ``group``: cut it at the end of this loop step."""
        if group in self._due:
            return
        if not self._due:
            asyncio.get_running_loop().call_soon(self._cut_all)
        self._due.add(group)

    def _cut_all(self) -> None:
        due, self._due = self._due, set()
        for group in sorted(due):
            self.cut(group)

    def cut(self, group: str) -> int:
        """Push one cut into every mirroring async stream of ``group`` now; its number (0: no member)."""
        members = [p for p in self.pairs.in_group(group) if cut_member(p)]
        if not members:
            return 0
        number = self._next
        self._next += 1
        cut = GroupCut(number, len(members))
        for pair in members:  # no await: one point of every stream's order
            assert pair.channel is not None
            pair.channel.push(0, cut=cut)
        self.taken += 1
        return number
