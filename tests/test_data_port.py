"""The replication data port through real daemons: streams use it, a peer
without it is reached over gRPC, and hostile clients get one precise error."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client
from splitmirror import tls
from splitmirror.replication import dataproto as dp
from splitmirror.replication.queue import Entry
from splitmirror.testing import Site, wait_status

MiB = 1 << 20


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    tls.init_dir(directory, [1001, 2001, 3001], tls.parse_clients("admin"))
    return directory


def started(primary: Site, secondary: Site) -> Iterator[tuple[Site, Site]]:
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    for site in (primary, secondary):
        site.kill()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    """The secondary's data port with small limits, so that tests reach them."""
    primary = Site("primary", 1001, tmp_path, auto_resync=False)
    secondary = Site("secondary", 2001, tmp_path, auto_resync=False)
    secondary.extra_args += ["--data-max-connections", "3", "--data-max-per-peer", "2",
                             "--data-handshake-timeout", "1", "--data-max-frame", "1M",
                             "--data-pair-inflight", "2M"]
    yield from started(primary, secondary)


@pytest.fixture
def tls_sites(tmp_path: Path, tls_dir: Path) -> Iterator[tuple[Site, Site]]:
    primary = Site("primary", 1001, tmp_path, tls_dir=tls_dir)
    secondary = Site("secondary", 2001, tmp_path, tls_dir=tls_dir)
    secondary.extra_args += ["--data-handshake-timeout", "1"]
    yield from started(primary, secondary)


def client(site: Site) -> Client:
    if site.tls_dir is None:
        return Client(site.address)
    return Client(site.address, tls_dir=site.tls_dir, identity="admin")


async def mirror_and_check(primary: Site, secondary: Site, pair: str = "p1", mode: str = "sync") -> None:
    """A pair mirrors: writes of the PVOL are on the SPVOL, byte for byte."""
    rng = random.Random(pair)
    primary.cli("volume", "create", f"{pair}-v", "--size", "8M")
    primary.cli("pair", "create", pair, "--pvol", f"{pair}-v", "--svol", f"{pair}-r", "--peer", "2001",
                "--mode", mode, "--wait")
    async with client(primary) as c:
        await asyncio.gather(*(c.write(f"{pair}-v", rng.randrange(0, 8 * MiB - 65536, 512),
                                       rng.randbytes(rng.choice([512, 4096, 65536]))) for _ in range(64)))
        await c.flush(f"{pair}-v")
        want = await c.read(f"{pair}-v", 0, 8 * MiB)
    if mode == "async":
        await asyncio.sleep(0.5)
    async with client(secondary) as c:
        assert await c.read(f"{pair}-r", 0, 8 * MiB) == want
    assert primary.pair_row(pair)["status"] == "DUPLEX"


