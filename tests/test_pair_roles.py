"""The role a storage system plays for a pair, and moving its end to the other role."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.errors import FailedPrecondition
from splitmirror.pairstate.pair import EndRole, Pair, PairEnd
from splitmirror.status import PairStatus
from splitmirror.storage.bitmap import TrackBitmap
from splitmirror.storage.copytable import PairRow
from splitmirror.storage.volume import Volume

TS = 4096


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Volume]:
    v = Volume.create("v", tmp_path / "v.vol", 16 * TS, TS)
    yield v
    v.close()


def end(vol: Volume, primary: bool, copy_type: str = "REMOTE") -> PairEnd:
    row = PairRow("p", vol.name, copy_type, 2001, "other", primary, PairStatus.SPLIT, "sync", "")
    bitmap = TrackBitmap(vol.tracks)
    bitmap.add_range(3, 5)
    return PairEnd(row, vol, bitmap)


def test_role_follows_the_end_held(vol: Volume) -> None:
    pair = Pair("p")
    pair.primary = end(vol, primary=True)
    assert pair.role is EndRole.PRIMARY
    pair.mirror, pair.primary = pair.primary, None
    assert pair.role is EndRole.MIRROR


def test_a_local_pair_is_driven_from_its_primary_end(vol: Volume) -> None:
    pair = Pair("p")
    pair.primary = end(vol, primary=True, copy_type="LOCAL")
    pair.mirror = end(vol, primary=False, copy_type="LOCAL")
    assert pair.role is EndRole.PRIMARY
    with pytest.raises(FailedPrecondition, match="local pair"):
        pair.move_end_to(EndRole.MIRROR)
    assert pair.primary is not None and pair.mirror is not None


def test_move_mirror_end_to_primary_and_back(vol: Volume) -> None:
    pair = Pair("p")
    held = end(vol, primary=False)
    pair.mirror = held
    pair.move_end_to(EndRole.PRIMARY)
    assert pair.role is EndRole.PRIMARY
    assert pair.primary is held and pair.mirror is None
    assert held.row.primary is True
    # The end keeps its volume, its pending bits and the rest of its row.
    assert held.volume is vol and list(held.bitmap) == [3, 4]
    assert (pair.status, pair.peer_id, pair.remote) == (PairStatus.SPLIT, 2001, True)

    pair.move_end_to(EndRole.MIRROR)
    assert pair.role is EndRole.MIRROR
    assert pair.mirror is held and pair.primary is None
    assert held.row.primary is False


def test_moving_to_the_role_held_changes_nothing(vol: Volume) -> None:
    pair = Pair("p")
    held = end(vol, primary=True)
    pair.primary = held
    pair.move_end_to(EndRole.PRIMARY)
    assert pair.primary is held and pair.mirror is None and held.row.primary is True


def test_a_pair_without_an_end_here_has_nothing_to_move() -> None:
    with pytest.raises(FailedPrecondition, match="no end"):
        Pair("p").move_end_to(EndRole.PRIMARY)
