"""The pair state machine: statuses, operations and every allowed transition.

This module is the only place that decides whether a pair may change status.
It is pure (no I/O): the pairs layer asks :func:`transition` for the next
status, applies it to the ends it holds (:mod:`splitmirror.pairs.transitions`)
and persists the result itself.
"""

from __future__ import annotations

import enum

from .errors import FailedPrecondition


class PairStatus(enum.StrEnum):
    SIMPLEX = "SIMPLEX"      # not mirrored
    COPY = "COPY"            # mirrored, copy (initial or resync) in progress
    DUPLEX = "DUPLEX"        # mirrored, identical
    SPLIT = "SPLIT"          # suspended on request, writes tracked
    SUSPENDED = "SUSPENDED"  # suspended by a fault, writes tracked


class PairOp(enum.StrEnum):
    CREATE = "create"        # start the initial copy
    COPY_DONE = "copy-done"  # the differential set is empty
    SPLIT = "split"
    RESYNC = "resync"
    FAULT = "fault"          # link loss, peer down, queue overflow
    DELETE = "delete"
    TAKEOVER = "takeover"    # the mirror end becomes the primary end (primary lost)
    FENCE = "fence"          # an old primary learnt that the other end took the role over


S, Op = PairStatus, PairOp

#: (status, operation) -> next status.  Anything missing is refused.
TRANSITIONS: dict[tuple[PairStatus, PairOp], PairStatus] = {
    (S.SIMPLEX, Op.CREATE): S.COPY,
    (S.COPY, Op.COPY_DONE): S.DUPLEX,
    (S.DUPLEX, Op.SPLIT): S.SPLIT,
    (S.SPLIT, Op.RESYNC): S.COPY,
    (S.SUSPENDED, Op.RESYNC): S.COPY,
    (S.COPY, Op.FAULT): S.SUSPENDED,
    (S.DUPLEX, Op.FAULT): S.SUSPENDED,
    (S.SUSPENDED, Op.FAULT): S.SUSPENDED,
    (S.SPLIT, Op.FAULT): S.SPLIT,  # already tracking: a fault changes nothing
    (S.COPY, Op.DELETE): S.SIMPLEX,
    (S.DUPLEX, Op.DELETE): S.SIMPLEX,
    (S.SPLIT, Op.DELETE): S.SIMPLEX,
    (S.SUSPENDED, Op.DELETE): S.SIMPLEX,
    # A takeover makes the mirror end a primary end holding its pair SPLIT:
    # host writes are tracked, and only an operator's resync copies again.
    (S.DUPLEX, Op.TAKEOVER): S.SPLIT,
    (S.SUSPENDED, Op.TAKEOVER): S.SPLIT,
    (S.SPLIT, Op.TAKEOVER): S.SPLIT,
    # The old primary, fenced, waits SUSPENDED for the new primary's resync.
    (S.COPY, Op.FENCE): S.SUSPENDED,
    (S.DUPLEX, Op.FENCE): S.SUSPENDED,
    (S.SPLIT, Op.FENCE): S.SUSPENDED,
    (S.SUSPENDED, Op.FENCE): S.SUSPENDED,
}

#: Statuses in which writes are tracked in the pending bitmap instead of
#: being mirrored.
TRACKING = frozenset({S.SPLIT, S.SUSPENDED})

#: Statuses in which the mirror end (SPVOL, SVOL) receives the copy and so
#: must not be written by hosts.
MIRRORING = frozenset({S.COPY, S.DUPLEX})


def allowed_from(op: PairOp) -> list[PairStatus]:
    return [status for (status, o) in TRANSITIONS if o is op]


def transition(pair: str, status: PairStatus, op: PairOp) -> PairStatus:
    """Next status of ``pair`` after ``op``, or FailedPrecondition."""
    try:
        return TRANSITIONS[(status, op)]
    except KeyError:
        allowed = ", ".join(s.value for s in allowed_from(op)) or "no status"
        raise FailedPrecondition(
            f"pair {pair!r} is {status.value}; cannot {op.value} (allowed from {allowed})"
        ) from None


def mirror_end_writable(status: PairStatus) -> bool:
    """May hosts write the secondary end (SPVOL, SVOL) of a pair in ``status``?

    An SVOL is never host-writable whatever this says; an SPVOL only after
    an operator's split (SPLIT) - never merely because a fault suspended
    its pair (a takeover makes it a primary end instead).
    """
    return status is S.SPLIT or status is S.SIMPLEX
