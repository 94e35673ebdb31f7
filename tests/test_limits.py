"""Issue 15, findings 4, 7 and 8 against real daemons: out-of-range sizes and
track sizes, names with a trailing newline, token files that are open to
others or hold one token twice.  Every refusal is INVALID_ARGUMENT naming the
limit, no exception text reaches a client, a bad token file stops the start
with one line."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import Client
from splitmirror.replication.link import SYSTEM_ID_KEY
from splitmirror.testing import ROOT, Site, wait_status
from splitmirror.v1 import host_pb2, host_pb2_grpc, interconnect_pb2, interconnect_pb2_grpc

#: Python exception text a client must never see.
LEAKS = ("Errno", "Error", "Exception", "Traceback", "Unexpected <class")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A secondaryd with a configured peer 1001 that is never there (the test speaks for it)."""
    s = Site("secondary", 2001, tmp_path_factory.mktemp("limits"))
    s.peers[1001] = 1
    s.start()
    yield s
    alive = s.proc is not None and s.proc.poll() is None
    s.kill()
    assert alive, s.log()[-3000:]
    assert "Traceback" not in s.log(), s.log()[-3000:]


def _refusal(call: object, request: object, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10, **kw)  # type: ignore[operator]
    exc = err.value
    assert not any(leak in (exc.details() or "") for leak in LEAKS), exc.details()
    return exc


@pytest.mark.parametrize("size", [1 << 50, 1 << 62, (1 << 64) - (1 << 13), (16 << 40) + 8192])
def test_huge_volume_size_is_invalid_argument_naming_the_limit(site: Site, size: int) -> None:
    with site.channel() as ch:
        exc = _refusal(host_pb2_grpc.HostApiStub(ch).CreateVolume,
                       host_pb2.CreateVolumeRequest(name=f"huge{size.bit_length()}", size=size))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    assert "16 TiB" in exc.details() and str(16 << 40) in exc.details(), exc.details()


@pytest.mark.parametrize("track_size", [1 << 30, 2 << 20, 2048, 12288, (1 << 32) - 1])
def test_track_size_out_of_bounds_is_invalid_argument_naming_the_bounds(site: Site, track_size: int) -> None:
    with site.channel() as ch:
        exc = _refusal(host_pb2_grpc.HostApiStub(ch).CreateVolume,
                       host_pb2.CreateVolumeRequest(name="ts", size=1 << 30, track_size=track_size))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4096 (4 KiB) to 1048576 (1 MiB)" in exc.details(), exc.details()


def test_track_sizes_within_the_bounds_are_accepted(site: Site) -> None:
    with site.channel() as ch:
        stub = host_pb2_grpc.HostApiStub(ch)
        for track_size in (4096, 1 << 20):
            vol = stub.CreateVolume(host_pb2.CreateVolumeRequest(name=f"ok{track_size}", size=4 << 20,
                                                                 track_size=track_size), timeout=10)
            assert vol.track_size == track_size


def test_host_io_over_32_mib_per_request_is_refused_naming_the_volume_and_limit(site: Site) -> None:
    """A Write payload (like a Read length) over 32 MiB is INVALID_ARGUMENT before
    anything is written; 32 MiB itself is served; the library will not send more."""
    limit = 32 << 20
    with site.channel() as ch:
        stub = host_pb2_grpc.HostApiStub(ch)
        stub.CreateVolume(host_pb2.CreateVolumeRequest(name="io", size=2 * limit), timeout=10)
        for call, request in ((stub.Write, host_pb2.WriteRequest(volume="io", offset=0, data=b"w" * (limit + 1))),
                              (stub.Read, host_pb2.ReadRequest(volume="io", offset=0, length=limit + 1))):
            exc = _refusal(call, request)
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
            assert f"volume 'io': {'write' if call is stub.Write else 'read'} of {limit + 1} bytes" in exc.details()
            assert f"limit of {limit} bytes (32 MiB) per request" in exc.details(), exc.details()
        assert stub.Read(host_pb2.ReadRequest(volume="io", offset=0, length=4096), timeout=10).data == bytes(4096)

    async def at_the_limit() -> None:
        async with Client(site.address) as c:
            assert await c.write("io", limit, b"w" * limit, chunk=limit) == limit
            assert await c.read("io", limit, limit, chunk=limit) == b"w" * limit
            with pytest.raises(ValueError, match="32 MiB"):
                await c.write("io", 0, b"x", chunk=limit + 1)

    asyncio.run(at_the_limit())


