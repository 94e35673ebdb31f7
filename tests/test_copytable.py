"""The SQLite copy management table: everything written survives close and reopen."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from splitmirror.status import PairStatus
from splitmirror.storage.bitmap import TrackBitmap
from splitmirror.storage.copytable import CopyTable, PairRow, RoleRecord, VolumeRow

TRACKS = 1024


@pytest.fixture
async def table(tmp_path: Path) -> AsyncIterator[CopyTable]:
    t = CopyTable(tmp_path / "copytable.sqlite")
    await t.open()
    yield t
    if t._db is not None:
        await t.close()


async def reopen(t: CopyTable) -> CopyTable:
    await t.close()
    fresh = CopyTable(t.path)
    await fresh.open()
    return fresh


def pair_row(**over: Any) -> PairRow:
    row = PairRow(
        name="pair-a",
        volume="vol1",
        copy_type="REMOTE",
        pair_system_id=2001,
        mirror_volume="vol1-mirror",
        primary=True,
        status=PairStatus.SPLIT,
        mode="async",
        group="cg1",
        split_time="2024-05-01T12:00:00+00:00",
        reason="backup gen1",
        direction="reverse",
    )
    return dataclasses.replace(row, **over)


# ---------------------------------------------------------------------- volumes


async def test_volumes_add_load_remove(table: CopyTable) -> None:
    assert await table.load_volumes() == []
    v2 = VolumeRow("vol2", 1 << 30, 8192, "2024-01-02T00:00:00")
    v1 = VolumeRow("vol1", 1 << 20, 4096, "2024-01-01T00:00:00")
    await table.add_volume(v2)
    await table.add_volume(v1)
    assert await table.load_volumes() == [v1, v2]  # ordered by name
    await table.remove_volume("vol1")
    assert await table.load_volumes() == [v2]
    await table.remove_volume("does-not-exist")
    assert await table.load_volumes() == [v2]


async def test_add_volume_twice_fails(table: CopyTable) -> None:
    v = VolumeRow("vol1", 1 << 20, 4096, "now")
    await table.add_volume(v)
    with pytest.raises(Exception, match="UNIQUE"):
        await table.add_volume(v)
    assert await table.load_volumes() == [v]


async def test_remove_volume_drops_its_intent(table: CopyTable) -> None:
    await table.add_volume(VolumeRow("vol1", 1 << 20, 4096, "now"))
    await table.add_intent("vol1", [1, 2])
    await table.add_intent("vol2", [3])
    await table.remove_volume("vol1")
    assert await table.load_intent() == {"vol2": {3}}


# ---------------------------------------------------------------------- pairs


async def test_pair_round_trip_every_field(table: CopyTable) -> None:
    row = pair_row()
    await table.save_pair(row)
    [back] = await table.load_pairs()
    assert back == row
    assert isinstance(back.status, PairStatus)
    assert back.primary is True
    assert back.key == ("pair-a", "vol1")


async def test_role_epoch_and_record_survive_reopen(table: CopyTable) -> None:
    row = pair_row(epoch=7, role=RoleRecord(how="takeover", since="2026-12-03T10:00:00+00:00", seq=42,
                                            fenced_by=1001, divergent="db-divergent-x", swap="demoted"))
    await table.save_pair(row)
    table = await reopen(table)
    [back] = await table.load_pairs()
    assert back == row and back.epoch == 7 and back.role.seq == 42
    await table.save_pair(pair_row())
    [plain] = await table.load_pairs()
    assert plain.epoch == 1 and plain.role == RoleRecord()
    await table.close()


async def test_a_copy_table_without_role_columns_gains_them(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE pairs (name TEXT NOT NULL, volume TEXT NOT NULL, copy_type TEXT NOT NULL,"
               " pair_system_id INTEGER NOT NULL, mirror_volume TEXT NOT NULL, is_primary INTEGER NOT NULL,"
               " status TEXT NOT NULL, mode TEXT NOT NULL, grp TEXT NOT NULL, split_time TEXT,"
               " reason TEXT NOT NULL DEFAULT '', direction TEXT NOT NULL DEFAULT 'forward', backup_time TEXT,"
               " backup_seq INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (name, volume))")
    db.execute("INSERT INTO pairs VALUES ('p', 'v', 'REMOTE', 2001, 'w', 1, 'DUPLEX', 'sync', '', NULL, '',"
               " 'forward', NULL, 0)")
    db.commit()
    db.close()
    t = CopyTable(path)
    await t.open()
    try:
        [row] = await t.load_pairs()
        assert row.epoch == 1 and row.role == RoleRecord() and row.status is PairStatus.DUPLEX
    finally:
        await t.close()


async def test_pair_defaults_and_none_split_time(table: CopyTable) -> None:
    row = PairRow("p", "v", "LOCAL", 1, "m", False, PairStatus.DUPLEX, "sync", "")
    await table.save_pair(row)
    [back] = await table.load_pairs()
    assert back == row
    assert back.split_time is None
    assert back.reason == ""
    assert back.direction == "forward"
    assert back.primary is False


async def test_pair_every_status_round_trips(table: CopyTable) -> None:
    for i, status in enumerate(PairStatus):
        await table.save_pair(pair_row(name=f"p{i}", status=status))
    back = {r.name: r.status for r in await table.load_pairs()}
    assert back == {f"p{i}": s for i, s in enumerate(PairStatus)}


async def test_save_pair_replaces_same_key(table: CopyTable) -> None:
    await table.save_pair(pair_row())
    updated = pair_row(status=PairStatus.COPY, split_time=None, reason="", direction="forward")
    await table.save_pair(updated)
    assert await table.load_pairs() == [updated]


async def test_both_ends_of_a_pair_kept_primary_first(table: CopyTable) -> None:
    secondary = pair_row(volume="b-svol", primary=False)
    primary = pair_row(volume="z-pvol", primary=True)
    await table.save_pair(secondary)
    await table.save_pair(primary)
    assert await table.load_pairs() == [primary, secondary]


async def test_remove_pair_removes_its_bitmap(table: CopyTable) -> None:
    await table.save_pair(pair_row())
    await table.save_pair(pair_row(volume="vol2"))
    await table.save_bitmap("pair-a", "vol1", TrackBitmap(TRACKS, [1, 2, 3]))
    await table.add_runs("pair-a", "vol1", [(100, 5)])
    await table.save_bitmap("pair-a", "vol2", TrackBitmap(TRACKS, [7]))
    await table.add_runs("pair-a", "vol2", [(50, 2)])

    await table.remove_pair("pair-a", "vol1")

    assert [r.volume for r in await table.load_pairs()] == ["vol2"]
    assert len(await table.load_bitmap("pair-a", "vol1", TRACKS)) == 0
    # The other end is untouched.
    assert set(await table.load_bitmap("pair-a", "vol2", TRACKS)) == {7, 50, 51}
    table = await reopen(table)
    try:
        assert len(await table.load_bitmap("pair-a", "vol1", TRACKS)) == 0
    finally:
        await table.close()


# ---------------------------------------------------------------------- bitmaps


async def test_missing_bitmap_is_empty(table: CopyTable) -> None:
    bm = await table.load_bitmap("nope", "vol", TRACKS)
    assert bm.tracks == TRACKS
    assert len(bm) == 0


async def test_save_bitmap_then_add_runs_gives_union(table: CopyTable) -> None:
    base = TrackBitmap(TRACKS, [0, 1, 2, 500, TRACKS - 1])
    await table.save_bitmap("p", "v", base)
    await table.add_runs("p", "v", [(2, 3), (600, 10)])
    await table.add_runs("p", "v", [(TRACKS - 2, 2)])
    got = await table.load_bitmap("p", "v", TRACKS)
    want = base.copy()
    want.add_range(2, 5)
    want.add_range(600, 610)
    want.add_range(TRACKS - 2, TRACKS)
    assert got == want


async def test_add_runs_without_saved_bitmap(table: CopyTable) -> None:
    await table.add_runs("p", "v", [(10, 2)])
    assert list(await table.load_bitmap("p", "v", TRACKS)) == [10, 11]


async def test_add_runs_empty_is_harmless(table: CopyTable) -> None:
    await table.add_runs("p", "v", [])
    assert len(await table.load_bitmap("p", "v", TRACKS)) == 0


async def test_save_bitmap_compacts_runs(table: CopyTable) -> None:
    await table.add_runs("p", "v", [(1, 1), (5, 1)])
    # The caller folded the runs it wanted to keep into the bitmap it saves.
    await table.save_bitmap("p", "v", TrackBitmap(TRACKS, [5]))
    assert list(await table.load_bitmap("p", "v", TRACKS)) == [5]
    await table.save_bitmap("p", "v", TrackBitmap(TRACKS))
    assert len(await table.load_bitmap("p", "v", TRACKS)) == 0


async def test_bitmaps_are_per_pair_and_volume(table: CopyTable) -> None:
    await table.add_runs("p", "v1", [(1, 1)])
    await table.add_runs("p", "v2", [(2, 1)])
    await table.add_runs("q", "v1", [(3, 1)])
    assert list(await table.load_bitmap("p", "v1", TRACKS)) == [1]
    assert list(await table.load_bitmap("p", "v2", TRACKS)) == [2]
    assert list(await table.load_bitmap("q", "v1", TRACKS)) == [3]


async def test_concurrent_add_runs_all_durable(table: CopyTable) -> None:
    runs = [(i * 7, 1 + i % 4) for i in range(50)]
    await table.save_bitmap("p", "v", TrackBitmap(TRACKS, [TRACKS - 1]))
    await asyncio.gather(*(table.add_runs("p", "v", [r]) for r in runs))
    # Interleave with another pair too, in one burst.
    await asyncio.gather(*(table.add_runs("q" if i % 2 else "p", "v", [(900 + i, 1)]) for i in range(50)))

    table = await reopen(table)
    try:
        got_p = await table.load_bitmap("p", "v", TRACKS)
        got_q = await table.load_bitmap("q", "v", TRACKS)
    finally:
        await table.close()
    want_p = {TRACKS - 1} | {t for s, c in runs for t in range(s, s + c)} | {900 + i for i in range(0, 50, 2)}
    assert set(got_p) == want_p
    assert set(got_q) == {900 + i for i in range(1, 50, 2)}


async def test_add_runs_callers_all_return_after_commit(table: CopyTable) -> None:
    done: list[int] = []

    async def one(i: int) -> None:
        await table.add_runs("p", "v", [(i, 1)])
        done.append(i)

    await asyncio.gather(*(one(i) for i in range(20)))
    assert sorted(done) == list(range(20))
    assert set(await table.load_bitmap("p", "v", TRACKS)) == set(range(20))


async def test_add_runs_survives_cancelled_leader(table: CopyTable) -> None:
    leader = asyncio.create_task(table.add_runs("p", "v", [(1, 1)]))
    await asyncio.sleep(0)  # the leader is now parked in its sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    await asyncio.wait_for(table.add_runs("p", "v", [(5, 1)]), 0.5)
    assert 5 in await table.load_bitmap("p", "v", TRACKS)


# ---------------------------------------------------------------------- meta


async def test_meta_get_set(table: CopyTable) -> None:
    assert await table.get_meta("system_id") is None
    await table.set_meta("system_id", "2001")
    assert await table.get_meta("system_id") == "2001"
    await table.set_meta("system_id", "2002")
    assert await table.get_meta("system_id") == "2002"
    await table.set_meta("other", "")
    assert await table.get_meta("other") == ""


# ---------------------------------------------------------------------- intent


async def test_intent_add_load_remove(table: CopyTable) -> None:
    assert await table.load_intent() == {}
    await table.add_intent("v1", [0, 1, 5])
    await table.add_intent("v1", [5, 6])  # duplicates ignored
    await table.add_intent("v2", [9])
    await table.add_intent("v3", [])
    assert await table.load_intent() == {"v1": {0, 1, 5, 6}, "v2": {9}}
    await table.remove_intent("v1", [1, 6, 99])
    assert await table.load_intent() == {"v1": {0, 5}, "v2": {9}}
    await table.remove_intent("v2", [9])
    assert await table.load_intent() == {"v1": {0, 5}}
    await table.remove_intent_all()
    assert await table.load_intent() == {}


# ---------------------------------------------------------------------- persistence


async def test_close_and_reopen_keeps_everything(table: CopyTable) -> None:
    vol = VolumeRow("vol1", 1 << 30, 8192, "2024-01-01T00:00:00")
    row = pair_row()
    bm = TrackBitmap(TRACKS, [3, 4, 5, 1000])
    await table.add_volume(vol)
    await table.save_pair(row)
    await table.save_bitmap(row.name, row.volume, bm)
    await table.add_runs(row.name, row.volume, [(10, 3)])
    await table.set_meta("k", "v")
    await table.add_intent("vol1", [2, 3])

    table = await reopen(table)
    try:
        assert await table.load_volumes() == [vol]
        assert await table.load_pairs() == [row]
        want = bm.copy()
        want.add_range(10, 13)
        assert await table.load_bitmap(row.name, row.volume, TRACKS) == want
        assert await table.get_meta("k") == "v"
        assert await table.load_intent() == {"vol1": {2, 3}}
    finally:
        await table.close()

    # And a second reopen still sees the same (nothing lost by checkpointing).
    again = CopyTable(table.path)
    await again.open()
    try:
        assert await again.load_pairs() == [row]
        assert await again.load_bitmap(row.name, row.volume, TRACKS) == want
    finally:
        await again.close()


async def test_calls_after_close_fail(tmp_path: Path) -> None:
    t = CopyTable(tmp_path / "c.sqlite")
    await t.open()
    await t.close()
    with pytest.raises(RuntimeError):
        await t.get_meta("x")
