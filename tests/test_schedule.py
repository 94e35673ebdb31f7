"""Backup schedules: rings, the timetable across a primaryd restart, the CLI."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path

import pytest

from client import Client, ClientError
from splitmirror.clock import timestamp_of
from splitmirror.testing import Site, wait_for, wait_status
from splitmirror.v1 import host_pb2
from tests.faultproxy import ProxyPair

MiB = 1 << 20
SLOT = re.compile(r"schedule (\S+): (\w+)(?: into (\S+))? for slot (\S+)")


async def scheduled_runs(c: Client) -> list[tuple[str, str, str, float, float, str]]:
    """(schedule, result, generations, slot, event time, reason) of every scheduled run, in order."""
    runs = []
    async for e in c.events():
        if e.kind == "backup" and e.op == "scheduled":
            found = SLOT.match(e.detail)
            assert found is not None, e.detail
            slot = timestamp_of(found[4])
            assert slot is not None
            runs.append((found[1], found[2], found[3] or "", slot, e.timestamp, e.reason))
    return runs


# Every run must be "done": a keepalive answered late on a loaded machine must not count as a lost link
# (which fails the run in progress, rightly); 5 s is the daemons' default.
@pytest.mark.link_timeout(5.0)
async def test_schedules_rotate_their_rings_across_a_restart(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    async with Client(primary.address) as c:
        await c.create_volume("db", 2 * MiB)
        await c.create_pair("p", "db", "db-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        for i in range(1, 6):
            secondary.cli("pair", "create", f"g{i}", "--pvol", "db-r", "--svol", f"s{i}", "--wait")
        await c.write("db", 0, b"a" * 8192)
        # Hourly-like into three generations, daily-like into two: disjoint rings.
        primary.cli("backup", "schedule", "set", "p", "--every", "2s", "--generations", "g1,g2,g3")
        primary.cli("backup", "schedule", "set", "p", "--every", "5s", "--generations", "g4,g5", "--name", "slow")
        with pytest.raises(ClientError) as err:
            await c.set_schedule(host_pb2.Schedule(pair="p", every_seconds=3, ring=["g3", "g4"]))
        assert err.value.code == "FAILED_PRECONDITION" and "uses g3" in err.value.message
        with pytest.raises(ClientError) as err:
            await c.set_schedule(host_pb2.Schedule(pair="p", every_seconds=0.1))
        assert err.value.code == "INVALID_ARGUMENT" and "--every" in err.value.message
        bad = primary.cli("backup", "schedule", "set", "p", "--every", "soon", check=False)
        assert bad.returncode == 2 and "invalid duration 'soon'" in bad.stderr

        fast = "p-every-2s"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = await scheduled_runs(c)
            if sum(r[0] == fast for r in runs) >= 4 and any(r[0] == "slow" for r in runs):
                break
            await asyncio.sleep(0.3)
        runs = await scheduled_runs(c)
        fast_runs = [r for r in runs if r[0] == fast]
        assert all(r[1] == "done" for r in runs), runs
        # The ring rotates: g1, g2, g3, g1 ... and the slow ring stays in g4/g5.
        assert [r[2] for r in fast_runs[:4]] == ["p:g1", "p:g2", "p:g3", "p:g1"]
        assert {r[2] for r in runs if r[0] == "slow"} <= {"p:g4", "p:g5"}
        listing = await c.backup_listing("p")
        assert {s.name for s in listing.schedules} == {fast, "slow"}
        text = primary.cli("backups", "p").stdout
        assert fast in text and "done" in text

    # Down for more than two slots of the fast schedule.
    primary.stop()
    down = time.time()
    await asyncio.sleep(5.5)
    up = time.time()
    primary.start()
    wait_status(primary, "p", ["DUPLEX"], timeout=30)
    async with Client(primary.address) as c:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            later = [r for r in await scheduled_runs(c) if r[4] >= down and r[0] == fast]
            if len(later) >= 3:
                break
            await asyncio.sleep(0.3)
        assert len(later) >= 3, later
        # The slots missed while down ran once, at start: one run for a slot
        # before the restart, then the timetable goes on from there.
        missed = [r for r in later if r[3] < up]
        assert len(missed) == 1 and missed[0][3] < down + 2.5, later
        assert all(r[1] == "done" for r in later), later
        slots = [r[3] for r in later]
        assert slots == sorted(slots) and len(set(slots)) == len(slots)
        for a, b in itertools.pairwise(later):  # the timetable: whole slots of 2 s apart
            gap = (b[3] - a[3]) / 2
            assert gap >= 1 and abs(gap - round(gap)) < 0.01, (a, b)
        # The ring continues where it stopped, across the restart.
        before = [r[2] for r in (await scheduled_runs(c)) if r[0] == fast and r[4] < down]
        ring = ["p:g1", "p:g2", "p:g3"]
        expected = [ring[(ring.index(before[-1]) + 1 + i) % 3] for i in range(3)]
        assert [r[2] for r in later[:3]] == expected

        gone = primary.cli_json("backup", "schedule", "delete", "p")
        assert {s["name"] for s in gone} == {fast, "slow"}
        assert await c.list_schedules() == []


async def test_a_run_due_at_start_waits_until_the_pair_is_in_step(tmp_path: Path) -> None:
    """Right after primaryd starts its copy table still says DUPLEX, before the
    peer was asked (the secondary's end is SUSPENDED since the goodbye).  The
    run due at start waits until the pair is DUPLEX at both ends instead of
    preparing a backup that the reconnect then breaks.  A slow link (the proxy
    delays every chunk) stretches the reconnect so that a run that did not
    wait would prepare while the secondary's end is still SUSPENDED."""
    primary = Site("primary", 1001, tmp_path, link_timeout=10.0)
    secondary = Site("secondary", 2001, tmp_path, link_timeout=10.0)
    primary.peer_with(secondary)
    link = ProxyPair(primary, secondary)
    try:
        secondary.start()
        primary.start()
        async with Client(primary.address) as c:
            await c.create_volume("db", MiB)
            await c.create_pair("p", "db", "db-r", peer=2001)
            await c.wait_pair("p", timeout=30)
        for i in (1, 2):
            secondary.cli("pair", "create", f"g{i}", "--pvol", "db-r", "--svol", f"s{i}", "--wait")
        primary.cli("backup", "schedule", "set", "p", "--every", "3s", "--generations", "g1,g2")
        async with Client(primary.address) as c:  # both generations hold a backup: the next run resyncs one
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(r[1] == "done" for r in await scheduled_runs(c)) < 2:
                await asyncio.sleep(0.3)
        primary.stop()
        down = time.time()
        link.delay(0.3)
        await asyncio.sleep(3.5)  # a slot passes while primaryd is down
        primary.start()
        async with Client(primary.address) as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                later = [r for r in await scheduled_runs(c) if r[4] >= down]
                if later:
                    break
                await asyncio.sleep(0.3)
            assert later and later[0][1] == "done", later
        # At the secondary: the generation was prepared (resynced for the
        # backup) only once the remote pair's end was DUPLEX again.
        async with Client(secondary.address) as s:
            after = [e async for e in s.events() if e.timestamp >= down and e.kind == "status"]
        prepared = next(i for i, e in enumerate(after) if e.pair in ("g1", "g2") and "backup of pair p" in e.reason)
        mirror = [e.status for e in after[:prepared] if e.pair == "p"]
        assert mirror and mirror[-1] == "DUPLEX", after
    finally:
        link.close()
        for site in (primary, secondary):
            site.kill()


@pytest.mark.link_timeout(5.0)
async def test_a_clean_stop_lets_a_run_taking_its_backup_finish(sites: tuple[Site, Site], tmp_path: Path) -> None:
    """SIGTERM while a scheduled run is taking its backup (here: in its
    pre-hook): the run finishes, is recorded and said before primaryd exits,
    so the ring goes on from the generation it filled."""
    primary, secondary = sites
    started = tmp_path / "hook-started"
    async with Client(primary.address) as c:
        await c.create_volume("db", MiB)
        await c.create_pair("p", "db", "db-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        for i in (1, 2):
            secondary.cli("pair", "create", f"g{i}", "--pvol", "db-r", "--svol", f"s{i}", "--wait")
        await c.set_schedule(host_pb2.Schedule(pair="p", every_seconds=2, ring=["g1", "g2"],
                                               pre_hook=f"touch {started}; sleep 1"))
    wait_for(started.exists, 30, 0.05, "the scheduled run's pre-hook")
    primary.stop()
    down = time.time()
    primary.start()
    async with Client(primary.address) as c:
        runs = await scheduled_runs(c)
        before = [r for r in runs if r[4] < down]
        assert [r[1:3] for r in before] == [("done", "p:g1")], runs
        assert {(g.local_pair, bool(g.backup_time)) for g in await c.list_backups("p")} >= {("g1", True)}


def test_durations_and_slots() -> None:
    from client.cli.parser import duration
    from splitmirror.procedures.schedule import Schedule, anchor_of, duration_text

    assert duration("90") == 90 and duration("15m") == 900 and duration("1h30m") == 5400 and duration("1d") == 86400
    for bad in ("", "1x", "h", "1h-", "-1s"):
        with pytest.raises(Exception, match="invalid duration"):
            duration(bad)
    assert duration_text(3600) == "1h" and duration_text(2) == "2s" and duration_text(90) == "90s"
    # --at: slots at the time of day plus multiples of --every, from the day the schedule was set.
    day = 1_800_000_000 - 1_800_000_000 % 86400
    s = Schedule("s", "p", "", every=6 * 3600, anchor=anchor_of("00:30", day + 10 * 3600))
    assert s.anchor == day + 1800
    assert s.next_slot(day + 10 * 3600) == day + 12 * 3600 + 1800
    assert s.next_slot(day + 12 * 3600 + 1800) == day + 18 * 3600 + 1800  # strictly after


@pytest.mark.link_timeout(5.0)
async def test_group_schedule_backs_up_every_pair_at_one_point(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    async with Client(primary.address) as c:
        for v in ("v1", "v2"):
            await c.create_volume(v, MiB)
            await c.create_pair(f"{v}-pair", v, f"{v}-r", peer=2001, group="db")
        for v in ("v1", "v2"):
            await c.wait_pair(f"{v}-pair", timeout=30)
            for i in (1, 2):
                secondary.cli("pair", "create", f"{v}-g{i}", "--pvol", f"{v}-r", "--svol", f"{v}-s{i}", "--wait")
        primary.cli("backup", "schedule", "set", "--group", "db", "--every", "2s", "--generations",
                    "v1-g1,v1-g2,v2-g1,v2-g2")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(await scheduled_runs(c)) < 3:
            await asyncio.sleep(0.3)
        runs = await scheduled_runs(c)
        assert len(runs) >= 3 and all(r[1] == "done" for r in runs), runs
        # Each run backs up both pairs (one point), each into the oldest of its own generations.
        assert [r[2] for r in runs[:3]] == ["v1-pair:v1-g1,v2-pair:v2-g1", "v1-pair:v1-g2,v2-pair:v2-g2",
                                            "v1-pair:v1-g1,v2-pair:v2-g1"]
        listing = await c.backup_listing("v2-pair")
        assert [s.group for s in listing.schedules] == ["db"] and listing.schedules[0].last_result == "done"
        # backups --group: the generations of every pair of the group, and the group's schedule once.
        gens = primary.cli_json("backups", "--group", "db")
        assert sorted((g["remote_pair"], g["local_pair"]) for g in gens) == [
            ("v1-pair", "v1-g1"), ("v1-pair", "v1-g2"), ("v2-pair", "v2-g1"), ("v2-pair", "v2-g2")]
        text = primary.cli("backups", "--group", "db").stdout
        assert "PAIR" in text and "v1-pair" in text and "v2-g2" in text and text.count("db-every-2s") == 1, text
        nope = primary.cli("backups", "--group", "nope", check=False)
        assert nope.returncode == 1 and "consistency group 'nope' has no remote pair" in nope.stderr, nope.stderr
        both = primary.cli("backups", "v1-pair", "--group", "db", check=False)
        assert both.returncode != 0 and "not both" in both.stderr, both.stderr
        await c.delete_schedule(group="db")
        for _ in range(20):  # a run in flight when the schedule was deleted may still finish
            times = [sorted(g.backup_time for g in await c.list_backups(p)) for p in ("v1-pair", "v2-pair")]
            if times[0] == times[1]:
                break
            await asyncio.sleep(0.5)
        assert times[0] == times[1] and all(times[0])  # the same points for both pairs
