"""Applying a status transition to the ends of a pair held here.

The state machine (:mod:`splitmirror.status`) says what the next status is,
or refuses; this applies it to every end this system holds, in memory and
without an await (callers persist the rows), and logs the change.
"""

from __future__ import annotations

import logging

from ..clock import utc_now
from ..eventsink import STATUS, DiscardEvents, Event, EventSink, current_cause
from ..pairstate.pair import Pair
from ..status import PairOp, PairStatus, transition

log = logging.getLogger("splitmirror.pairs")


#: Why a status changed when the caller names no reason: commands come from
#: an operator unless :func:`~splitmirror.eventsink.caused_by` says otherwise.
DEFAULT_REASONS = {PairOp.CREATE: "operator", PairOp.SPLIT: "operator", PairOp.RESYNC: "operator",
                   PairOp.DELETE: "operator", PairOp.COPY_DONE: "copy complete", PairOp.FAULT: "fault",
                   PairOp.TAKEOVER: "operator", PairOp.FENCE: "the other end took over"}


def apply_transition(pair: Pair, op: PairOp, reason: str = "", events: EventSink | None = None) -> bool:
    """Apply a transition to every end held here (in memory, no await), and
    report a change to ``events``.

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
        pair.status_changes += 1
        log.info("pair %s: %s -> %s%s", pair.name, old.value, new.value, f" ({reason})" if reason else "")
        why = reason or (op is not PairOp.COPY_DONE and current_cause()) or DEFAULT_REASONS[op]
        held = pair.primary or pair.mirror
        (events or DiscardEvents()).emit(Event(
            STATUS, pair=pair.name, volume=held.volume.name if held else "", peer=pair.peer_id if pair.remote else 0,
            op=op.value, old_status=old.value, status=new.value, reason=why))
    return new is not old
