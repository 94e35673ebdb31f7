"""The role rule of issue 18, without daemons: :func:`decide` and what an SPVOL refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.pairs.roles import Decision, decide
from splitmirror.pairstate.pair import Pair, PairEnd, spvol_refusal
from splitmirror.status import PairStatus
from splitmirror.storage.bitmap import TrackBitmap
from splitmirror.storage.copytable import PairRow, RoleRecord
from splitmirror.storage.volume import Volume

D = Decision


@pytest.mark.parametrize(("mine", "i_primary", "theirs", "they_primary", "want"), [
    (1, True, 2, True, D.FENCE),         # the other end took over: I lost the role
    (1, False, 2, True, D.ADOPT),        # I am the mirror of a newer primary
    (1, False, 2, False, D.PROMOTE),     # the other end gave me the role (a swap it finished its half of)
    (1, True, 2, False, D.ADOPT),        # my role is right at the newer epoch
    (2, True, 1, True, D.KEEP),          # the other end is behind: it acts, not me
    (2, False, 1, False, D.KEEP),
    (3, True, 3, False, D.KEEP),         # agreement
    (3, False, 3, True, D.KEEP),
    (3, True, 3, True, D.CONFLICT),      # both primary at one epoch: both refuse writes
    (3, False, 3, False, D.NO_PRIMARY),  # both mirror: an operator takes over at one end
])
def test_decide(mine: int, i_primary: bool, theirs: int, they_primary: bool, want: Decision) -> None:
    assert decide(mine, i_primary, theirs, they_primary) is want


def test_the_rule_never_leaves_two_primaries() -> None:
    """Whatever two ends hold, after each applies the rule at most one is primary
    and writable (a conflict refuses writes at both)."""
    for a_epoch in range(1, 4):
        for b_epoch in range(1, 4):
            for a_primary in (True, False):
                for b_primary in (True, False):
                    da = decide(a_epoch, a_primary, b_epoch, b_primary)
                    db = decide(b_epoch, b_primary, a_epoch, a_primary)
                    a_after = (a_primary and da is not D.FENCE) or da is D.PROMOTE
                    b_after = (b_primary and db is not D.FENCE) or db is D.PROMOTE
                    writable = [p for p, d in ((a_after, da), (b_after, db)) if p and d is not D.CONFLICT]
                    assert len(writable) <= 1, (a_epoch, a_primary, b_epoch, b_primary, da, db)


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Volume]:
    v = Volume.create("v", tmp_path / "v.vol", 16 * 4096, 4096)
    yield v
    v.close()


def mirror_pair(vol: Volume, status: PairStatus, role: RoleRecord | None = None) -> Pair:
    pair = Pair("p")
    row = PairRow("p", vol.name, "REMOTE", 1001, "pv", False, status, "sync", "", epoch=2,
                  role=role or RoleRecord())
    pair.mirror = PairEnd(row, vol, TrackBitmap(vol.tracks))
    return pair


def test_a_suspended_spvol_refuses_and_names_takeover(vol: Volume) -> None:
    refusal = spvol_refusal(vol, mirror_pair(vol, PairStatus.SUSPENDED))
    assert refusal is not None and "SUSPENDED" in refusal and "pair takeover p" in refusal, refusal
    assert spvol_refusal(vol, mirror_pair(vol, PairStatus.SPLIT)) is None  # an operator's split
    for status in (PairStatus.COPY, PairStatus.DUPLEX):
        assert spvol_refusal(vol, mirror_pair(vol, status)) is not None


def test_a_fenced_old_primary_names_the_new_one_even_when_split(vol: Volume) -> None:
    for status in (PairStatus.SUSPENDED, PairStatus.SPLIT):
        refusal = spvol_refusal(vol, mirror_pair(vol, status, RoleRecord(how="fenced", fenced_by=2001)))
        assert refusal is not None and "fenced" in refusal and "system 2001" in refusal and "epoch 2" in refusal
