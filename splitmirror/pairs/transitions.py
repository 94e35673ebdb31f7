"""Applying a status transition to the ends of a pair held here.

The state machine (:mod:`splitmirror.status`) says what the next status is,
or refuses; this applies it to every end this system holds, in memory and
without an await (callers persist the rows), and logs the change.
"""

from __future__ import annotations

import logging

from ..clock import utc_now
from ..pairstate.pair import Pair
from ..status import PairOp, PairStatus, transition

log = logging.getLogger("splitmirror.pairs")


def apply_transition(pair: Pair, op: PairOp, reason: str = "") -> bool:
    """Apply a transition to every end held here (in memory, no await).

    Returns whether the status changed.
    """
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
