"""Issue 15's NBD findings, each attack run against real daemons.

Raw sockets play the attacker; libnbd (its Python binding, as nbdsh uses it,
run by the system interpreter) plays the careless client whose refused
WRITEs must not cost it the connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror import tls
from splitmirror.testing import Site, wait_for, wait_status
from splitmirror.v1 import host_pb2, host_pb2_grpc
from tests.test_nbd_integration import (
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

