"""The daemon pair end to end: real processes, the CLI and the client library."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from client import Client, ClientError
from splitmirror.replication.link import SYSTEM_ID_KEY
from splitmirror.testing import ROOT, Site, wait_for, wait_status
from splitmirror.v1 import interconnect_pb2, interconnect_pb2_grpc
from tests.faultproxy import ProxyPair

MiB = 1 << 20
TRACK = 8192
PAIR_KEYS = {"pair", "volume", "copy_type", "pair_system_id", "mirror_volume", "primary", "status", "mode",
             "group", "pending_tracks", "progress", "split_time", "status_since"}


async def volume_bytes(site: Site, name: str, size: int) -> bytes:
    async with Client(site.address) as c:
        return await c.read(name, 0, size)


async def assert_identical(primary: Site, pvol: str, secondary: Site, svol: str, size: int) -> None:
    a = await volume_bytes(primary, pvol, size)
    b = await volume_bytes(secondary, svol, size)
    assert a == b, f"{pvol} and {svol} differ at byte {next(i for i in range(size) if a[i] != b[i])}"


def tracks_of(offset: int, length: int) -> set[int]:
    return set(range(offset // TRACK, (offset + length + TRACK - 1) // TRACK))


async def test_remote_pair_copy_split_resync_restart(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    size = 64 * MiB
    rng = random.Random(7)
    primary.cli("volume", "create", "db", "--size", "64M")
    async with Client(primary.address) as c:
        await c.write("db", 0, rng.randbytes(3 * MiB))
        await c.write("db", 40 * MiB, rng.randbytes(MiB))

    primary.cli("pair", "create", "p1", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    row = primary.pair_row("p1")
    assert set(row) == PAIR_KEYS
    assert row["status"] == "DUPLEX" and row["primary"] is True and row["copy_type"] == "REMOTE"
    assert row["pair_system_id"] == 2001 and row["mirror_volume"] == "db-r" and row["mode"] == "sync"
    srow = wait_status(secondary, "p1", ["DUPLEX"])
    assert srow["primary"] is False and srow["pair_system_id"] == 1001 and srow["volume"] == "db-r"
    # Only allocated tracks crossed for the initial copy.
    stats = primary.cli_json("stats")
    assert stats["pairs"][0]["resync_tracks_sent"] == 4 * MiB // TRACK

    # Sync writes land on the SPVOL before they are acknowledged.
    async with Client(primary.address) as c:
        await asyncio_gather_writes(c, "db", rng, count=40)
    await assert_identical(primary, "db", secondary, "db-r", size)

    # The SPVOL is read-only to hosts while the pair mirrors.
    async with Client(secondary.address) as c:
        with pytest.raises(ClientError) as err:
            await c.write("db-r", 0, b"x" * 512)
        assert err.value.code == "FAILED_PRECONDITION" and "db-r" in err.value.message

    primary.cli("pair", "split", "p1")
    assert primary.pair_row("p1")["status"] == "SPLIT"
    assert primary.pair_row("p1")["split_time"]
    assert wait_status(secondary, "p1", ["SPLIT"])["split_time"]
    written_p = [(5 * MiB, 3 * TRACK), (20 * MiB + 100, 10)]
    written_s = [(5 * MiB + TRACK, 4 * TRACK), (50 * MiB, MiB)]
    async with Client(primary.address) as c:
        for off, n in written_p:
            await c.write("db", off, rng.randbytes(n))
    async with Client(secondary.address) as c:
        for off, n in written_s:
            await c.write("db-r", off, rng.randbytes(n))
    p_tracks = set().union(*(tracks_of(o, n) for o, n in written_p))
    s_tracks = set().union(*(tracks_of(o, n) for o, n in written_s))
    assert primary.pair_row("p1")["pending_tracks"] == len(p_tracks)
    assert secondary.pair_row("p1")["pending_tracks"] == len(s_tracks)

    before = primary.cli_json("stats")["pairs"][0]["resync_tracks_sent"]
    primary.cli("pair", "resync", "p1", "--wait")
    after = primary.cli_json("stats")["pairs"][0]["resync_tracks_sent"]
    assert after - before == len(p_tracks | s_tracks)
    wait_status(secondary, "p1", ["DUPLEX"])
    await assert_identical(primary, "db", secondary, "db-r", size)
    assert primary.pair_row("p1")["pending_tracks"] == 0

    # Clean restart of both daemons: volumes, pairs and data survive, and the
    # pair is DUPLEX again by itself.
    expected = await volume_bytes(primary, "db", size)
    assert primary.stop() == 0 and secondary.stop() == 0
    secondary.start()
    primary.start()
    assert wait_status(primary, "p1", ["DUPLEX"])["pending_tracks"] == 0
    wait_status(secondary, "p1", ["DUPLEX"])
    assert await volume_bytes(primary, "db", size) == expected
    assert await volume_bytes(secondary, "db-r", size) == expected
    async with Client(primary.address) as c:
        await c.write("db", 63 * MiB, rng.randbytes(MiB), fua=True)
        await c.flush("db")
    await assert_identical(primary, "db", secondary, "db-r", size)
    assert "stopped cleanly" in primary.log() and "stopped cleanly" in secondary.log()


async def asyncio_gather_writes(c: Client, volume: str, rng: random.Random, count: int) -> None:
    jobs = []
    for _ in range(count):
        size = rng.choice([512, 4096, TRACK, 64 * 1024, MiB])
        offset = rng.randrange(0, 64 * MiB - size)
        jobs.append(c.write(volume, offset, rng.randbytes(size)))
    await asyncio.gather(*jobs)


async def test_peer_killed_suspends_then_manual_resync(manual_sites: tuple[Site, Site]) -> None:
    primary, secondary = manual_sites
    size = 16 * MiB
    primary.cli("volume", "create", "v", "--size", "16M")
    primary.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
    secondary.kill()
    rng = random.Random(3)
    async with Client(primary.address) as c:
        # Hosts are never blocked beyond the link timeout; the write is kept.
        await c.write("v", 0, rng.randbytes(MiB))
        await c.write("v", 8 * MiB, rng.randbytes(TRACK))
    row = wait_status(primary, "p", ["SUSPENDED"])
    assert row["pending_tracks"] >= 1
    secondary.start()
    # auto-resync is off: it stays suspended until an operator resyncs.
    await asyncio.sleep(2.5)
    assert primary.pair_row("p")["status"] == "SUSPENDED"
    primary.cli("pair", "resync", "p", "--wait")
    wait_status(secondary, "p", ["DUPLEX"])
    await assert_identical(primary, "v", secondary, "v-r", size)


async def test_peer_restart_resyncs_automatically(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    primary.cli("volume", "create", "v", "--size", "8M")
    primary.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
    secondary.kill()
    async with Client(primary.address) as c:
        await c.write("v", 3 * MiB, os.urandom(2 * MiB))
    wait_status(primary, "p", ["SUSPENDED"])
    secondary.start()
    wait_status(primary, "p", ["DUPLEX"], timeout=30)
    wait_status(secondary, "p", ["DUPLEX"])
    await assert_identical(primary, "v", secondary, "v-r", 8 * MiB)


async def test_primary_killed_converges_without_full_copy(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    size = 64 * MiB
    primary.cli("volume", "create", "v", "--size", "64M")
    async with Client(primary.address) as c:
        await c.write("v", 0, os.urandom(32 * MiB))
    primary.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
    async with Client(primary.address) as c:
        await c.write("v", 48 * MiB, os.urandom(MiB))
    primary.kill()
    primary.start()
    wait_status(primary, "p", ["DUPLEX"], timeout=30)
    await assert_identical(primary, "v", secondary, "v-r", size)
    sent = primary.cli_json("stats")["pairs"][0]["resync_tracks_sent"]
    # Only write-intent extents are re-copied, never the whole volume.
    assert sent < size // TRACK // 4


async def test_local_pair_and_svol_read_only(sites: tuple[Site, Site]) -> None:
    primary, _ = sites
    primary.cli("volume", "create", "a", "--size", "4M", "--track-size", "16K")
    async with Client(primary.address) as c:
        await c.write("a", 0, b"A" * MiB)
    out = primary.cli_json("pair", "create", "loc", "--pvol", "a", "--svol", "b", "--wait")
    assert out[0]["copy_type"] == "LOCAL"
    rows = primary.cli_json("pair", "display", "loc")
    assert {r["volume"] for r in rows} == {"a", "b"} and all(r["status"] == "DUPLEX" for r in rows)
    async with Client(primary.address) as c:
        await c.write("a", 2 * MiB, b"B" * 4096)
        assert await c.read("b", 0, 4 * MiB) == await c.read("a", 0, 4 * MiB)
        with pytest.raises(ClientError) as err:
            await c.write("b", 0, b"x")
        assert err.value.code == "FAILED_PRECONDITION" and "SVOL" in err.value.message
        await c.split_pair("loc")
        await c.write("a", 0, b"C" * 16384)
        with pytest.raises(ClientError):
            await c.write("b", 0, b"x")  # an SVOL stays read-only when split
        assert (await c.read("b", 0, 1))[0:1] == b"A"
        await c.resync_pair("loc", reverse=True)
        await c.wait_pair("loc", timeout=20)
        assert await c.read("a", 0, 16384) == b"A" * 16384
    vol = primary.cli_json("volume", "show", "b")
    assert vol["role"] == "SVOL" and vol["host_writable"] is False


async def test_user_errors_get_precise_statuses(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    primary.cli("volume", "create", "v", "--size", "1M")
    async with Client(primary.address) as c:
        cases = [
            (c.write("v", 0, b""), "INVALID_ARGUMENT", "zero-length"),
            (c.write("v", MiB - 1, b"xx"), "OUT_OF_RANGE", "'v'"),
            (c.read("v", MiB, 1), "OUT_OF_RANGE", "'v'"),
            (c.read("nope", 0, 1), "NOT_FOUND", "'nope'"),
            (c.create_volume("v", MiB), "ALREADY_EXISTS", "'v'"),
            (c.create_volume("odd", MiB + 1), "INVALID_ARGUMENT", "multiple of the track size"),
            (c.create_volume("ts", MiB, 3000), "INVALID_ARGUMENT", "power of two"),
            (c.create_volume("../etc", MiB), "INVALID_ARGUMENT", "invalid volume name"),
            (c.split_pair("nope"), "NOT_FOUND", "'nope'"),
            (c.create_pair("p", "v", "v-r", peer=4242), "NOT_FOUND", "4242"),
            (c.create_pair("p", "v", "v-r", peer=2001, mode="turbo"), "INVALID_ARGUMENT", "mode"),
        ]
        for call, code, text in cases:
            with pytest.raises(ClientError) as err:
                await call
            assert err.value.code == code, (code, err.value)
            assert text in err.value.message
        await c.create_pair("p", "v", "v-r", peer=2001)
        await c.wait_pair("p", timeout=20)
        for call, code, text in [
            (c.delete_volume("v"), "FAILED_PRECONDITION", "'p'"),
            (c.resync_pair("p"), "FAILED_PRECONDITION", "DUPLEX"),
            (c.create_pair("p", "v", "x", peer=2001), "ALREADY_EXISTS", "'p'"),
        ]:
            with pytest.raises(ClientError) as err:
                await call
            assert err.value.code == code and text in err.value.message, err.value
        await c.split_pair("p")
        with pytest.raises(ClientError) as err:
            await c.split_pair("p")
        assert err.value.code == "FAILED_PRECONDITION"
        assert "'p' is SPLIT; cannot split" in err.value.message
    async with Client(secondary.address) as c:
        with pytest.raises(ClientError) as err:
            await c.create_volume("v-r", MiB)
        assert err.value.code == "ALREADY_EXISTS"
        with pytest.raises(ClientError) as err:
            await c.resync_pair("p")
        assert err.value.code == "FAILED_PRECONDITION" and "primary system 1001" in err.value.message

    # The CLI turns each refusal into one line and a non-zero exit.
    result = primary.cli("volume", "delete", "v", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    result = primary.cli("volume", "create", "w", "--size", "12Q", check=False)
    assert result.returncode != 0 and "12Q" in result.stderr and "Traceback" not in result.stderr

    # An interconnect caller that is not a configured peer is refused.
    with grpc.insecure_channel(primary.interconnect) as channel:
        stub = interconnect_pb2_grpc.InterconnectStub(channel)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Hello(interconnect_pb2.HelloRequest(system_id=9999), metadata=((SYSTEM_ID_KEY, "9999"),))
        assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_malformed_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("system_id = 'x'\n")
    result = subprocess.run([sys.executable, "-m", "primaryd", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "system_id" in result.stderr and "Traceback" not in result.stderr
    config.write_text("system_id = 5\ndata_dir = 'd'\nlisten = '127.0.0.1:1'\ninterconnect = 'nope'\n")
    result = subprocess.run([sys.executable, "-m", "secondaryd", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "interconnect" in result.stderr


def test_health_and_reflection_served(sites: tuple[Site, Site]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    primary, _ = sites
    with grpc.insecure_channel(primary.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "splitmirror.v1.HostApi" in names and "grpc.health.v1.Health" in names


async def test_resync_cut_short_by_kill_resumes_where_it_stopped(tmp_path: Path) -> None:
    """kill -9 of the primary halfway through a resync: after the restart
    the resync copies about what was left, not everything again."""
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    proxies = ProxyPair(primary, secondary)  # a slow link, so the resync takes seconds
    try:
        secondary.start()
        primary.start()
        primary.cli("volume", "create", "v", "--size", "256M")
        primary.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
        primary.cli("pair", "split", "p")
        changed = 0
        async with Client(primary.address) as c:
            for i in range(64):
                await c.write("v", i * 4 * MiB, os.urandom(MiB))
                changed += MiB // TRACK
        proxies.delay(0.25)
        primary.cli("pair", "resync", "p")
        row = wait_for(lambda: (r := primary.pair_row("p"))["status"] == "COPY" and (r["progress"] or 0) >= 35 and r,
                       60, 0.1, "the resync to get a third of the way")
        await asyncio.sleep(1.5)  # at least one checkpoint of the shrinking bitmap
        primary.kill()
        proxies.delay(0)
        primary.start()
        wait_status(primary, "p", ["DUPLEX"], timeout=60)
        sent = primary.cli_json("stats")["pairs"][0]["resync_tracks_sent"]
        assert sent <= changed * (100 - row["progress"]) / 100 + 1024, (
            f"{sent} tracks copied after the restart, of {changed}; {row['progress']:.0f}% were done before it")
        await assert_identical(primary, "v", secondary, "v-r", 256 * MiB)
    finally:
        for site in (primary, secondary):
            site.kill()
        proxies.close()
