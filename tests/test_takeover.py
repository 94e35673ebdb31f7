"""Disaster recovery (issue 18): takeover at the secondary, the old primary fenced on its return.

Real daemons on loopback; a fault proxy cuts the interconnect where the
old primary must stay alive and keep writing (its divergent tracks).
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client, ClientError
from splitmirror.testing import Site, wait_for, wait_status
from tests.faultproxy import ProxyPair

MiB = 1 << 20
TRACK = 8192


@pytest.fixture
def cut_sites(tmp_path: Path) -> Iterator[tuple[Site, Site, ProxyPair]]:
    primary = Site("primary", 1001, tmp_path, link_timeout=1.0, metrics=True)
    secondary = Site("secondary", 2001, tmp_path, link_timeout=1.0)
    primary.peer_with(secondary)
    proxies = ProxyPair(primary, secondary)
    secondary.start()
    primary.start()
    yield primary, secondary, proxies
    for site in (primary, secondary):
        site.kill()
    proxies.close()


def scrape(site: Site) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{site.metrics_port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def events(site: Site, kind: str) -> list[dict[str, object]]:
    lines = site.cli("--json", "events").stdout.splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


async def refused(site: Site, volume: str, offset: int) -> str:
    async with Client(site.address) as c:
        with pytest.raises(ClientError) as err:
            await c.write(volume, offset, b"x" * 4096)
    assert err.value.code == "FAILED_PRECONDITION", err.value
    return err.value.message


async def test_takeover_fences_the_returning_primary(cut_sites: tuple[Site, Site, ProxyPair]) -> None:
    primary, secondary, proxies = cut_sites
    primary.cli("volume", "create", "db", "--size", "32M")
    primary.cli("pair", "create", "p", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    async with Client(primary.address) as c:
        await c.write("db", 0, os.urandom(MiB))

    # Refused while the primary answers: a planned switchover is a swap.
    cli = secondary.cli("pair", "takeover", "p", check=False)
    assert cli.returncode == 1 and "reachable" in cli.stderr and "swap" in cli.stderr, cli.stderr

    proxies.cut()
    wait_status(secondary, "p", ["SUSPENDED"])
    assert "takeover" in await refused(secondary, "db-r", 0)

    # Site B takes over: its volume is the primary end now, host-writable, writes tracked.
    rows = secondary.cli_json("pair", "takeover", "p")
    assert rows[0]["primary"] is True and rows[0]["status"] == "SPLIT", rows
    assert rows[0]["epoch"] == 2 and rows[0]["role_change"] == "takeover" and rows[0]["role_since"], rows
    table = secondary.cli("pair", "display").stdout
    assert "taken over" in table and "epoch 2" in table, table
    async with Client(secondary.address) as c:
        await c.write("db-r", 4 * MiB, os.urandom(2 * TRACK))
    assert secondary.pair_row("p")["pending_tracks"] == 2
    assert [e["op"] for e in events(secondary, "role")] == ["takeover"]

    # The old primary, still alive, writes on while cut off (its divergent tracks).
    divergent = os.urandom(3 * TRACK)
    async with Client(primary.address) as c:
        await c.write("db", 8 * MiB, divergent)
    proxies.heal()

    # On first contact it learns it lost the role: fenced, reads allowed, nothing overwritten.
    row = wait_for(lambda: (r := primary.pair_row("p")).get("fenced_by") == 2001 and r, 20, 0.1, "the fence")
    assert row["primary"] is False and row["status"] == "SUSPENDED" and row["epoch"] == 2, row
    assert row["pending_tracks"] == 3, row
    message = await refused(primary, "db", 0)
    assert "fenced" in message and "system 2001" in message, message
    async with Client(primary.address) as c:
        assert len(await c.read("db", 8 * MiB, TRACK)) == TRACK
    assert [e["op"] for e in events(primary, "role")] == ["fenced"]
    scraped = scrape(primary)
    assert 'splitmirror_pair_fenced{pair="p"} 1.0' in scraped and 'splitmirror_pair_role_epoch{pair="p"} 2.0' in scraped
    assert "fenced" in primary.cli("pair", "display").stdout

    # A restart keeps it fenced (the role is in the copy table).  A clean
    # one: after kill -9 whole write-intent extents would be pending.
    primary.stop()
    primary.start()
    assert "fenced" in await refused(primary, "db", 0)
    assert secondary.pair_row("p")["status"] == "SPLIT"  # no automatic resync after a takeover

    # Coming home: resync from the new primary copies only the tracks changed
    # on either side, after saving the old primary's divergent ones.
    secondary.cli("pair", "resync", "p", "--wait")
    assert secondary.cli_json("stats")["pairs"][0]["resync_tracks_sent"] == 2 + 3
    row = wait_status(primary, "p", ["DUPLEX"])
    saved = row["divergent_volume"]
    assert saved and saved.startswith("db-divergent-") and not row["fenced_by"], row
    assert saved in {v["name"] for v in primary.cli_json("volume", "list")}
    async with Client(primary.address) as pc, Client(secondary.address) as sc:
        assert await pc.read(saved, 8 * MiB, 3 * TRACK) == divergent
        assert await pc.read(saved, 0, TRACK) == bytes(TRACK)  # sparse: only the divergent tracks
        assert await pc.checksum("db") == await sc.checksum("db-r")
    assert [e["op"] for e in events(primary, "role")] == ["fenced", "divergent-saved"]
    report = secondary.cli_json("verify", "p")
    assert report["mismatches"] == [], report
    # Mirroring B -> A now; A's volume is an SPVOL, read-only to hosts.
    async with Client(secondary.address) as sc, Client(primary.address) as pc:
        await sc.write("db-r", 12 * MiB, b"b" * TRACK)
        assert await pc.read("db", 12 * MiB, TRACK) == b"b" * TRACK
    assert "SPVOL" in await refused(primary, "db", 0)


async def test_fan_in_takeover_for_one_primary_while_the_other_mirrors(tmp_path: Path) -> None:
    """Site B mirrors sites A and C; A is lost: B takes over A's pair only.
    C's pair keeps mirroring into B, and a takeover of it is refused (C answers)."""
    a = Site("primary", 1001, tmp_path, link_timeout=1.0)
    c = Site("primary", 1003, tmp_path, link_timeout=1.0)
    b = Site("secondary", 2001, tmp_path, link_timeout=1.0)
    a.peer_with(b)
    c.peer_with(b)
    try:
        for site in (b, a, c):
            site.start(timeout=60)  # three daemons on a shared machine
        for site, vol in ((a, "va"), (c, "vc")):
            site.cli("volume", "create", vol, "--size", "16M")
            site.cli("pair", "create", f"p-{vol}", "--pvol", vol, "--svol", f"{vol}-r", "--peer", "2001", "--wait")
        a.kill()
        wait_status(b, "p-va", ["SUSPENDED"])
        cli = b.cli("pair", "takeover", "p-vc", check=False)
        assert cli.returncode == 1 and "system 1003, is reachable" in cli.stderr, cli.stderr
        b.cli("pair", "takeover", "p-va")
        data = os.urandom(MiB)
        async with Client(b.address) as bc, Client(c.address) as cc:
            await bc.write("va-r", 0, data)
            await cc.write("vc", 0, data)  # C's pair mirrors on, sync, into the same secondary
            assert await bc.read("vc-r", 0, MiB) == data
        assert b.pair_row("p-vc")["primary"] is False and b.pair_row("p-vc")["status"] == "DUPLEX"
        assert c.pair_row("p-vc")["status"] == "DUPLEX" and c.pair_row("p-vc").get("epoch", 1) == 1
        a.start()
        wait_for(lambda: a.pair_row("p-va").get("fenced_by") == 2001, 20, 0.2, "A to fence itself")

        def resynced() -> bool:
            # A reached B first; B's own keepalive may not have seen A back yet.
            done = b.cli("pair", "resync", "p-va", "--wait", check=False)
            assert done.returncode == 0 or "is unreachable" in done.stderr, done.stderr
            return done.returncode == 0

        wait_for(resynced, 30, 0.5, "B to reach A and resync p-va")
        a.cli("pair", "swap", "p-va")  # failback, issued at the old primary
        assert a.pair_row("p-va")["primary"] is True
        async with Client(a.address) as ac:
            assert await ac.read("va", 0, MiB) == data
    finally:
        for site in (a, b, c):
            site.kill()


