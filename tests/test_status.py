"""The pair state machine in :mod:`splitmirror.status`: the table is the whole truth."""

from __future__ import annotations

import itertools

import grpc
import pytest

from splitmirror.errors import FailedPrecondition
from splitmirror.status import (
    MIRRORING,
    TRACKING,
    TRANSITIONS,
    PairOp,
    PairStatus,
    allowed_from,
    mirror_end_writable,
    transition,
)

ALL_PAIRS = list(itertools.product(PairStatus, PairOp))
ILLEGAL = [(s, op) for (s, op) in ALL_PAIRS if (s, op) not in TRANSITIONS]

#: The transitions the design asks for, written out independently of the table.
EXPECTED: dict[tuple[PairStatus, PairOp], PairStatus] = {
    (PairStatus.SIMPLEX, PairOp.CREATE): PairStatus.COPY,
    (PairStatus.COPY, PairOp.COPY_DONE): PairStatus.DUPLEX,
    (PairStatus.DUPLEX, PairOp.SPLIT): PairStatus.SPLIT,
    (PairStatus.SPLIT, PairOp.RESYNC): PairStatus.COPY,
    (PairStatus.SUSPENDED, PairOp.RESYNC): PairStatus.COPY,
    (PairStatus.COPY, PairOp.FAULT): PairStatus.SUSPENDED,
    (PairStatus.DUPLEX, PairOp.FAULT): PairStatus.SUSPENDED,
    (PairStatus.SUSPENDED, PairOp.FAULT): PairStatus.SUSPENDED,
    (PairStatus.SPLIT, PairOp.FAULT): PairStatus.SPLIT,
    (PairStatus.COPY, PairOp.DELETE): PairStatus.SIMPLEX,
    (PairStatus.DUPLEX, PairOp.DELETE): PairStatus.SIMPLEX,
    (PairStatus.SPLIT, PairOp.DELETE): PairStatus.SIMPLEX,
    (PairStatus.SUSPENDED, PairOp.DELETE): PairStatus.SIMPLEX,
    # Issue 18: a takeover holds the new primary SPLIT (no automatic resync);
    # the fenced old primary waits SUSPENDED for the operator's resync.
    (PairStatus.DUPLEX, PairOp.TAKEOVER): PairStatus.SPLIT,
    (PairStatus.SUSPENDED, PairOp.TAKEOVER): PairStatus.SPLIT,
    (PairStatus.SPLIT, PairOp.TAKEOVER): PairStatus.SPLIT,
    (PairStatus.COPY, PairOp.FENCE): PairStatus.SUSPENDED,
    (PairStatus.DUPLEX, PairOp.FENCE): PairStatus.SUSPENDED,
    (PairStatus.SPLIT, PairOp.FENCE): PairStatus.SUSPENDED,
    (PairStatus.SUSPENDED, PairOp.FENCE): PairStatus.SUSPENDED,
}


def test_table_matches_design() -> None:
    assert TRANSITIONS == EXPECTED


def test_table_keys_and_values_are_enums() -> None:
    for (status, op), nxt in TRANSITIONS.items():
        assert isinstance(status, PairStatus)
        assert isinstance(op, PairOp)
        assert isinstance(nxt, PairStatus)


def test_there_are_illegal_pairs() -> None:
    assert len(ILLEGAL) == len(ALL_PAIRS) - len(TRANSITIONS) > 0


@pytest.mark.parametrize(("status", "op"), list(TRANSITIONS), ids=lambda v: str(v))
def test_every_entry_is_legal(status: PairStatus, op: PairOp) -> None:
    assert transition("p1", status, op) is TRANSITIONS[(status, op)]


@pytest.mark.parametrize(("status", "op"), ILLEGAL, ids=lambda v: str(v))
def test_every_missing_entry_is_refused(status: PairStatus, op: PairOp) -> None:
    with pytest.raises(FailedPrecondition) as info:
        transition("pair-xyz", status, op)
    err = info.value
    msg = str(err)
    assert "pair-xyz" in msg
    assert status.value in msg
    assert op.value in msg
    assert err.message == msg
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION
    # The hint lists exactly the statuses the operation is allowed from.
    for allowed in allowed_from(op):
        assert allowed.value in msg


def test_refusal_lists_allowed_statuses() -> None:
    # CREATE is only allowed from SIMPLEX; the message says so.
    with pytest.raises(FailedPrecondition, match=r"cannot create \(allowed from SIMPLEX\)"):
        transition("p", PairStatus.DUPLEX, PairOp.CREATE)


def test_allowed_from() -> None:
    assert allowed_from(PairOp.CREATE) == [PairStatus.SIMPLEX]
    assert set(allowed_from(PairOp.RESYNC)) == {PairStatus.SPLIT, PairStatus.SUSPENDED}
    assert set(allowed_from(PairOp.DELETE)) == set(PairStatus) - {PairStatus.SIMPLEX}
    for op in PairOp:
        assert set(allowed_from(op)) == {s for (s, o) in TRANSITIONS if o is op}


def test_simplex_only_accepts_create() -> None:
    for op in PairOp:
        if op is PairOp.CREATE:
            continue
        with pytest.raises(FailedPrecondition):
            transition("p", PairStatus.SIMPLEX, op)


def test_full_lifecycle() -> None:
    s = PairStatus.SIMPLEX
    for op, want in [
        (PairOp.CREATE, PairStatus.COPY),
        (PairOp.COPY_DONE, PairStatus.DUPLEX),
        (PairOp.SPLIT, PairStatus.SPLIT),
        (PairOp.FAULT, PairStatus.SPLIT),
        (PairOp.RESYNC, PairStatus.COPY),
        (PairOp.FAULT, PairStatus.SUSPENDED),
        (PairOp.RESYNC, PairStatus.COPY),
        (PairOp.COPY_DONE, PairStatus.DUPLEX),
        (PairOp.DELETE, PairStatus.SIMPLEX),
    ]:
        s = transition("p", s, op)
        assert s is want


@pytest.mark.parametrize(
    ("status", "writable"),
    [
        (PairStatus.SIMPLEX, True),
        (PairStatus.COPY, False),
        (PairStatus.DUPLEX, False),
        (PairStatus.SPLIT, True),
        (PairStatus.SUSPENDED, False),  # a fault never makes an SPVOL host-writable (issue 18)
    ],
)
def test_mirror_end_writable(status: PairStatus, writable: bool) -> None:
    assert mirror_end_writable(status) is writable


def test_tracking_and_mirroring_partition_the_paired_statuses() -> None:
    assert not TRACKING & MIRRORING
    paired = set(PairStatus) - {PairStatus.SIMPLEX}
    assert paired == TRACKING | MIRRORING
    for status in PairStatus:
        assert mirror_end_writable(status) is (status in (PairStatus.SPLIT, PairStatus.SIMPLEX))


def test_enum_string_values() -> None:
    assert PairStatus("SPLIT") is PairStatus.SPLIT
    assert PairOp("copy-done") is PairOp.COPY_DONE
    assert str(PairStatus.DUPLEX) == "DUPLEX"
