"""Issue 15's NBD findings, each attack run against real daemons.

Raw sockets play the attacker; libnbd (its Python binding, as nbdsh uses it,
run by the system interpreter) plays the careless client whose refused
WRITEs must not cost it the connection.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import Client
from splitmirror import tls
from splitmirror.testing import Site, wait_for, wait_status
from splitmirror.v1 import host_pb2, host_pb2_grpc
from tests.test_nbd_integration import (
    CMD_READ,
    CMD_WRITE,
    IHAVEOPT,
    OPT_REPLY_MAGIC,
    RawNbd,
    _recv_exact,
    closed_by_server,
    log_lines,
    read_volume,
    run_async,
)

MiB = 1 << 20
OPT_EXPORT_NAME, OPT_LIST, OPT_STARTTLS = 1, 3, 5
SYSTEM_PYTHON = "/usr/bin/python3"
HANDSHAKE_TIMEOUT = 3


def _has_libnbd() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30)
    return probe.returncode == 0


needs_libnbd = pytest.mark.skipif(not _has_libnbd(), reason="libnbd's Python binding (python3-libnbd) is missing")


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def request(ctype: int, handle: int, offset: int, length: int, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, ctype, handle, offset, length) + data


def handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    _recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 1))  # FIXED_NEWSTYLE, zero padding after EXPORT_NAME
    return sock


def option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rtype, length = struct.unpack(">QIII", _recv_exact(sock, 20))
    assert magic == OPT_REPLY_MAGIC
    return opt, rtype, _recv_exact(sock, length)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    """primaryd 1001 and secondaryd 2001, peered, both serving NBD (no TLS)."""
    base = tmp_path_factory.mktemp("nbd-hostile")
    primary = Site("primary", 1001, base, nbd=True)
    secondary = Site("secondary", 2001, base, nbd=True)
    primary.peer_with(secondary)
    primary.extra_args += ["--nbd-handshake-timeout", str(HANDSHAKE_TIMEOUT)]
    try:
        secondary.start()
        primary.start()
        yield primary, secondary
    finally:
        for site in (primary, secondary):
            site.kill()
    for site in (primary, secondary):
        assert "Traceback" not in site.log(), f"{site.role}d logged a traceback:\n{site.log()}"


@pytest.fixture
def tls_site(tmp_path: Path) -> Iterator[Site]:
    tls.init_dir(tmp_path / "tls", [1001], tls.parse_clients("admin"))
    site = Site("primary", 1001, tmp_path, tls_dir=tmp_path / "tls", nbd=True)
    site.start()
    yield site
    site.kill()


# ------------------------------------------------------ finding 1: STARTTLS


def test_bytes_injected_with_starttls_never_run(tls_site: Site) -> None:
    """A man in the middle appends EXPORT_NAME and a WRITE to an admin's STARTTLS;
    the admin then completes the TLS handshake. Nothing of it may run."""
    site = tls_site
    assert site.tls_dir is not None
    site.cli("volume", "create", "victim", "--size", "1M")
    since = len(site.log())
    sock = handshake(site.nbd_port)
    sock.sendall(option(OPT_STARTTLS) + option(OPT_EXPORT_NAME, b"victim")
                 + request(CMD_WRITE, 1, 0, 4096, b"\x66" * 4096))
    # The admin's side of the TLS handshake, as the victim's client would run it.
    admin = site.tls_dir / "nbd-admin"
    context = ssl.create_default_context(cafile=str(admin / "ca-cert.pem"))
    context.check_hostname = False
    context.load_cert_chain(str(admin / "client-cert.pem"), str(admin / "client-key.pem"))
    sock.settimeout(5)
    answer = sock.recv(20)
    if answer:  # before the fix: STARTTLS acknowledged; the admin's handshake runs the injected bytes
        wrapped = context.wrap_socket(sock, server_hostname="splitmirror")
        wrapped.settimeout(5)
        with contextlib.suppress(OSError):
            wrapped.recv(1)
        wrapped.close()
    sock.close()
    with site.channel() as channel:
        stub = host_pb2_grpc.HostApiStub(channel)
        data = stub.Read(host_pb2.ReadRequest(volume="victim", offset=0, length=4096), timeout=10).data
    assert data == bytes(4096), "the injected WRITE landed"
    assert answer == b"", "STARTTLS was answered although injected bytes followed it"
    wait_for(lambda: log_lines(site, since, "after NBD_OPT_STARTTLS"), timeout=10, what="the refusal in the log")


# --------------------------------------------- options before an export (2)


def test_33rd_option_hangs_up(sites: tuple[Site, Site]) -> None:
    primary, _ = sites
    since = len(primary.log())
    sock = handshake(primary.nbd_port)
    for _ in range(32):
        sock.sendall(option(OPT_LIST))
        while option_reply(sock)[1] != 1:  # NBD_REP_SERVER entries, then the ACK
            pass
    sock.sendall(option(OPT_LIST))
    assert closed_by_server(sock)
    sock.close()
    assert log_lines(primary, since, "more than 32 options")


# ------------------------------------------------ finding 10: refused WRITEs

LIBNBD_SCRIPT = r"""
import errno, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # send what a careless client would; the server must judge
h.connect_uri(sys.argv[1])
size = h.get_size()
for offset, length in ((size, 4096), (0, 32 * 1024 * 1024 + 4096), (size - 512, 64 * 1024)):
    try:
        h.pwrite(b"\x99" * length, offset)
        print("accepted", offset, length)
    except nbd.Error as exc:
        print("refused", errno.errorcode.get(exc.errno, exc.errno))
