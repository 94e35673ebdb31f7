"""The group point's bookkeeping at the mirror end (sans-I/O): pre-images, cuts, rollback plans."""

from __future__ import annotations

from splitmirror.pairs.group_point import GroupPoints, Undo
from splitmirror.replication.queue import GroupCut


def test_a_complete_cut_drops_what_came_before_it_at_every_member() -> None:
    g = GroupPoints()
    for pair in ("data", "log"):
        assert g.room(pair, "g", 4)
    g.keep("data", 0, b"d0")
    assert not g.applied_cut("data", "g", GroupCut(10, 2), seq=5)  # log has not reached it
    g.keep("data", 8, b"d1")  # after the cut: undone at a takeover
    g.keep("log", 0, b"l0")
    assert g.kept_bytes == 6
    # Before the log applies cut 10, a takeover returns both to where they began.
    plan = g.rollback("data")
    assert plan is not None and plan.undo == [Undo(8, b"d1"), Undo(0, b"d0")] and plan.point == 0
    assert g.applied_cut("log", "g", GroupCut(10, 2), seq=3)  # complete now
    data, log = g.rollback("data"), g.rollback("log")
    assert data is not None and data.undo == [Undo(8, b"d1")] and (data.point, data.point_seq) == (10, 5)
    assert log is not None and log.undo == [] and (log.point, log.point_seq) == (10, 3)
    assert g.kept_bytes == 2 and g.complete["g"] == 10


def test_cuts_complete_in_any_order_of_arrival_and_groups_stay_apart() -> None:
    g = GroupPoints()
    for pair, group in (("a", "g1"), ("b", "g1"), ("c", "g2")):
        g.room(pair, group, 1)
        g.keep(pair, 0, b"x")
    assert not g.applied_cut("b", "g1", GroupCut(1, 2), seq=1)
    assert g.applied_cut("c", "g2", GroupCut(2, 1), seq=1)  # a group of one completes at once
    rollback_a = g.rollback("a")
    assert rollback_a is not None and rollback_a.undo == [Undo(0, b"x")]  # g2's cut is not g1's
    assert g.applied_cut("a", "g1", GroupCut(1, 2), seq=9)
    assert g.complete == {"g1": 1, "g2": 2} and g.kept_bytes == 0


def test_a_stream_that_never_delivers_a_cut_does_not_hold_the_later_ones() -> None:
    g = GroupPoints()
    g.applied_cut("a", "g", GroupCut(1, 2), seq=1)  # b's stream broke before cut 1
    g.room("a", "g", 1)
    g.keep("a", 0, b"y")
    assert g.applied_cut("a", "g", GroupCut(2, 1), seq=3)  # cut 2 was taken without b
    plan = g.rollback("a")
    assert plan is not None and plan.undo == [] and plan.point == 2


def test_the_budget_turns_a_pair_into_one_that_cannot_roll_back_until_the_next_complete_cut() -> None:
    g = GroupPoints(budget=10)
    assert g.room("a", "g", 8)
    g.keep("a", 0, b"12345678")
    assert not g.room("a", "g", 8)  # over budget: its pre-images are dropped
    assert g.kept_bytes == 0
    plan = g.rollback("a")
    assert plan is not None and plan.overflowed and plan.undo == []
    assert not g.room("a", "g", 1)  # stays so ...
    g.applied_cut("a", "g", GroupCut(5, 1), seq=7)
    assert g.room("a", "g", 1)  # ... until a cut completes
    plan = g.rollback("a")
    assert plan is not None and not plan.overflowed and plan.point == 5


def test_forget_returns_the_bytes() -> None:
    g = GroupPoints()
    g.room("a", "g", 3)
    g.keep("a", 0, b"abc")
    g.forget("a")
    assert g.kept_bytes == 0 and g.rollback("a") is None