async def test_both_primary_at_one_epoch_refuse_writes_until_one_takes_over(tmp_path: Path) -> None:
    """A conflict (both ends primary at one epoch, made here by editing B's copy
    table while both are down): both refuse host writes with a message saying
    how to finish; 'takeover --force' at the site to keep ends it."""
    a = Site("primary", 1001, tmp_path, link_timeout=1.0)
    b = Site("secondary", 2001, tmp_path, link_timeout=1.0)
    a.peer_with(b)
    try:
        b.start()
        a.start()
        a.cli("volume", "create", "v", "--size", "8M")
        a.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
        a.stop()
        b.stop()
        db = sqlite3.connect(b.data_dir / "copytable.sqlite")
        db.execute("UPDATE pairs SET is_primary = 1 WHERE name = 'p'")
        db.commit()
        db.close()
        b.start()
        a.start()
        for site, vol in ((a, "v"), (b, "v-r")):
            message = wait_for(lambda site=site, vol=vol: _refusal(site, vol), 20, 0.3, f"{site.role} to refuse")
            assert "both claim the primary role" in message and "takeover p --force" in message, message
        a.cli("pair", "takeover", "p", "--force")
        wait_for(lambda: b.pair_row("p").get("fenced_by") == 1001, 20, 0.2, "B to fence itself")
        assert a.pair_row("p")["primary"] is True and a.pair_row("p")["epoch"] == 2
        async with Client(a.address) as c:
            await c.write("v", 0, b"a" * 4096)
        b_refusal = _refusal(b, "v-r")
        assert b_refusal and "fenced" in b_refusal, b_refusal
        assert a.pair_row("p")["status"] == "SPLIT"  # nothing overwritten until the operator resyncs
        a.cli("pair", "resync", "p", "--wait")
        wait_status(b, "p", ["DUPLEX"])
        async with Client(b.address) as c:
            assert await c.read("v-r", 0, 4096) == b"a" * 4096
    finally:
        for site in (a, b):
            site.kill()


def _refusal(site: Site, volume: str) -> str:
    """Why a 4 KiB host write is refused ("" if it was accepted)."""
    data = site.data_dir.parent / "block.bin"
    data.write_bytes(b"z" * 4096)
    cli = site.cli("write", volume, "--file", str(data), check=False)
    return "" if cli.returncode == 0 else cli.stderr