print("read", h.pread(4096, 0).hex()[:8])
h.shutdown()
"""


def _libnbd(uri: str) -> list[str]:
    done = subprocess.run([SYSTEM_PYTHON, "-c", LIBNBD_SCRIPT, uri], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


@needs_libnbd
def test_refused_writes_keep_libnbd_connected(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    primary.cli("volume", "create", "careless", "--size", "1M")
    primary.cli("pair", "create", "careless-p", "--pvol", "careless", "--svol", "careless-r", "--peer",
                str(secondary.system_id), "--wait")
    wait_status(secondary, "careless-p", ["DUPLEX"])
    raw = RawNbd(primary.nbd_port, "careless")
    assert raw.write(0, b"\x42" * 4096) == 0
    raw.close()
    # Past the end, over 32 MiB, past the end again: each refused, the connection kept.
    lines = _libnbd(f"nbd://127.0.0.1:{primary.nbd_port}/careless")
    assert lines == ["refused ENOSPC", "refused EINVAL", "refused ENOSPC", "read 42424242"], lines
    # The SVOL of a DUPLEX pair is read-only: EPERM, and the connection kept.
    lines = _libnbd(f"nbd://127.0.0.1:{secondary.nbd_port}/careless-r")
    assert lines == ["refused EPERM"] * 3 + ["read 42424242"], lines
    assert run_async(read_volume(primary, "careless", MiB - 4096, 4096)) == bytes(4096)



# ------------------------------------------ finding 2: descriptors, deadlines


class LimitedSite(Site):
    """A daemon started under ``prlimit --nofile=LIMIT:LIMIT``."""

    def __init__(self, *args: Any, nofile: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nofile = nofile

    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *super().argv()]


def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def test_handshake_deadline_and_per_client_cap(sites: tuple[Site, Site]) -> None:
    primary, _ = sites
    since = len(primary.log())
    idle = [_connect_from("127.0.0.1", primary.nbd_port) for _ in range(64)]
    try:
        extra = _connect_from("127.0.0.1", primary.nbd_port)
        assert closed_by_server(extra, timeout=5)  # the 65th from one address
        extra.close()
        other = _connect_from("127.0.0.3", primary.nbd_port)  # another address is served
        assert _recv_exact(other, 8) == b"NBDMAGIC"
        # Nobody finishes a handshake: all are hung up on after the deadline.
        started = time.monotonic()
        for sock in [*idle, other]:
            assert closed_by_server(sock, timeout=HANDSHAKE_TIMEOUT + 10)
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 10
    finally:
        for sock in idle:
            sock.close()
    assert log_lines(primary, since, "connection refused", "64 NBD connections open from this address")
    assert log_lines(primary, since, f"handshake not finished within {HANDSHAKE_TIMEOUT} s")


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is missing")
def test_nbd_flood_leaves_host_api_and_replication_serving(tmp_path: Path) -> None:
    """1,100 idle connections from 22 addresses to a daemon whose open-file limit
    is 1024: NBD stops at its cap; the host API and replicated writes go on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    primary = LimitedSite("primary", 1001, tmp_path, nbd=True, nofile=1024)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    primary.extra_args += ["--nbd-handshake-timeout", "120"]
    flood: list[socket.socket] = []
    try:
        secondary.start()
        primary.start()
        primary.cli("volume", "create", "db", "--size", "4M")
        primary.cli("pair", "create", "db-p", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
        for n in range(1100):
            flood.append(_connect_from(f"127.0.0.{2 + n % 22}", primary.nbd_port))
        time.sleep(1)  # let the daemon accept what it will

        async def still_serving() -> None:
            async with Client(primary.address, timeout=20) as c:
                await c.create_volume("after-flood", MiB)
                await c.write("db", 0, b"\x5e" * 65536)
                assert await c.read("db", 0, 65536) == b"\x5e" * 65536
            async with Client(secondary.address, timeout=20) as c:
                assert await c.read("db-r", 0, 65536) == b"\x5e" * 65536

        run_async(still_serving())
        wait_status(primary, "db-p", ["DUPLEX"])
        served = sum(1 for sock in flood if not closed_by_server(sock, timeout=0.01))
        assert served <= 512, served
        assert log_lines(primary, 0, "connection refused", "512 NBD connections open")
    finally:
        for sock in flood:
            sock.close()
        primary.kill()
        secondary.kill()
    assert "Too many open files" not in primary.log()


# ------------------------------------------------- finding 6: bytes in flight


def _rss_mib(site: Site) -> float:
    assert site.proc is not None
    for line in Path(f"/proc/{site.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_pipelined_reads_never_read_hold_bounded_memory(sites: tuple[Site, Site]) -> None:
    """32 READs of 32 MiB sent at once, no reply ever read: the daemon holds a
    bounded amount (not 1 GiB), and gives it back when the client leaves."""
    primary, _ = sites
    primary.cli("volume", "create", "big", "--size", "64M")
    base = _rss_mib(primary)
    client = RawNbd(primary.nbd_port, "big")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    for n in range(32):
        client.sock.sendall(request(CMD_READ, n + 1, (n % 2) * 32 * MiB, 32 * MiB))
    peak = base
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        peak = max(peak, _rss_mib(primary))
        time.sleep(0.1)
    assert peak - base < 320, f"RSS grew by {peak - base:.0f} MiB"
    client.sock.close()
    wait_for(lambda: _rss_mib(primary) - base < 100, timeout=15, what="memory given back after the disconnect")
    # The daemon still serves.
    again = RawNbd(primary.nbd_port, "big")
    assert again.read(0, 4096) == (0, bytes(4096))
    again.close()
