"""Unit tests of the client library and the ``splitmirror`` CLI.

No daemon is needed: the tests that talk gRPC use a small in-memory fake of
the host API served on loopback from a background thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from client import Client, ClientError
from client.cli import main
from client.cli.entry import error_message
from client.cli.parser import build_parser, parse_args, resolve_sizes
from client.render import PAIR_KEYS, pair_row_json, progress_json, volume_json
from splitmirror.errors import SplitmirrorError
from splitmirror.v1 import host_pb2, host_pb2_grpc

UNREACHABLE = "127.0.0.1:1"

# ---------------------------------------------------------------------- fake host API


class FakeHostApi(host_pb2_grpc.HostApiServicer):
    """Just enough of a storage system: volumes in memory, pairs that copy in
    a few polls."""

    def __init__(self) -> None:
        self.volumes: dict[str, bytearray] = {}
        self.track_sizes: dict[str, int] = {}
        self.pairs: dict[str, host_pb2.PairRow] = {}
        self.polls: dict[str, int] = {}
        self.fail_pair: dict[str, str] = {}  # pair -> reason it goes SUSPENDED
        self.in_flight = 0
        self.max_in_flight = 0
        self.write_sizes: list[int] = []

    async def _volume(self, name: str, context: Any) -> bytearray:
        if name not in self.volumes:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"volume {name!r} not found")
        return self.volumes[name]

    def _vol_msg(self, name: str) -> host_pb2.Volume:
        data = self.volumes[name]
        ts = self.track_sizes[name]
        return host_pb2.Volume(name=name, size=len(data), track_size=ts, tracks=len(data) // ts,
                               allocated_bytes=0, role="SIMPLEX", host_writable=True)

    async def CreateVolume(self, request: host_pb2.CreateVolumeRequest, context: Any) -> host_pb2.Volume:
        if request.name in self.volumes:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"volume {request.name!r} already exists")
        self.volumes[request.name] = bytearray(request.size)
        self.track_sizes[request.name] = request.track_size or 8192
        return self._vol_msg(request.name)

    async def ListVolumes(
        self, request: host_pb2.ListVolumesRequest, context: Any
    ) -> host_pb2.ListVolumesReply:
        return host_pb2.ListVolumesReply(volumes=[self._vol_msg(n) for n in sorted(self.volumes)])

    async def GetVolume(self, request: host_pb2.VolumeRef, context: Any) -> host_pb2.Volume:
        await self._volume(request.name, context)
        return self._vol_msg(request.name)

    async def DeleteVolume(self, request: host_pb2.VolumeRef, context: Any) -> host_pb2.Empty:
        await self._volume(request.name, context)
        del self.volumes[request.name]
        return host_pb2.Empty()

    async def Write(self, request: host_pb2.WriteRequest, context: Any) -> host_pb2.WriteReply:
        vol = await self._volume(request.volume, context)
        if not request.data or request.offset + len(request.data) > len(vol):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "write out of range")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.005)
            vol[request.offset:request.offset + len(request.data)] = request.data
            self.write_sizes.append(len(request.data))
        finally:
            self.in_flight -= 1
        return host_pb2.WriteReply(written=len(request.data))

    async def Read(self, request: host_pb2.ReadRequest, context: Any) -> host_pb2.ReadReply:
        vol = await self._volume(request.volume, context)
        if not request.length or request.offset + request.length > len(vol):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "read out of range")
        return host_pb2.ReadReply(data=bytes(vol[request.offset:request.offset + request.length]))

    async def Flush(self, request: host_pb2.VolumeRef, context: Any) -> host_pb2.Empty:
        await self._volume(request.name, context)
        return host_pb2.Empty()

    async def Checksum(self, request: host_pb2.ChecksumRequest, context: Any) -> host_pb2.ChecksumReply:
        vol = await self._volume(request.volume, context)
        end = request.offset + request.length if request.length else len(vol)
        digest = hashlib.sha256(bytes(vol[request.offset:end])).hexdigest()
        return host_pb2.ChecksumReply(algorithm="sha256", digest=digest)

    def _rows(self, name: str) -> list[host_pb2.PairRow]:
        primary = self.pairs[name]
        secondary = host_pb2.PairRow()
        secondary.CopyFrom(primary)
        secondary.primary = False
        secondary.volume, secondary.mirror_volume = primary.mirror_volume, primary.volume
        return [primary, secondary]

    async def CreatePair(self, request: host_pb2.CreatePairRequest, context: Any) -> host_pb2.PairList:
        for vol in (request.pvol, request.svol):
            await self._volume(vol, context)
        self.pairs[request.name] = host_pb2.PairRow(
            pair=request.name, volume=request.pvol, copy_type="REMOTE" if request.peer else "LOCAL",
            pair_system_id=request.peer, mirror_volume=request.svol, primary=True, status="COPY",
            mode=request.mode or "sync", group=request.group, has_progress=True, progress=0.0,
            pending_tracks=100, rate_bytes_per_s=1 << 20, eta_seconds=3.0,
        )
        self.polls[request.name] = 0
        return host_pb2.PairList(rows=self._rows(request.name))

    def _advance(self, name: str) -> None:
        row = self.pairs[name]
        if row.status != "COPY":
            return
        self.polls[name] += 1
        if name in self.fail_pair and self.polls[name] >= 2:
            row.status, row.reason = "SUSPENDED", self.fail_pair[name]
            row.has_progress, row.progress = False, 0.0
        elif self.polls[name] >= 3:
            row.status, row.has_progress, row.progress, row.pending_tracks = "DUPLEX", False, 0.0, 0
        else:
            row.progress = 40.0 * self.polls[name]
            row.pending_tracks = 100 - int(row.progress)

    async def DisplayPairs(self, request: host_pb2.DisplayPairsRequest, context: Any) -> host_pb2.PairList:
        if request.name:
            if request.name not in self.pairs:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"pair {request.name!r} not found")
            self._advance(request.name)
            return host_pb2.PairList(rows=self._rows(request.name))
        return host_pb2.PairList(rows=[r for n in sorted(self.pairs) for r in self._rows(n)])

    async def SplitPair(self, request: host_pb2.PairRef, context: Any) -> host_pb2.PairList:
        row = self.pairs.get(request.name)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"pair {request.name!r} not found")
            raise AssertionError
        if row.status != "DUPLEX":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"pair {request.name!r} is {row.status}; cannot split")
        row.status, row.split_time = "SPLIT", "2024-01-02T03:04:05Z"
        return host_pb2.PairList(rows=self._rows(request.name))

    async def ResyncPair(self, request: host_pb2.ResyncPairRequest, context: Any) -> host_pb2.PairList:
        row = self.pairs[request.name]
        row.status, row.has_progress, row.progress = "COPY", True, 0.0
        self.polls[request.name] = 0
        return host_pb2.PairList(rows=self._rows(request.name))

    async def DeletePair(self, request: host_pb2.PairRef, context: Any) -> host_pb2.Empty:
        self.pairs.pop(request.name)
        return host_pb2.Empty()

    async def GetStats(self, request: host_pb2.StatsRequest, context: Any) -> host_pb2.Stats:
        return host_pb2.Stats(
            system_id=1, role="primary", interconnect_bytes_sent=3 << 20, interconnect_bytes_received=12,
            pairs=[host_pb2.PairCounters(pair="p1", replicated_writes=5, replicated_bytes=1 << 20)],
        )


class FakeServer:
    """Serves a FakeHostApi from its own thread and event loop, so both
    in-process ``main()`` (which calls asyncio.run) and async tests can use it."""

    def __init__(self) -> None:
        self.api = FakeHostApi()
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                          ("grpc.max_send_message_length", 64 << 20)])
        host_pb2_grpc.add_HostApiServicer_to_server(self.api, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.address = f"127.0.0.1:{port}"
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.stop(None)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "fake server did not start"

    def stop(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------- argument parsing


def test_parse_global_options_and_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITMIRROR_SERVER", raising=False)
    args = parse_args(["--server", "h:1", "--json", "volume", "create", "v1", "--size", "16G",
                       "--track-size", "64K"])
    assert (args.server, args.json, args.command, args.action, args.name) == (
        "h:1", True, "volume", "create", "v1")
    resolve_sizes(args)
    assert (args.size, args.track_size) == (16 << 30, 64 << 10)

    args = parse_args(["--server", "h:1", "read", "v1", "--offset", "1M", "--length", "4096"])
    resolve_sizes(args)
    assert (args.offset, args.length, args.out, args.json) == (1 << 20, 4096, None, False)


def test_parse_server_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITMIRROR_SERVER", "env-host:7000")
    assert parse_args(["stats"]).server == "env-host:7000"
    assert parse_args(["--server", "flag:1", "stats"]).server == "flag:1"


def test_json_flag_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITMIRROR_SERVER", "h:1")
    assert parse_args(["pair", "display", "--json"]).json is True
    assert parse_args(["--json", "pair", "display"]).json is True
    assert parse_args(["pair", "display"]).json is False


def test_parse_pair_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITMIRROR_SERVER", "h:1")
    args = parse_args(["pair", "create", "p1", "--pvol", "a", "--svol", "b", "--peer", "2", "--mode", "async",
                       "--group", "g", "--wait"])
    assert (args.name, args.pvol, args.svol, args.peer, args.mode, args.group, args.wait) == (
        "p1", "a", "b", 2, "async", "g", True)
    args = parse_args(["pair", "create", "p1", "--pvol", "a", "--svol", "b"])
    assert (args.peer, args.mode, args.group, args.wait) == (0, "sync", "", False)
    args = parse_args(["pair", "resync", "p1", "--reverse", "--force"])
    assert (args.reverse, args.force, args.wait) == (True, True, False)
    assert parse_args(["pair", "display"]).name == ""
    assert parse_args(["pair", "display", "p1"]).name == "p1"


@pytest.mark.parametrize("argv", [
    ["stats"],                                                   # no server at all
    ["--server", "h:1"],                                         # no command
    ["--server", "h:1", "volume"],                               # no action
    ["--server", "h:1", "pair", "create", "p", "--pvol", "a"],   # missing --svol
    ["--server", "h:1", "pair", "create", "p", "--pvol", "a", "--svol", "b", "--mode", "semi"],
    ["--server", "h:1", "pair", "create", "p", "--pvol", "a", "--svol", "b", "--peer", "x"],
    ["--server", "h:1", "read", "v"],                            # missing --length
])
def test_usage_errors_exit_2(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SPLITMIRROR_SERVER", raising=False)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert "splitmirror: error:" in err
    assert "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "volume" in out and "pair" in out
    assert build_parser().prog == "splitmirror"


# ---------------------------------------------------------------------- JSON rendering


def test_pair_row_json_while_copying() -> None:
    row = host_pb2.PairRow(
        pair="p1", volume="pvol", copy_type="REMOTE", pair_system_id=2, mirror_volume="spvol", primary=True,
        status="COPY", mode="sync", group="g1", pending_tracks=42, has_progress=True, progress=37.5,
        reason="", rate_bytes_per_s=1e6, eta_seconds=4.0, direction="forward",
    )
    obj = pair_row_json(row)
    # The documented keys, then rate and ETA while copying.
    assert list(obj) == [*PAIR_KEYS, "rate_bytes_per_s", "eta_seconds"]
    assert obj == {
        "pair": "p1", "volume": "pvol", "copy_type": "REMOTE", "pair_system_id": 2, "mirror_volume": "spvol",
        "primary": True, "status": "COPY", "mode": "sync", "group": "g1", "pending_tracks": 42,
        "progress": 37.5, "split_time": None, "status_since": None, "rate_bytes_per_s": 1e6, "eta_seconds": 4.0,
    }
    assert json.loads(json.dumps(obj)) == obj


def test_pair_row_json_split_and_types() -> None:
    row = host_pb2.PairRow(pair="p2", volume="spvol", copy_type="LOCAL", pair_system_id=0,
                           mirror_volume="svol1", primary=False, status="SPLIT", mode="async",
                           pending_tracks=7, has_progress=False, progress=12.0,
                           split_time="2024-05-06T07:08:09+00:00")
    obj = pair_row_json(row)
    assert obj["progress"] is None          # has_progress wins over a stale value
    assert obj["split_time"] == "2024-05-06T07:08:09+00:00"
    assert obj["primary"] is False
    assert type(obj["pair_system_id"]) is int and type(obj["pending_tracks"]) is int
    assert obj["group"] == ""
    zero = pair_row_json(host_pb2.PairRow(has_progress=True, progress=0.0))
    assert zero["progress"] == 0.0 and isinstance(zero["progress"], float)


def test_progress_and_volume_json() -> None:
    row = host_pb2.PairRow(pair="p", has_progress=True, progress=50.0, rate_bytes_per_s=2.5e6, eta_seconds=8)
    assert progress_json(row) == {
        "pair": "p", "progress": 50.0, "rate_bytes_per_s": 2.5e6, "eta_seconds": 8.0}
    vol = host_pb2.Volume(name="v", size=1 << 30, track_size=8192, tracks=131072, allocated_bytes=4096,
                          role="PVOL", host_writable=True, fence_reason="")
    assert volume_json(vol) == {"name": "v", "size": 1 << 30, "track_size": 8192, "tracks": 131072,
                                "allocated_bytes": 4096, "role": "PVOL", "host_writable": True,
                                "fence_reason": ""}


# ---------------------------------------------------------------------- error lines


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("splitmirror: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv", [
    ["volume", "list"],
    ["--json", "pair", "display"],
    ["stats"],
    ["read", "v1", "--length", "4K"],
])
def test_unreachable_server_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    code, out, err = run_cli(capsys, "--server", UNREACHABLE, *argv)
    assert time.monotonic() - start < 5
    assert code == 1
    assert out == ""
    line = _one_error_line(err)
    assert UNREACHABLE in line
    assert "refused" in line.lower()


def test_bad_size_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--server", UNREACHABLE, "volume", "create", "v", "--size", "12Q")
    assert code == 1 and out == ""
    assert "--size" in _one_error_line(err)


def test_missing_file_is_one_line(capsys: pytest.CaptureFixture[str], fake: FakeServer) -> None:
    code, _, err = run_cli(capsys, "--server", fake.address, "write", "v", "--file", "/nonexistent/data.bin")
    assert code == 1
    assert "/nonexistent/data.bin" in _one_error_line(err)


def test_error_message_formats() -> None:
    assert error_message(ClientError("NOT_FOUND", "volume 'x' not found")) == "volume 'x' not found"
    refused = ClientError("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:"
                                         "127.0.0.1:1: Failed to connect to remote host: Connection refused")
    assert error_message(refused, "127.0.0.1:1") == (
        "cannot reach splitmirror server at 127.0.0.1:1: Connection refused")
    foreign_ca = ClientError("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:"
                                            "127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
                                            "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
                                            "unable to get local issuer certificate: OK")
    assert error_message(foreign_ca, "127.0.0.1:1").startswith(
        "TLS handshake with splitmirror server at 127.0.0.1:1 failed: CERTIFICATE_VERIFY_FAILED "
        "(unable to get local issuer certificate); check that --tls-dir")
    plaintext = ClientError("UNAVAILABLE", "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:"
                                           "127.0.0.1:1: Socket closed")
    assert "pass --tls-dir" in error_message(plaintext, "127.0.0.1:1")
    assert error_message(ClientError("INTERNAL", "two\nlines")) == "two lines"
    assert error_message(SplitmirrorError("bad")) == "bad"


# ---------------------------------------------------------------------- against the fake server


def test_server_error_is_one_line(capsys: pytest.CaptureFixture[str], fake: FakeServer) -> None:
    code, out, err = run_cli(capsys, "--server", fake.address, "volume", "show", "nope")
    assert code == 1 and out == ""
    assert _one_error_line(err) == "splitmirror: error: volume 'nope' not found"


def test_volume_commands(capsys: pytest.CaptureFixture[str], fake: FakeServer) -> None:
    code, out, _ = run_cli(capsys, "--server", fake.address, "--json", "volume", "create", "v1",
                           "--size", "1M", "--track-size", "4K")
    assert code == 0
    assert json.loads(out) == {"name": "v1", "size": 1 << 20, "track_size": 4096, "tracks": 256,
                               "allocated_bytes": 0, "role": "SIMPLEX", "host_writable": True,
                               "fence_reason": ""}
    code, out, _ = run_cli(capsys, "--server", fake.address, "volume", "list")
    assert code == 0
    assert "NAME" in out and "v1" in out and "1.0 MiB" in out and "4.0 KiB" in out
    code, out, _ = run_cli(capsys, "--server", fake.address, "volume", "show", "v1")
    assert code == 0 and "1048576 bytes" in out
    code, out, _ = run_cli(capsys, "--server", fake.address, "--json", "volume", "list")
    assert [v["name"] for v in json.loads(out)] == ["v1"]
    code, out, _ = run_cli(capsys, "--server", fake.address, "--json", "volume", "delete", "v1")
    assert code == 0 and json.loads(out) == {"volume": "v1", "deleted": True}


def test_write_read_checksum_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      fake: FakeServer) -> None:
    fake.api.volumes["v"] = bytearray(8 << 20)
    fake.api.track_sizes["v"] = 8192
    payload = bytes(range(256)) * (14 * 1024 + 3)   # ~3.5 MiB: four chunks, the last one partial
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    code, out, _ = run_cli(capsys, "--server", fake.address, "--json", "write", "v", "--offset", "1M",
                           "--file", str(src), "--fua")
    assert code == 0
    assert json.loads(out) == {"volume": "v", "offset": 1 << 20, "written": len(payload)}
    assert bytes(fake.api.volumes["v"][1 << 20:(1 << 20) + len(payload)]) == payload
    assert max(fake.api.write_sizes) == 1 << 20

    dst = tmp_path / "out.bin"
    code, _, _ = run_cli(capsys, "--server", fake.address, "read", "v", "--offset", "1M",
                         "--length", str(len(payload)), "--out", str(dst))
    assert code == 0
    assert dst.read_bytes() == payload

    code, out, _ = run_cli(capsys, "--server", fake.address, "--json", "checksum", "v", "--offset", "1M",
                           "--length", str(len(payload)))
    assert code == 0
    assert json.loads(out)["digest"] == hashlib.sha256(payload).hexdigest()

    code, out, _ = run_cli(capsys, "--server", fake.address, "--json", "flush", "v")
    assert code == 0 and json.loads(out) == {"volume": "v", "flushed": True}


def test_read_to_stdout_is_binary(capfdbinary: pytest.CaptureFixture[bytes], fake: FakeServer) -> None:
    fake.api.volumes["v"] = bytearray(b"\x00\xffabc" + bytes(4091))
    fake.api.track_sizes["v"] = 4096
    assert main(["--server", fake.address, "read", "v", "--length", "5"]) == 0
    assert capfdbinary.readouterr().out == b"\x00\xffabc"


def test_pair_create_wait_json(capsys: pytest.CaptureFixture[str], fake: FakeServer) -> None:
    for name in ("a", "b"):
        fake.api.volumes[name] = bytearray(1 << 20)
        fake.api.track_sizes[name] = 8192
    code, out, err = run_cli(capsys, "--server", fake.address, "--json", "pair", "create", "p1",
                             "--pvol", "a", "--svol", "b", "--wait")
    assert code == 0
    rows = json.loads(out)
    assert [r["status"] for r in rows] == ["DUPLEX", "DUPLEX"]
    assert all(list(r) == list(PAIR_KEYS) for r in rows)
    progress = [json.loads(line) for line in err.splitlines()]
    assert progress, "expected progress lines on stderr"
    assert all(set(p) == {"pair", "progress", "rate_bytes_per_s", "eta_seconds"} for p in progress)
    assert progress[0]["progress"] == 40.0

    code, out, _ = run_cli(capsys, "--server", fake.address, "pair", "split", "p1")
    assert code == 0 and "SPLIT" in out and "2024-01-02T03:04:05Z" in out
    code, out, _ = run_cli(capsys, "--server", fake.address, "pair", "split", "p1")
    assert code == 1
    code, out, err = run_cli(capsys, "--server", fake.address, "pair", "resync", "p1", "--wait")
    # No TTY: progress as plain lines on stderr, the result on stdout.
    assert code == 0 and "DUPLEX" in out
    assert err.splitlines() == ["pair p1: COPY 40.0% 1.0 MiB/s ETA 0:00:03", "pair p1: DUPLEX 100.0%"]
    code, out, _ = run_cli(capsys, "--server", fake.address, "pair", "display")
    assert code == 0 and "PAIR" in out and "p1" in out
    code, out, _ = run_cli(capsys, "--server", fake.address, "--json", "pair", "delete", "p1")
    assert code == 0 and json.loads(out) == {"pair": "p1", "deleted": True}


def test_pair_wait_suspended_fails(capsys: pytest.CaptureFixture[str], fake: FakeServer) -> None:
    for name in ("a", "b"):
        fake.api.volumes[name] = bytearray(1 << 20)
        fake.api.track_sizes[name] = 8192
    fake.api.fail_pair["p1"] = "peer 2 unreachable"
    code, _, err = run_cli(capsys, "--server", fake.address, "pair", "create", "p1", "--pvol", "a",
                           "--svol", "b", "--peer", "2", "--wait")
    assert code == 1
    progress, _, error = err.rpartition("splitmirror: error:")
    assert progress.splitlines() == ["pair p1: COPY 40.0% 1.0 MiB/s ETA 0:00:03", "pair p1: SUSPENDED -"]
    assert _one_error_line("splitmirror: error:" + error) == \
        "splitmirror: error: pair 'p1' is SUSPENDED: peer 2 unreachable"


def test_stats(capsys: pytest.CaptureFixture[str], fake: FakeServer) -> None:
    code, out, _ = run_cli(capsys, "--server", fake.address, "--json", "stats")
    assert code == 0
    obj = json.loads(out)
    assert obj["system_id"] == 1 and obj["interconnect_bytes_sent"] == 3 << 20
    assert obj["pairs"][0]["replicated_bytes"] == 1 << 20
    code, out, _ = run_cli(capsys, "--server", fake.address, "stats")
    assert code == 0 and "3.0 MiB" in out and "p1" in out


# ---------------------------------------------------------------------- library


async def test_library_chunked_io_respects_depth(fake: FakeServer) -> None:
    fake.api.volumes["v"] = bytearray(4 << 20)
    fake.api.track_sizes["v"] = 8192
    data = bytes(range(256)) * (3 * 4096 + 17)
    async with Client(fake.address) as c:
        written = await c.write("v", 4096, data, chunk=64 << 10, depth=3)
        assert written == len(data)
        assert fake.api.max_in_flight == 3
        assert await c.read("v", 4096, len(data), chunk=100_000) == data
        assert await c.checksum("v", 4096, len(data)) == hashlib.sha256(data).hexdigest()


async def test_library_errors_carry_code_and_message(fake: FakeServer) -> None:
    async with Client(fake.address) as c:
        with pytest.raises(ClientError) as info:
            await c.get_volume("ghost")
        assert info.value.code == "NOT_FOUND"
        assert str(info.value) == info.value.message == "volume 'ghost' not found"
        await c.create_volume("v", 1 << 20)
        with pytest.raises(ClientError) as info:
            await c.write("v", (1 << 20) - 10, b"x" * 100)
        assert info.value.code == "OUT_OF_RANGE"


async def test_library_wait_pair(fake: FakeServer) -> None:
    fake.api.volumes["a"] = bytearray(1 << 20)
    fake.api.volumes["b"] = bytearray(1 << 20)
    fake.api.track_sizes.update(a=8192, b=8192)
    seen: list[str] = []
    async with Client(fake.address) as c:
        rows = await c.create_pair("p", "a", "b")
        assert rows[0].status == "COPY"
        row = await c.wait_pair("p", timeout=10, on_progress=lambda r: seen.append(r.status))
        assert row.primary and row.volume == "a" and row.status == "DUPLEX"
        assert seen[-1] == "DUPLEX" and "COPY" in seen
        await c.split_pair("p")
        with pytest.raises(ClientError) as info:
            await c.wait_pair("p", timeout=0.3)
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert (await c.wait_pair("p", {"SPLIT"})).status == "SPLIT"


async def test_library_unreachable() -> None:
    async with Client(UNREACHABLE) as c:
        with pytest.raises(ClientError) as info:
            await c.list_volumes()
    assert info.value.code == "UNAVAILABLE"
