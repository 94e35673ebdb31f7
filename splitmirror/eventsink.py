"""What happened, as one record: the event, and where layers report it.

Every layer that changes something an operator watches (a pair's status, a
copy, a backup point, a restore step, a fence, a peer link) reports an
:class:`Event` to an :class:`EventSink`, synchronously and without an await,
so that reporting never changes when a status change takes effect.  The
storage system carries the sink (``StorageSystem.events``); the daemon wires
the implementation (:class:`splitmirror.observe.events.EventLog`, which
numbers, keeps and streams events).  Without it events are dropped.

:func:`caused_by` names why a command runs (an automatic resync, a backup, a
restore) for the status changes it makes, without threading a reason through
every call: it sets a context variable that tasks started inside inherit.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Protocol

# Kinds of events.
STATUS = "status"                    # a pair's status changed (op, old_status -> status, reason)
RESYNC_START = "resync-start"        # a copy (initial or resync) started: tracks to copy, direction
RESYNC_PROGRESS = "resync-progress"  # a running copy, at most every few seconds
RESYNC_FINISH = "resync-finish"      # a copy ended: reason done, interrupted, failed or stopped
BACKUP = "backup"                    # op point (fixed at the primary), taken (at the secondary), done, failed
RESTORE = "restore"                  # op: the restore step
FENCE = "fence"
UNFENCE = "unfence"
LINK_UP = "link-up"
LINK_DOWN = "link-down"
SPLIT_BRAIN = "split-brain"          # both ends written while suspended: an operator must choose
ROLE = "role"                        # a pair end's role changed: op takeover, fenced, swap, promoted; the epoch

KINDS = (STATUS, RESYNC_START, RESYNC_PROGRESS, RESYNC_FINISH, BACKUP, RESTORE, FENCE, UNFENCE, LINK_UP,
         LINK_DOWN, SPLIT_BRAIN, ROLE)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One event.  ``seq`` and ``timestamp`` are given by the log that keeps it."""

    kind: str
    pair: str = ""
    volume: str = ""
    peer: int = 0
    generation: str = ""
    op: str = ""
    old_status: str = ""
    status: str = ""
    reason: str = ""
    detail: str = ""
    tracks: int = 0
    bytes: int = 0
    progress: float = 0.0
    seq: int = 0
    timestamp: float = 0.0  # seconds since the epoch


class EventSink(Protocol):
    def emit(self, event: Event) -> None:
        """Take ``event`` now; never blocks, never raises."""
        ...


class DiscardEvents:
    """The sink of a storage system nobody observes."""

    def emit(self, event: Event) -> None:
        return None


_CAUSE: contextvars.ContextVar[str] = contextvars.ContextVar("splitmirror_event_cause", default="")


@contextlib.contextmanager
def caused_by(reason: str) -> Iterator[None]:
    """Status changes made inside (and in tasks started inside) give ``reason``
    unless they carry their own."""
    token = _CAUSE.set(reason)
    try:
        yield
    finally:
        _CAUSE.reset(token)


def current_cause() -> str:
    return _CAUSE.get()
