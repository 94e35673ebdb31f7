"""An async consistency group takes over at one point of the write order (issue 18).

A chain of dependent writes alternates between two volumes of one async
group (each write is issued only after the one before it was
acknowledged, as a database writes its data after its log).  The primary
is killed (``kill -9``) at a seeded point of the chain, the secondary takes
the group over, and at the new primary the writes present must be a
prefix of the chain: no volume may hold a write whose predecessor is
missing on the other.  Big writes to one volume and small ones to the
other make the small stream run ahead of the big one, which is what a
takeover without the group point shows.

Also: the takeover point (the last sequence applied) stays in the copy
table across restarts of the new primary, and a restart of the secondary
before the takeover keeps the sequence it had applied.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client import Client
from splitmirror.testing import Site, wait_for, wait_status
from tests.faultproxy import ProxyPair

MiB = 1 << 20
DATA_SLOT = 256 << 10   # the smallest write to "data" (each write has its own place)
LOG_SLOT = 4096         # each write to "log"
HEADER = struct.Struct("<QQ")  # seed, position in the chain


@pytest.fixture
def ab(tmp_path: Path) -> Iterator[tuple[Site, Site, ProxyPair]]:
    a = Site("primary", 1001, tmp_path, link_timeout=2.0)
    b = Site("secondary", 2001, tmp_path, link_timeout=2.0)
    a.peer_with(b)
    proxies = ProxyPair(a, b)
    b.start(timeout=60)
    a.start(timeout=60)
    yield a, b, proxies
    for site in (a, b):
        site.kill()
    proxies.close()


def payload(seed: int, k: int, size: int) -> bytes:
    body = random.Random(seed * 1_000_003 + k).randbytes(size - HEADER.size)
    return HEADER.pack(seed, k) + body


async def write_chain(a: Site, seed: int, kill_after: int, lose: Callable[[], None]) -> list[tuple[str, int, int]]:
    """Dependent writes, alternating volumes at random; kill -9 the primary after ``kill_after`` acks.

    Data writes are big (256 KiB to 4 MiB), log writes small; the chain ends
    with a 4 MiB data write and a few log writes after it (the shape that
    catches a log volume ahead of its data).  Returns the chain as
    (volume, offset, size), in the order written."""
    rng = random.Random(seed)
    chain: list[tuple[str, int, int]] = []
    ends = {"data": 0, "log": 0}
    tail = ["data"] + ["log"] * rng.randrange(1, 4)
    async with Client(a.address) as c:
        for k in range(kill_after):
            left = kill_after - k
            volume = tail[-left] if left <= len(tail) else ("data" if rng.random() < 0.5 else "log")
            size = (4 * MiB if left == len(tail) else rng.choice([DATA_SLOT, MiB, 4 * MiB])) \
                if volume == "data" else LOG_SLOT
            offset = ends[volume]
            ends[volume] += size
            chain.append((volume, offset, size))
            await c.write(volume, offset, payload(seed, k, size), chunk=size, depth=1)  # one host write
    lose()  # site A lost (or cut off) right after the last acknowledgement
    return chain


async def present(b: Site, seed: int, chain: list[tuple[str, int, int]]) -> list[bool]:
    """For each write of the chain: is it at B (exactly), or is its slot still empty?"""
    out = []
    async with Client(b.address) as c:
        for k, (volume, offset, size) in enumerate(chain):
            data = await c.read(f"{volume}-r", offset, size)
            if data == payload(seed, k, size):
                out.append(True)
            elif data == bytes(size):
                out.append(False)
            else:
                raise AssertionError(f"write {k} ({volume} at {offset}) is torn at the new primary: header "
                                     f"{HEADER.unpack_from(data)}")
    return out


@pytest.mark.parametrize(("seed", "loss"), [(1851, "kill"), (1852, "kill"), (1853, "kill"), (1854, "cut")])
async def test_async_group_takes_over_at_one_point(ab: tuple[Site, Site, ProxyPair], seed: int, loss: str) -> None:
    """``kill``: kill -9 of primaryd; ``cut``: site A cut off and alive (its
    rolled-back writes are then in no bitmap at A: only B can name them)."""
    a, b, proxies = ab
    for vol, volume_size in (("data", "512M"), ("log", "8M")):
        a.cli("volume", "create", vol, "--size", volume_size)
        a.cli("pair", "create", f"p-{vol}", "--pvol", vol, "--svol", f"{vol}-r", "--peer", "2001",
              "--mode", "async", "--group", "g", "--wait")
    # A long-distance link: a big write crosses in several round trips, a
    # small one in one (the two streams share the connection, not its order).
    proxies.delay(0.03)
    kill_after = random.Random(seed).randrange(40, 120)
    if loss == "kill":
        chain = await write_chain(a, seed, kill_after, a.kill)
    else:
        # A longer distance, and the cut a moment after the last write: the
        # log's writes past the group point are applied and acknowledged by
        # then (in no bitmap at A), the big data write still on its way.
        proxies.delay(0.2)
        def cut_later() -> None:
            time.sleep(0.6)
            proxies.cut()

        chain = await write_chain(a, seed, kill_after, cut_later)
    for name in ("p-data", "p-log"):
        wait_status(b, name, ["SUSPENDED"], timeout=30)
    rows = b.cli_json("pair", "takeover", "--group", "g")
    assert {(r["pair"], r["primary"], r["status"]) for r in rows} == {
        ("p-data", True, "SPLIT"), ("p-log", True, "SPLIT")}, rows

    have = await present(b, seed, chain)
    count = sum(have)
    assert have == [True] * count + [False] * (len(chain) - count), (
        f"seed {seed}: the writes at the new primary are not a prefix of the chain of {len(chain)}: "
        f"{''.join('x' if h else '.' for h in have)}")

    # Both pairs name the same group point (the cut) in their takeover events.
    details = [e["detail"] for e in map(json.loads, b.cli("--json", "events").stdout.splitlines())
               if e["kind"] == "role" and e.get("op") == "takeover"]
    cuts = {m.group(1) for d in details if (m := re.search(r"cut (\d+)", str(d)))}
    assert len(details) == 2 and len(cuts) == 1, details

    # Site A comes back fenced.  The resync home first keeps A's versions of
    # what B lacks (its pending tracks and the tracks B rolled back: writes A
    # acknowledged past the group point) in a divergent volume at A: every
    # write of the chain missing at B is readable there.
    if loss == "kill":
        a.start(timeout=60)
    else:
        proxies.heal()
    for name in ("p-data", "p-log"):
        wait_for(lambda name=name: a.pair_row(name).get("fenced_by") == 2001, 60, 0.2, f"A to fence {name}")
        # B sees A again on its own next keepalive: until then the resync is refused as unreachable.
        wait_for(lambda name=name: b.cli("pair", "resync", name, "--wait", check=False).returncode == 0, 60, 0.5,
                 f"B to resync {name} home")
        wait_status(a, name, ["DUPLEX"], timeout=60)
    saved = {vol: str(a.pair_row(f"p-{vol}").get("divergent_volume") or "") for vol in ("data", "log")}
    async with Client(a.address) as ac, Client(b.address) as bc:
        for k, (volume, offset, size) in enumerate(chain):
            if have[k]:
                continue
            kept = saved[volume]
            assert kept, f"seed {seed}: write {k} is missing at B and A kept no divergent volume"
            assert await ac.read(kept, offset, size) == payload(seed, k, size), \
                f"seed {seed}: write {k} ({volume} at {offset}) was overwritten at A without being kept"
        for name in ("data", "log"):
            assert await ac.checksum(name) == await bc.checksum(f"{name}-r")


async def test_takeover_point_survives_restarts(ab: tuple[Site, Site, ProxyPair]) -> None:
    a, b, _ = ab
    a.cli("volume", "create", "v", "--size", "16M")
    a.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
    async with Client(a.address) as c:
        for i in range(20):
            await c.write("v", i * 8192, os.urandom(8192))
    a.kill()
    wait_status(b, "p", ["SUSPENDED"], timeout=30)
    # The secondary restarts before anyone takes over: it still knows how far it applied.
    b.stop()
    b.start(timeout=60)
    row = b.cli_json("pair", "takeover", "p")[0]
    seq = row["role_seq"]
    assert seq >= 20, row  # 20 writes at least (the initial copy's entries come first)
    assert f"last seq {seq}" in b.cli("pair", "display").stdout
    # ... and the new primary keeps its takeover point across a restart (clean, then kill -9).
    b.stop()
    b.start(timeout=60)
    assert b.pair_row("p")["role_seq"] == seq
    b.kill()
    b.start(timeout=60)
    row = b.pair_row("p")
    assert row["role_seq"] == seq and row["primary"] is True and row["role_change"] == "takeover", row
    async with Client(b.address) as c:
        await c.write("v-r", 0, b"b" * 4096)
    wait_for(lambda: b.pair_row("p")["pending_tracks"] >= 1, 10, 0.2, "B to track its write")
