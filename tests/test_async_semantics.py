"""Async mode on real daemons: FLUSH means durable on the local volume only,
the lag is reported, and the SPVOL stays a prefix of the host's write order.

A fault proxy on each direction of the interconnect delays the link, so the
mirror cannot have applied a write when the host's FLUSH returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.testing import Site
from tests.faultproxy import ProxyPair
from tests.test_faults import (
    SPAN_LEN,
    SPAN_START,
    Rig,
    Session,
    check_acked_present,
    check_prefix,
    client,
    close_rig,
    create_pair,
    decode,
    end_row,
    make_rig,
    wait_for,
)

MiB = 1 << 20
#: Link latency per chunk while the FLUSH is timed: far longer than a local
#: write and flush take, so the mirror cannot have applied the write yet.
DELAY = 3.0
#: Link timeout of the slow rig: a delayed keepalive is not a lost peer.
SLOW_LINK_TIMEOUT = 30.0


@pytest.fixture
def slow_rig(tmp_path: Path) -> Iterator[Rig]:
    primary = Site("primary", 1001, tmp_path, link_timeout=SLOW_LINK_TIMEOUT)
    secondary = Site("secondary", 2001, tmp_path, link_timeout=SLOW_LINK_TIMEOUT)
    primary.peer_with(secondary)
    rig = Rig(primary, secondary, ProxyPair(primary, secondary))
    try:
        secondary.start()
        primary.start()
        yield rig
    finally:
        close_rig(rig)


@pytest.fixture
def kill_rig(tmp_path: Path) -> Iterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    close_rig(r)


async def test_async_flush_returns_before_the_mirror_applies(slow_rig: Rig) -> None:
    """An async pair's FLUSH returns once the PVOL is durable: the write is
    still on its way to the mirror (lag shown by pair display, stats and the
    client library), and arrives there afterwards."""
    rig = slow_rig
    await create_pair(rig.primary, "pa", "va", "va-r", mode="async", size=8 * MiB)
    data = b"async-flush!" * 700
    rig.proxies.delay(DELAY)
    async with client(rig.primary) as pc, client(rig.secondary) as sc:
        sent = time.monotonic()
        await pc.write("va", 4096, data)
        await pc.flush("va")
        flushed = time.monotonic()
        # The link delays every chunk by DELAY: what the mirror holds now
        # cannot include the write, whatever the host waited for.
        assert flushed - sent < DELAY, f"the FLUSH took {flushed - sent:.2f}s: it waited for the mirror"
        assert await sc.read("va-r", 4096, len(data)) == bytes(len(data))
        row = (await pc.display_pairs("pa"))[0]
        assert row.primary and row.queue_bytes >= len(data) and row.lag_seconds > 0, row
        stats = next(p for p in (await pc.stats()).pairs if p.pair == "pa")
        assert stats.mode == "async" and stats.primary and stats.lag_bytes >= len(data), stats
        assert stats.lag_seconds > 0, stats
        rig.proxies.heal(reset=False)

        async def applied() -> bool:
            return bool(await sc.read("va-r", 4096, len(data)) == data)

        await wait_for("the write to reach the SPVOL", applied, 4 * DELAY)

        async def caught_up() -> bool:
            r = await end_row(rig.primary, "pa", True)
            return r.queue_bytes == 0 and r.lag_seconds == 0

        await wait_for("the lag to drop to 0", caught_up, 4 * DELAY)
    stats_json = await asyncio.to_thread(rig.primary.cli_json, "stats")
    pair = next(p for p in stats_json["pairs"] if p["pair"] == "pa")
    assert pair["lag_bytes"] == 0 and pair["lag_seconds"] == 0, pair
    secondary_json = await asyncio.to_thread(rig.secondary.cli_json, "stats")
    assert "lag_seconds" not in next(p for p in secondary_json["pairs"] if p["pair"] == "pa")
    row = (await asyncio.to_thread(rig.primary.cli_json, "pair", "display", "pa"))
    assert {"queue_bytes", "lag_seconds"} <= set(next(r for r in row if r["primary"]))


async def test_sync_flush_still_waits_for_the_mirror(slow_rig: Rig) -> None:
    """A sync pair's FLUSH (and write) return only once the mirror applied
    the write: it is on the SPVOL when the FLUSH returns."""
    rig = slow_rig
    await create_pair(rig.primary, "ps", "vs", "vs-r", mode="sync", size=8 * MiB)
    data = b"sync-flush!!" * 700
    rig.proxies.delay(0.3)
    async with client(rig.primary) as pc, client(rig.secondary) as sc:
        await pc.write("vs", 8192, data)
        await pc.flush("vs")
        assert await sc.read("vs-r", 8192, len(data)) == data
    rig.proxies.heal(reset=False)


async def test_async_spvol_is_a_prefix_after_primary_kill(kill_rig: Rig) -> None:
    """kill -9 of the primary while an async queue is in flight: the SPVOL
    holds a prefix of the host's write order, no write torn."""
    rig = kill_rig
    run = Session(rig, "k", 4242, "async")
    await run.setup()
    rig.proxies.delay(0.02)  # a queue builds up on the stream
    run.start()
    await wait_for("200 acknowledged writes", lambda: _more(run, 200), 30)
    await asyncio.to_thread(rig.primary.kill)
    killed = time.monotonic()
    await run.writers.finish()
    rig.proxies.heal(reset=False)

    async def mirror_settled() -> bool:
        row = await end_row(rig.secondary, run.pair, False)
        return row.status == "SUSPENDED" or time.monotonic() - killed > 5

    await wait_for("the secondary to notice the crash", mirror_settled, 20)
    async with client(rig.secondary) as sc:
        image = await sc.read(run.svol, SPAN_START, SPAN_LEN, chunk=SPAN_LEN)
    found = decode(image, run.tag, "SPVOL after kill -9 of the primary")
    check_prefix(found, run.writers.history, "SPVOL after kill -9 of the primary")
    assert any(found.values()), "the mirror received none of the writes"

    # Restarted, the primary resyncs what the crash left pending: the ends converge.
    await asyncio.to_thread(rig.primary.start)
    async with client(rig.primary) as pc:
        image = await pc.read(run.pvol, SPAN_START, SPAN_LEN, chunk=SPAN_LEN)
    check_acked_present(decode(image, run.tag, "PVOL after restart"), run.writers.history, "PVOL after restart")


async def _more(run: Session, count: int) -> bool:
    return len(run.writers.history.acked) >= count