@pytest.mark.parametrize("name", ["nl\n", "a\nb", "ok\n\n", "x\r"])
def test_names_are_matched_whole(site: Site, name: str) -> None:
    with site.channel() as ch:
        stub = host_pb2_grpc.HostApiStub(ch)
        exc = _refusal(stub.CreateVolume, host_pb2.CreateVolumeRequest(name=name, size=1 << 20))
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid volume name" in exc.details()
        if not any(v.name == "src" for v in stub.ListVolumes(host_pb2.ListVolumesRequest(), timeout=10).volumes):
            stub.CreateVolume(host_pb2.CreateVolumeRequest(name="src", size=1 << 20), timeout=10)
        for request, what in ((host_pb2.CreatePairRequest(name=name, pvol="src", svol="dst"), "pair"),
                              (host_pb2.CreatePairRequest(name="p", pvol="src", svol=name), "volume"),
                              (host_pb2.CreatePairRequest(name="p", pvol="src", svol="dst", group=name),
                               "consistency group")):
            exc = _refusal(stub.CreatePair, request)
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and f"invalid {what} name" in exc.details()
        assert all("\n" not in v.name for v in stub.ListVolumes(host_pb2.ListVolumesRequest(), timeout=10).volumes)


@pytest.mark.parametrize(("size", "track_size", "name", "limit"), [
    (1 << 50, 8192, "big", "16 TiB"),
    ((1 << 64) - 1, 8192, "max", "exceeds the limit 9223372036854775807"),
    (1 << 30, 1 << 30, "trk", "1 MiB"),
    (1 << 20, 8192, "nl\n", "invalid volume name"),
])
def test_interconnect_attach_refuses_out_of_range_values_without_exception_text(
        site: Site, size: int, track_size: int, name: str, limit: str) -> None:
    with grpc.insecure_channel(site.interconnect) as ch:
        exc = _refusal(interconnect_pb2_grpc.InterconnectStub(ch).AttachMirror,
                       interconnect_pb2.AttachMirrorRequest(pair=f"p-{size.bit_length()}-{track_size.bit_length()}",
                                                            pvol="a", svol=name, size=size,
                                                            track_size=track_size, mode="sync"),
                       metadata=((SYSTEM_ID_KEY, "1001"),))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    assert limit in exc.details(), exc.details()


# ---------------------------------------------------------------------- token files