async def test_streams_use_the_data_connection(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    await mirror_and_check(primary, secondary, "p1", "sync")
    await mirror_and_check(primary, secondary, "p2", "async")
    assert "data connection from system 1001" in secondary.log()
    assert "data connection to peer 2001" in primary.log()
    assert primary.log().count("data connection to peer 2001") == 1  # one connection for both pairs
    assert "gRPC interconnect" not in primary.log()


async def test_a_peer_without_a_data_port_is_reached_over_grpc(tmp_path: Path) -> None:
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    secondary.data_port = 0  # --data off
    for _ in started(primary, secondary):
        await mirror_and_check(primary, secondary)
        assert "data connection" not in primary.log() + secondary.log()


async def test_streams_over_tls(tls_sites: tuple[Site, Site]) -> None:
    primary, secondary = tls_sites
    await mirror_and_check(primary, secondary)
    assert "data connection to peer 2001 at 127.0.0.1" in primary.log() and "(TLS)" in primary.log()


def test_batches_fit_the_frame_limit_the_mirror_announces(limited: tuple[Site, Site]) -> None:
    """A burst of 256 KiB sync writes gathers behind the send window; with the
    mirror's frame limit at 1 MiB every batch still fits one frame, so the pair
    stays DUPLEX and the SPVOL equals the PVOL (a 4 MiB default batch would be
    refused as an oversized frame and suspend the pair)."""
    primary, secondary = limited
    primary.cli("volume", "create", "burst-v", "--size", "16M")
    primary.cli("pair", "create", "burst", "--pvol", "burst-v", "--svol", "burst-r", "--peer", "2001", "--wait")
    rng = random.Random(7)

    async def burst() -> bytes:
        async with client(primary) as c:
            for _ in range(3):
                await asyncio.gather(*(c.write("burst-v", i * (256 << 10), rng.randbytes(256 << 10))
                                       for i in range(64)))
            return await c.read("burst-v", 0, 16 * MiB)

    want = asyncio.run(burst())
    assert primary.pair_row("burst")["status"] == "DUPLEX"

    async def spvol() -> bytes:
        async with client(secondary) as c:
            return await c.read("burst-r", 0, 16 * MiB)

    assert asyncio.run(spvol()) == want
    assert "exceeds the limit" not in secondary.log()


# -- hostile clients ------------------------------------------------------------------------------


def connect(site: Site, context: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", site.data_port), timeout=10)
    if context is not None:
        return context.wrap_socket(sock, server_hostname="system-2001.splitmirror")
    return sock


def read_error(sock: socket.socket, expect_hello: bool = False) -> dp.Error:
    """Read frames until an ERROR (a HELLO first when ``expect_hello``); then the server closes."""
    proto = dp.DataProtocol("source", dp.SMALL_FRAME)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        assert data, "the server closed the connection without an ERROR frame"
        for event in proto.feed(data):
            if isinstance(event, dp.Hello):
                assert expect_hello, "a HELLO answered a refused client"
            elif isinstance(event, dp.Error):
                return event
    raise AssertionError("no ERROR frame within 10 s")


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    return True


def test_hostile_data_clients_get_one_precise_error_and_the_pair_mirrors_on(
        limited: tuple[Site, Site]) -> None:
    primary, secondary = limited
    asyncio.run(mirror_and_check(primary, secondary, "guard"))

    # A stranger's claim.
    with connect(secondary) as s:
        s.sendall(dp.hello(7, dp.SMALL_FRAME))
        err = read_error(s)
        assert err.code is dp.Code.PERMISSION_DENIED and "system 7 is not a configured peer of system 2001" \
            in err.message
        assert closed_by_server(s)

    # Not the protocol at all (an HTTP request): refused on the head, nothing allocated.
    with connect(secondary) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        err = read_error(s)
        assert "frame type" in err.message or "exceeds the limit" in err.message

    # An oversized frame after a good HELLO: refused on its head.
    with connect(secondary) as s:
        s.sendall(dp.hello(1001, dp.SMALL_FRAME) + dp.open_channel(1, "guard")
                  + dp.HEAD.pack(1 << 30, dp.Kind.BATCH))
        err = read_error(s, expect_hello=True)
        assert err.code is dp.Code.RESOURCE_EXHAUSTED
        assert "BATCH frame of 1073741824 bytes exceeds the limit of 1048576 bytes" in err.message

    # Slowloris: a few bytes of a HELLO, then nothing.
    with connect(secondary) as s:
        s.sendall(dp.hello(1001, dp.SMALL_FRAME)[:7])
        started_at = time.monotonic()
        err = read_error(s)
        assert err.code is dp.Code.UNAVAILABLE and "no HELLO within 1s" in err.message
        assert time.monotonic() - started_at < 5

    # Too many connections from one peer (the primary holds one already), then in all.
    held = [connect(secondary)]
    held[0].sendall(dp.hello(1001, dp.SMALL_FRAME))
    with connect(secondary) as s:
        s.sendall(dp.hello(1001, dp.SMALL_FRAME))
        err = read_error(s)
        assert err.code is dp.Code.RESOURCE_EXHAUSTED
        assert "system 1001 has 2 data connections open to system 2001; the limit is 2" in err.message
    held.append(connect(secondary))  # the third connection (in its handshake)
    time.sleep(0.2)
    with connect(secondary) as s:
        err = read_error(s)
        assert "3 data connections are open, the limit is 3" in err.message
    for s in held:
        s.close()

    # The guard pair still mirrors.
    asyncio.run(mirror_and_check(primary, secondary, "guard2"))
    assert "Traceback" not in secondary.log()


def test_a_malformed_batch_suspends_the_pair_at_the_mirror_and_nothing_stored_is_lost(
        limited: tuple[Site, Site]) -> None:
    primary, secondary = limited
    asyncio.run(mirror_and_check(primary, secondary, "victim"))

    async def spvol() -> bytes:
        async with client(secondary) as c:
            return await c.read("victim-r", 0, 8 * MiB)

    before = asyncio.run(spvol())
    with connect(secondary) as s:
        bad = struct.pack("<QQIQB", 1, 0, 100, 0, 0) + b"x" * 10
        s.sendall(dp.hello(1001, dp.SMALL_FRAME) + dp.open_channel(1, "victim")
                  + dp.HEAD.pack(4 + len(bad), dp.Kind.BATCH) + struct.pack("<I", 1) + bad)
        err = read_error(s, expect_hello=True)
        assert err.channel == 1 and err.code is dp.Code.INVALID_ARGUMENT
        assert "malformed batch" in err.message and "announces 100 payload bytes, 10 are left" in err.message
        assert "the pair is suspended" in err.message
        # The connection goes on: an unknown pair on another channel is one more precise error.
        s.sendall(dp.open_channel(2, "nosuch"))
        err = read_error(s)
        assert err.channel == 2 and err.code is dp.Code.NOT_FOUND and "'nosuch'" in err.message
        # Writes for the suspended pair are refused, not applied.
        s.sendall(dp.open_channel(3, "victim") + b"".join(bytes(p) for p in dp.batch(3, [Entry(1, 0, b"y" * 4096)])))
        err = read_error(s)
        assert err.channel == 3 and err.code is dp.Code.FAILED_PRECONDITION
        assert "replicated writes are not accepted" in err.message
    assert "pair victim: DUPLEX -> SUSPENDED (stream-refused)" in secondary.log()
    # The primary resyncs it (its stream was taken over); the SPVOL holds what it held.
    wait_status(primary, "victim", ["DUPLEX"])
    assert asyncio.run(spvol()) == before


def test_tls_data_port_refuses_wrong_identities(tls_sites: tuple[Site, Site], tls_dir: Path) -> None:
    primary, secondary = tls_sites
    asyncio.run(mirror_and_check(primary, secondary))

    def context(stem: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
        ctx.load_cert_chain(tls_dir / f"{stem}.pem", tls_dir / f"{stem}.key")
        return ctx

    # Plain TCP to the TLS port: the TLS handshake fails, nothing else happens.
    with connect(secondary) as s:
        s.sendall(dp.hello(1001, dp.SMALL_FRAME))
        assert closed_by_server(s)
    # A TLS client without a certificate: refused by the TLS layer.
    bare = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    try:
        with connect(secondary, bare) as s:
            s.sendall(dp.hello(1001, dp.SMALL_FRAME))
            assert s.recv(100) == b"", "a client without a certificate was answered"
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass  # refused in the TLS handshake (TLS 1.2) or right after it (1.3)
    # A client certificate (admin), not a system one.
    with connect(secondary, context("client-admin")) as s:
        s.sendall(dp.hello(1001, dp.SMALL_FRAME))
        err = read_error(s)
        assert err.code is dp.Code.PERMISSION_DENIED and "certificate admin 'admin'" in err.message
    # A system certificate of the CA (3001, not a peer) claiming to be the primary.
    with connect(secondary, context("3001")) as s:
        s.sendall(dp.hello(1001, dp.SMALL_FRAME))
        err = read_error(s)
        assert err.code is dp.Code.PERMISSION_DENIED and "certificate system '3001'" in err.message
    # The right certificate, a slow handshake.
    with connect(secondary, context("1001")) as s:
        err = read_error(s)
        assert "no HELLO within 1s" in err.message
    asyncio.run(mirror_and_check(primary, secondary, "p2"))
    assert "Traceback" not in secondary.log()
