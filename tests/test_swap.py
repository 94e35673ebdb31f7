"""Planned switchover (issue 18): ``pair swap`` reverses the roles with no data copied; again = failback."""

from __future__ import annotations

import json
import os

from client import Client, ClientError
from splitmirror.testing import Site, wait_status

MiB = 1 << 20
TRACK = 8192


def role_ops(site: Site) -> list[str]:
    lines = site.cli("--json", "events").stdout.splitlines()
    return [str(e["op"]) for e in map(json.loads, lines) if e["kind"] == "role"]


def sent(site: Site) -> int:
    return sum(p["resync_tracks_sent"] for p in site.cli_json("stats")["pairs"])


async def test_swap_and_failback_of_a_group(sites: tuple[Site, Site]) -> None:
    a, b = sites
    for vol, mode in (("v1", "sync"), ("v2", "async")):
        a.cli("volume", "create", vol, "--size", "16M")
        a.cli("pair", "create", f"p-{vol}", "--pvol", vol, "--svol", f"{vol}-r", "--peer", "2001", "--mode", mode,
              "--group", "g", "--wait")
    # Async writes acknowledged just before the swap must be at B after it (zero data loss).
    tail = os.urandom(MiB)
    async with Client(a.address) as c:
        await c.write("v1", 0, os.urandom(MiB))
        await c.write("v2", 2 * MiB, tail)
    copied = sent(a), sent(b)

    # Issued at the secondary: the primary drives it; both pairs at one point.
    rows = b.cli_json("pair", "swap", "--group", "g")
    assert {(r["pair"], r["primary"], r["status"], r["epoch"]) for r in rows} == {
        ("p-v1", True, "DUPLEX", 2), ("p-v2", True, "DUPLEX", 2)}, rows
    for name in ("p-v1", "p-v2"):
        row = a.pair_row(name)
        assert row["primary"] is False and row["epoch"] == 2 and row["role_change"] == "swap", row
    assert (sent(a), sent(b)) == copied, "a swap copies no data"
    async with Client(a.address) as ac, Client(b.address) as bc:
        assert await bc.read("v2-r", 2 * MiB, MiB) == tail
        with_b = os.urandom(TRACK)
        await bc.write("v1-r", 5 * MiB, with_b)  # the new primary serves host writes, mirrored to A
        assert await ac.read("v1", 5 * MiB, TRACK) == with_b
        try:
            await ac.write("v1", 0, b"x" * 4096)
            raise AssertionError("the old primary stayed writable after the swap")
        except ClientError as err:
            assert err.code == "FAILED_PRECONDITION" and "SPVOL" in err.message, err
        assert await ac.checksum("v2") == await bc.checksum("v2-r")
    assert role_ops(a) == ["demoted", "demoted"] and role_ops(b) == ["promoted", "promoted"]

    # Refused unless DUPLEX.
    b.cli("pair", "split", "p-v1")
    cli = a.cli("pair", "swap", "p-v1", check=False)
    assert cli.returncode == 1 and "DUPLEX" in cli.stderr, cli.stderr
    b.cli("pair", "resync", "p-v1", "--wait")
    wait_status(a, "p-v1", ["DUPLEX"])

    # Failback: a second swap, issued at the primary this time.
    rows = b.cli_json("pair", "swap", "--group", "g")
    assert {(r["pair"], r["primary"], r["epoch"]) for r in rows} == {("p-v1", False, 3), ("p-v2", False, 3)}, rows
    assert a.pair_row("p-v1")["primary"] is True and a.pair_row("p-v1")["epoch"] == 3
    async with Client(a.address) as ac, Client(b.address) as bc:
        await ac.write("v1", 6 * MiB, b"y" * TRACK)
        assert await bc.read("v1-r", 6 * MiB, TRACK) == b"y" * TRACK
        for vol in ("v1", "v2"):
            assert await ac.checksum(vol) == await bc.checksum(f"{vol}-r")
    report = a.cli_json("verify", "p-v1")
    assert report["mismatches"] == [], report


async def test_backups_follow_the_swap_where_generations_exist(sites: tuple[Site, Site]) -> None:
    a, b = sites
    a.cli("volume", "create", "v", "--size", "16M")
    a.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
    b.cli("pair", "create", "gen-b", "--pvol", "v-r", "--svol", "v-b1", "--wait")
    async with Client(a.address) as c:
        await c.write("v", 0, os.urandom(MiB))
    a.cli("backup", "p", "--wait")

    a.cli("pair", "swap", "p")
    # The new secondary (A) has no generation yet: refused, naming what to create.
    cli = b.cli("backup", "p", "--wait", check=False)
    assert cli.returncode == 1 and "no backup generation on system 1001" in cli.stderr, cli.stderr
    assert "--pvol v" in cli.stderr, cli.stderr
    a.cli("pair", "create", "gen-a", "--pvol", "v", "--svol", "v-a1", "--wait")
    image = os.urandom(MiB)
    async with Client(b.address) as c:
        await c.write("v-r", 2 * MiB, image)
    reply = b.cli_json("backup", "p", "--wait")
    assert reply["backups"][0]["generation"] == "gen-a", reply
    async with Client(a.address) as c:
        assert await c.read("v-a1", 2 * MiB, MiB) == image

    # Failback: the generations at B serve again.
    b.cli("pair", "swap", "p")
    reply = a.cli_json("backup", "p", "--wait")
    assert reply["backups"][0]["generation"] == "gen-b", reply
    async with Client(b.address) as c:
        assert await c.read("v-b1", 2 * MiB, MiB) == image