def _start(tmp_path: Path, token_text: str, mode: int) -> subprocess.CompletedProcess[str]:
    tokens = tmp_path / "tokens"
    tokens.write_text(token_text)
    tokens.chmod(mode)
    site = Site("primary", 1001, tmp_path)
    site.extra_args += ["--token-file", str(tokens)]
    return subprocess.run(site.argv(), cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_token_file_open_to_group_or_others_refuses_the_start(tmp_path: Path, mode: int) -> None:
    result = _start(tmp_path, "ops admin s3cr3t-admin-token-0001\n", mode)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "chmod 600" in lines[0] and f"{mode:04o}" in lines[0], result.stderr
    assert "s3cr3t" not in result.stderr


def test_same_token_on_two_lines_refuses_the_start(tmp_path: Path) -> None:
    result = _start(tmp_path, "watch viewer s3cr3t-shared-token-01\nops admin s3cr3t-shared-token-01\n", 0o600)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2" in lines[0] and "same token as line 1" in lines[0], result.stderr
    assert "s3cr3t" not in result.stderr


def test_private_token_file_starts(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ops admin s3cr3t-admin-token-0001\n")
    tokens.chmod(0o600)
    site = Site("primary", 1001, tmp_path)
    site.extra_args += ["--token-file", str(tokens)]
    site.start()
    try:
        with site.channel() as ch:
            stats = host_pb2_grpc.HostApiStub(ch).GetStats(
                host_pb2.StatsRequest(), metadata=(("authorization", "Bearer s3cr3t-admin-token-0001"),), timeout=5)
        assert stats.system_id == 1001
    finally:
        site.kill()


# ---------------------------------------------------------------------- one pair's trouble, another pair's link

def test_a_bulk_copy_at_the_largest_track_size_does_not_starve_another_pair(tmp_path: Path) -> None:
    """A pair copying 128 MiB of 1 MiB tracks and a DUPLEX pair share one
    link with a 3 s timeout: the DUPLEX pair's sync writes go on, it never
    leaves DUPLEX and the link is never thought lost."""
    primary = Site("primary", 1001, tmp_path, link_timeout=3.0)
    secondary = Site("secondary", 2001, tmp_path, link_timeout=3.0)
    primary.peer_with(secondary)
    secondary.start(timeout=60)
    primary.start(timeout=60)
    try:
        with primary.channel() as ch:
            stub = host_pb2_grpc.HostApiStub(ch)
            stub.CreateVolume(host_pb2.CreateVolumeRequest(name="small", size=4 << 20), timeout=10)
            stub.CreateVolume(host_pb2.CreateVolumeRequest(name="bulk", size=128 << 20, track_size=1 << 20),
                              timeout=10)
            chunk = bytes(range(1, 256)) * ((16 << 20) // 255 + 1)
            for offset in range(0, 128 << 20, 16 << 20):
                stub.Write(host_pb2.WriteRequest(volume="bulk", offset=offset, data=chunk[:16 << 20]), timeout=60)
            stub.CreatePair(host_pb2.CreatePairRequest(name="guard", pvol="small", svol="small-r", peer=2001),
                            timeout=10)
            wait_status(primary, "guard", ["DUPLEX"])
            seen = {site.role: len(site.log()) for site in (primary, secondary)}
            stub.CreatePair(host_pb2.CreatePairRequest(name="big", pvol="bulk", svol="bulk-r", peer=2001),
                            timeout=10)
            writes = 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                stub.Write(host_pb2.WriteRequest(volume="small", offset=(writes % 512) * 8192,
                                                 data=bytes([writes % 251 + 1]) * 8192), timeout=10)
                writes += 1
                rows = {r.pair: r.status for r in stub.DisplayPairs(host_pb2.DisplayPairsRequest(), timeout=10).rows}
                assert rows["guard"] == "DUPLEX", rows
                if rows["big"] == "DUPLEX":
                    break
                assert rows["big"] == "COPY", rows
            assert rows["big"] == "DUPLEX", "the bulk copy did not finish in time"
            with secondary.channel() as sch:
                sstub = host_pb2_grpc.HostApiStub(sch)
                for volume in ("small", "bulk"):
                    mine = stub.Checksum(host_pb2.ChecksumRequest(volume=volume), timeout=60).digest
                    theirs = sstub.Checksum(host_pb2.ChecksumRequest(volume=f"{volume}-r"), timeout=60).digest
                    assert mine == theirs, volume
        assert writes >= 1
        for site in (primary, secondary):
            since = site.log()[seen[site.role]:]
            assert " lost (" not in since and "suspected lost" not in since, since[-3000:]
    finally:
        primary.kill()
        secondary.kill()


def test_corrupt_bitmap_from_a_peer_is_refused_in_our_words(site: Site) -> None:
    md = ((SYSTEM_ID_KEY, "1001"),)
    with grpc.insecure_channel(site.interconnect) as ch:
        stub = interconnect_pb2_grpc.InterconnectStub(ch)
        stub.AttachMirror(interconnect_pb2.AttachMirrorRequest(pair="bm", pvol="bm", svol="bm-r", size=1 << 20,
                                                               track_size=8192, mode="sync"), metadata=md, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ReadTracks(interconnect_pb2.ReadTracksRequest(pair="bm", tracks=b"\xe5\xd1\x89G\x7f"),
                                 metadata=md, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("pair 'bm': the track bitmap from system 1001 does not parse "
                                   "(corrupt track bitmap (not a serialized roaring bitmap))"), err.value.details()
