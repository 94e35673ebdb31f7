"""Issue 15, finding 5 against real daemons: whole-volume checksums that their
callers abandon stop at the deadline, are bounded per client, and run on a
pool of their own, so that a replicated write never waits behind them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from splitmirror.testing import Site, wait_status
from splitmirror.v1 import host_pb2, host_pb2_grpc

HUGE = 8 << 40  # sparse: allocates nothing, but hashing it reads (or feeds) 8 TiB


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    secondary.start(timeout=60)
    primary.start(timeout=60)
    primary.cli("volume", "create", "db", "--size", "64M")
    primary.cli("pair", "create", "dbp", "--pvol", "db", "--svol", "db-r", "--peer", "2001")
    wait_status(primary, "dbp", ["DUPLEX"])
    for site in (primary, secondary):
        site.cli("volume", "create", "huge", "--size", str(HUGE))
    yield primary, secondary
    for site in (primary, secondary):
        site.kill()
    assert "Traceback" not in primary.log() + secondary.log()


def _abandon_checksums(site: Site, count: int, deadline: float) -> list[str]:
    """``count`` whole-volume checksums of the huge volume, each from its own
    connection, given up at ``deadline`` seconds; their status codes."""
    codes: list[str] = []

    def one() -> None:
        with site.channel() as ch:
            try:
                host_pb2_grpc.HostApiStub(ch).Checksum(host_pb2.ChecksumRequest(volume="huge"), timeout=deadline)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline + 30)
    return codes


def test_abandoned_whole_volume_checksums_do_not_stall_replicated_writes(pair: tuple[Site, Site]) -> None:
    primary, secondary = pair
    for site in (primary, secondary):
        codes = _abandon_checksums(site, 8, 3.0)
        # At most two per client run; the others are refused at once.
        assert codes.count("DEADLINE_EXCEEDED") <= 2 and codes.count("RESOURCE_EXHAUSTED") >= 6, codes
        assert set(codes) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, codes
    # A checksum without a deadline whose client hangs up (cancels) stops too.
    for site in (primary, secondary):
        with site.channel() as ch:
            call = host_pb2_grpc.HostApiStub(ch).Checksum.future(host_pb2.ChecksumRequest(volume="huge"))
            time.sleep(1.0)
            assert not call.done()
            call.cancel()
    # The abandoned ones stop: the daemons go (nearly) idle within a few steps.
    assert primary.proc is not None and secondary.proc is not None
    time.sleep(1.0)
    for proc in (primary.proc, secondary.proc):
        before = _cpu_seconds(proc.pid)
        time.sleep(2.0)
        assert _cpu_seconds(proc.pid) - before < 1.0, "a checksum went on after its caller gave up"
    # Replicated writes (1 MiB: through the I/O pools of both ends) are not held up.
    with primary.channel() as ch:
        stub = host_pb2_grpc.HostApiStub(ch)
        started = time.monotonic()
        for i in range(8):
            stub.Write(host_pb2.WriteRequest(volume="db", offset=i << 20, data=bytes([i + 1]) * (1 << 20)),
                       timeout=20)
        took = time.monotonic() - started
    assert took < 15, took
    assert primary.pair_row("dbp")["status"] == "DUPLEX"


def test_checksums_running_meanwhile_leave_replicated_writes_alone(pair: tuple[Site, Site]) -> None:
    """Two checksums per daemon (the most one client may run) hashing the
    huge volume while a host writes: every replicated write completes and
    both ends end up equal."""
    primary, secondary = pair
    stop = time.monotonic() + 20
    workers = [threading.Thread(target=_abandon_checksums, args=(site, 2, 20.0))
               for site in (primary, secondary)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    written = 0
    with primary.channel() as ch:
        stub = host_pb2_grpc.HostApiStub(ch)
        while time.monotonic() < stop - 5 and written < 64:
            stub.Write(host_pb2.WriteRequest(volume="db", offset=(written % 64) << 20,
                                             data=bytes([written % 251 + 1]) * (1 << 20)), timeout=10)
            written += 1
    for w in workers:
        w.join(timeout=60)
    assert written >= 8, written
    assert primary.pair_row("dbp")["status"] == "DUPLEX"
    with primary.channel() as a, secondary.channel() as b:
        mine = host_pb2_grpc.HostApiStub(a).Checksum(host_pb2.ChecksumRequest(volume="db"), timeout=60).digest
        theirs = host_pb2_grpc.HostApiStub(b).Checksum(host_pb2.ChecksumRequest(volume="db-r"), timeout=60).digest
    assert mine == theirs
