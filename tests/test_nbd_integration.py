"""NBD end to end: third-party clients (qemu-io, nbdinfo, nbdcopy, nbdfuse +
fuse2fs, e2fsck) against real primaryd/secondaryd processes.

The daemons are started once for the module (with ``--nbd``); every test
works on its own volumes and pairs.  A tiny raw NBD client below covers what
the real tools will not send: garbage handshakes, a client that vanishes
mid-WRITE, out-of-range and oversize requests, and a write on a connection
whose access was revoked by a status change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from client import Client
from splitmirror.testing import Site, wait_for, wait_status

MiB = 1 << 20
KiB = 1 << 10
TRACK = 8192
T = TypeVar("T")

TOOLS = ("qemu-io", "nbdinfo", "nbdcopy")
FS_TOOLS = ("nbdfuse", "fuse2fs", "mke2fs", "e2fsck", "fusermount3")

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason=f"NBD client tools missing: {[t for t in TOOLS if shutil.which(t) is None]} "
    "(Debian packages qemu-utils, libnbd-bin)",
)


# ------------------------------------------------------------------- helpers


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def uri(site: Site, export: str) -> str:
    return f"nbd://127.0.0.1:{site.nbd_port}/{export}"


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def qemu_io(target: str, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for command in commands:
        argv += ["-c", command]
    return run(*argv, target)


def assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{result.args} failed ({result.returncode}):\n{out}"
    # Older qemu-io exits 0 even when a command fails: look at the text too.
    for bad in ("failed", "Pattern verification"):
        assert bad not in out, f"{result.args}:\n{out}"
    return out


def nbdinfo(site: Site, export: str) -> dict[str, Any]:
    result = run("nbdinfo", "--json", uri(site, export))
    assert result.returncode == 0, result.stderr
    info: dict[str, Any] = json.loads(result.stdout)["exports"][0]
    return info


async def read_volume(site: Site, volume: str, offset: int, length: int) -> bytes:
    async with Client(site.address) as c:
        return await c.read(volume, offset, length)


async def checksum(site: Site, volume: str) -> str:
    async with Client(site.address) as c:
        return await c.checksum(volume)


def make_pair(primary: Site, secondary: Site, name: str, size: str) -> tuple[str, str]:
    """Volume ``name`` on the primary, mirrored sync to ``name-r``; both DUPLEX."""
    primary.cli("volume", "create", name, "--size", size)
    primary.cli("pair", "create", f"{name}-p", "--pvol", name, "--svol", f"{name}-r", "--peer",
                str(secondary.system_id), "--wait")
    wait_status(secondary, f"{name}-p", ["DUPLEX"])
    return name, f"{name}-r"


def log_lines(site: Site, since: int, *needles: str) -> list[str]:
    """Lines of the daemon log after byte ``since`` that contain every needle."""
    text = site.log()[since:]
    return [line for line in text.splitlines() if all(n in line for n in needles)]


# ------------------------------------------------------------ raw NBD client

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
FLAG_READ_ONLY = 1 << 1
EPERM, EINVAL, ENOSPC = 1, 22, 28


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"server closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server hangs up (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


class RawNbd:
    """A minimal fixed-newstyle client: NBD_OPT_GO, simple replies, one request at a time."""

    def __init__(self, port: int, export: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.local_port: int = self.sock.getsockname()[1]
        magic, opt, _flags = struct.unpack(">QQH", _recv_exact(self.sock, 18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload)
        self.size = self.flags = -1
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", _recv_exact(self.sock, 20))
            assert magic == OPT_REPLY_MAGIC
            data = _recv_exact(self.sock, length)
            if rtype == REP_INFO and data[:2] == b"\0\0":
                _, self.size, self.flags = struct.unpack(">HQH", data)
            elif rtype == REP_ACK:
                break
            elif rtype & (1 << 31):
                raise ConnectionError(f"NBD_OPT_GO refused ({rtype:#x}): {data!r}")
        self._handle = 0

    def send_request(self, ctype: int, offset: int, length: int, data: bytes = b"") -> int:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, ctype, self._handle, offset, length) + data)
        return self._handle

    def reply(self, handle: int, read_length: int = 0) -> tuple[int, bytes]:
        magic, error, got = struct.unpack(">IIQ", _recv_exact(self.sock, 16))
        assert magic == SIMPLE_REPLY_MAGIC and got == handle, (hex(magic), got, handle)
        data = _recv_exact(self.sock, read_length) if error == 0 and read_length else b""
        return error, data

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        return self.reply(self.send_request(CMD_READ, offset, length), length)

    def write(self, offset: int, data: bytes) -> int:
        return self.reply(self.send_request(CMD_WRITE, offset, len(data), data))[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send_request(CMD_DISC, 0, 0)
        self.sock.close()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def nbd_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    """primaryd 1001 and secondaryd 2001, peered, both serving NBD."""
    base = tmp_path_factory.mktemp("nbd-sites")
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


# --------------------------------------------------------------------- tests


def test_qemu_io_write_takes_the_replication_path(nbd_sites: tuple[Site, Site]) -> None:
    primary, secondary = nbd_sites
    pvol, spvol = make_pair(primary, secondary, "qio", "16M")
    out = assert_ok(qemu_io(uri(primary, pvol), "write -P 0xab 0 1M"))
    assert "wrote 1048576/1048576 bytes at offset 0" in out
    out = assert_ok(qemu_io(uri(primary, pvol), "read -P 0xab 0 1M"))
    assert "read 1048576/1048576 bytes at offset 0" in out
    # A sync pair: the write was on the SPVOL before qemu-io saw it acknowledged.
    assert run_async(read_volume(secondary, spvol, 0, MiB)) == b"\xab" * MiB
    assert run_async(checksum(primary, pvol)) == run_async(checksum(secondary, spvol))
    # The SPVOL export is readable (read-only) at the secondary.
    assert_ok(qemu_io(uri(secondary, spvol), "read -P 0xab 0 1M", "read -P 0 1M 1M", read_only=True))


def test_nbdinfo_and_spvol_access_follows_pair_status(nbd_sites: tuple[Site, Site]) -> None:
    primary, secondary = nbd_sites
    pvol, spvol = make_pair(primary, secondary, "acc", "8M")
    info = nbdinfo(primary, pvol)
    assert info["export-size"] == 8 * MiB and info["is_read_only"] is False
    info = nbdinfo(secondary, spvol)
    assert info["export-size"] == 8 * MiB and info["is_read_only"] is True

    # qemu-io refuses to open a read-only export for writing; the write fails.
    result = qemu_io(uri(secondary, spvol), "write -P 0xcd 0 64k")
    out = result.stdout + result.stderr
    assert result.returncode != 0 or "failed" in out, out
    assert any(s in out for s in ("Permission denied", "Operation not permitted", "read-only", "read only")), out
    # At the protocol level a WRITE gets EPERM, and nothing is written.
    raw = RawNbd(secondary.nbd_port, spvol)
    try:
        assert raw.flags & FLAG_READ_ONLY
        assert raw.write(0, b"\xcd" * 4096) == EPERM
        assert raw.read(0, 4096) == (0, bytes(4096))
    finally:
        raw.close()
    assert secondary.pair_row("acc-p")["pending_tracks"] == 0

    primary.cli("pair", "split", "acc-p")
    wait_status(secondary, "acc-p", ["SPLIT"])
    assert nbdinfo(secondary, spvol)["is_read_only"] is False  # a new connection sees it writable
    assert_ok(qemu_io(uri(secondary, spvol), "write -P 0xcd 0 64k"))
    row = secondary.pair_row("acc-p")
    assert row["pending_tracks"] == 64 * KiB // TRACK, row
    assert run_async(read_volume(primary, pvol, 0, 64 * KiB)) == bytes(64 * KiB)  # not mirrored while split

    # A status change that revokes write access reaches a connected client.
    raw = RawNbd(secondary.nbd_port, spvol)
    try:
        assert not raw.flags & FLAG_READ_ONLY
        assert raw.write(128 * KiB, b"\x11" * 4096) == 0
        primary.cli("pair", "resync", "acc-p", "--wait")
        wait_status(secondary, "acc-p", ["DUPLEX"])
        assert raw.write(128 * KiB, b"\x22" * 4096) == EPERM
        assert raw.read(128 * KiB, 4096) == (0, bytes(4096))  # the resync copied the PVOL back over it
    finally:
        raw.close()


def test_nbdcopy_in_and_out_byte_identical(nbd_sites: tuple[Site, Site], tmp_path: Path) -> None:
    primary, _ = nbd_sites
    size = 32 * MiB
    src, back = tmp_path / "random.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(size))
    primary.cli("volume", "create", "copy", "--size", str(size))
    assert_ok(run("nbdcopy", "--flush", str(src), uri(primary, "copy")))
    assert_ok(run("nbdcopy", uri(primary, "copy"), str(back)))
    assert back.stat().st_size == size
    assert back.read_bytes() == src.read_bytes()


def test_flush_trim_and_write_zeroes_on_both_ends(nbd_sites: tuple[Site, Site]) -> None:
    primary, secondary = nbd_sites
    pvol, spvol = make_pair(primary, secondary, "zero", "4M")
    assert_ok(qemu_io(uri(primary, pvol), "write -P 0xab 0 512k", "flush"))
    out = assert_ok(qemu_io(uri(primary, pvol), "write -z 0 64k", "discard 128k 64k", "flush"))
    assert "discard 65536/65536 bytes at offset 131072" in out
    assert_ok(qemu_io(uri(primary, pvol), "read -P 0 0 64k", "read -P 0xab 64k 64k", "read -P 0 128k 64k",
                      "read -P 0xab 192k 320k"))
    expected = bytes(64 * KiB) + b"\xab" * (64 * KiB) + bytes(64 * KiB) + b"\xab" * (320 * KiB)
    assert run_async(read_volume(secondary, spvol, 0, 512 * KiB)) == expected
    assert_ok(qemu_io(uri(secondary, spvol), "read -P 0 0 64k", "read -P 0 128k 64k", read_only=True))


def _make_tree(root: Path) -> None:
    (root / "etc" / "app").mkdir(parents=True)
    (root / "var" / "lib" / "db" / "empty").mkdir(parents=True)
    (root / "hello.txt").write_text("hello, splitmirror\n")
    (root / "etc" / "app" / "config.toml").write_text("[server]\nport = 10809\n" * 50)
    (root / "var" / "lib" / "db" / "data.bin").write_bytes(os.urandom(6 * MiB + 12345))
    (root / "var" / "lib" / "db" / "small.bin").write_bytes(os.urandom(3000))
    (root / "zero-length").touch()
    (root / "data-link").symlink_to("var/lib/db/data.bin")


def _compare_trees(src: Path, mounted: Path) -> int:
    """Assert ``mounted`` holds exactly ``src`` (ignoring lost+found); returns files compared."""
    compared = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        seen = {p.name for p in (mounted / rel).iterdir()} - {"lost+found"}
        assert seen == set(dirnames) | set(filenames), f"{rel}: {sorted(seen)}"
        for name in filenames + dirnames:
            a, b = Path(dirpath) / name, mounted / rel / name
            if a.is_symlink():
                assert b.is_symlink() and os.readlink(b) == os.readlink(a), b
            elif a.is_file():
                assert b.is_file() and b.read_bytes() == a.read_bytes(), f"{b} differs"
                compared += 1
            else:
                assert b.is_dir() and not b.is_symlink(), b
    return compared


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}")
        return os.path.ismount(path)

    wait_for(ready, timeout=15, interval=0.05, what=f"{what} to mount {path}")


def _unmount(path: Path, proc: subprocess.Popen[bytes] | None) -> None:
    if os.path.ismount(path):
        result = run("fusermount3", "-u", str(path))
        if result.returncode != 0:
            run("fusermount3", "-uz", str(path))
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="/dev/fuse is missing: cannot run nbdfuse/fuse2fs")
@pytest.mark.skipif(any(shutil.which(t) is None for t in FS_TOOLS),
                    reason=f"filesystem tools missing: {[t for t in FS_TOOLS if shutil.which(t) is None]} "
                    "(Debian packages libnbd-bin/nbdfuse, fuse2fs, e2fsprogs, fuse3)")
def test_filesystem_round_trip_through_the_remote_mirror(nbd_sites: tuple[Site, Site], tmp_path: Path) -> None:
    primary, secondary = nbd_sites
    src, img = tmp_path / "tree", tmp_path / "fs.img"
    src.mkdir()
    _make_tree(src)
    assert_ok(run("mke2fs", "-F", "-q", "-t", "ext4", "-d", str(src), str(img), "64M"))
    pvol, spvol = make_pair(primary, secondary, "fs", "64M")
    assert_ok(run("nbdcopy", "--flush", str(img), uri(primary, pvol)))
    assert run_async(checksum(primary, pvol)) == run_async(checksum(secondary, spvol))

    # No local SPVOL -> SVOL pair yet (issue 5): split the remote pair and use the SPVOL.
    primary.cli("pair", "split", "fs-p")
    wait_status(secondary, "fs-p", ["SPLIT"])

    copied = tmp_path / "spvol.img"
    assert_ok(run("nbdcopy", uri(secondary, spvol), str(copied)))
    assert copied.read_bytes() == img.read_bytes()
    fsck = run("e2fsck", "-fn", str(copied))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    mnt, fsdir = tmp_path / "nbd-mnt", tmp_path / "fs-mnt"
    mnt.mkdir()
    fsdir.mkdir()
    nbdfuse: subprocess.Popen[bytes] | None = None
    fuse2fs: subprocess.Popen[bytes] | None = None
    try:
        nbdfuse = subprocess.Popen(["nbdfuse", "--readonly", f"{mnt}/", uri(secondary, spvol)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_mounted(mnt, nbdfuse, "nbdfuse")
        assert (mnt / "nbd").stat().st_size == 64 * MiB
        fuse2fs = subprocess.Popen(["fuse2fs", "-f", "-o", "ro,fakeroot", str(mnt / "nbd"), str(fsdir)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_mounted(fsdir, fuse2fs, "fuse2fs")
        assert _compare_trees(src, fsdir) == 5
    finally:
        _unmount(fsdir, fuse2fs)
        _unmount(mnt, nbdfuse)
    assert not os.path.ismount(fsdir) and not os.path.ismount(mnt)


def test_bad_clients_do_not_disturb_a_good_one(nbd_sites: tuple[Site, Site]) -> None:
    primary, _ = nbd_sites
    size = 8 * MiB
    primary.cli("volume", "create", "bad", "--size", str(size))
    since = len(primary.log())
    # A good client that keeps its connection open while the bad ones act.
    good = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "sleep 2500",
                             "-c", "write -P 0x5b 1M 1M", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x5b 1M 1M",
                             uri(primary, "bad")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log_lines(primary, since, "connection opened"), timeout=10, what="qemu-io to connect")
        also_good = RawNbd(primary.nbd_port, "bad")

        # 1. Garbage instead of a handshake.
        junk = socket.create_connection(("127.0.0.1", primary.nbd_port), timeout=10)
        junk_port = junk.getsockname()[1]
        junk.sendall(b"GET / HTTP/1.1\r\nHost: splitmirror\r\n\r\n" + os.urandom(512))
        assert closed_by_server(junk)
        junk.close()
        # ... and valid client flags followed by an option with the wrong magic.
        bad_magic = socket.create_connection(("127.0.0.1", primary.nbd_port), timeout=10)
        bad_magic_port = bad_magic.getsockname()[1]
        _recv_exact(bad_magic, 18)
        bad_magic.sendall(struct.pack(">I", 1) + struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
        assert closed_by_server(bad_magic)
        bad_magic.close()

        # 2. A client that disconnects in the middle of a 1 MiB WRITE.
        quitter = RawNbd(primary.nbd_port, "bad")
        quitter.send_request(CMD_WRITE, 4 * MiB, MiB, b"\xee" * (100 * KiB))
        quitter.sock.close()

        # 3. Requests beyond the end of the volume, and over the maximum size.
        assert also_good.read(size - 4096, 8192) == (EINVAL, b"")
        assert also_good.write(size, b"\x01" * 512) == ENOSPC
        assert also_good.read(0, 64 * MiB)[0] == EINVAL
        assert also_good.write(2 * MiB, b"\x77" * 4096) == 0  # the connection still works
        assert also_good.read(2 * MiB, 4096) == (0, b"\x77" * 4096)
        also_good.close()

        out, _ = good.communicate(timeout=30)
    finally:
        if good.poll() is None:
            good.kill()
            good.wait()
    text = out.decode(errors="replace")
    assert good.returncode == 0 and "failed" not in text and "Pattern" not in text, text

    wait_for(lambda: log_lines(primary, since, f":{quitter.local_port}: connection closed"), timeout=10,
             what="the daemon to notice the departed client")
    log = primary.log()[since:]
    assert len(log_lines(primary, since, f":{junk_port}:", "WARNING")) == 1, log
    assert len(log_lines(primary, since, f":{junk_port}: protocol error", "client flags")) == 1, log
    assert len(log_lines(primary, since, f":{bad_magic_port}:", "WARNING")) == 1, log
    assert len(log_lines(primary, since, f":{bad_magic_port}: protocol error", "magic")) == 1, log
    assert len(log_lines(primary, since, f":{quitter.local_port}:", "mid-message")) == 1, log
    assert len(log_lines(primary, since, "refused READ", "beyond export size")) == 1
    assert len(log_lines(primary, since, "refused WRITE", "beyond export size")) == 1
    # The half-sent WRITE changed nothing; the good client's data is all there.
    data = run_async(read_volume(primary, "bad", 0, size))
    assert data[:MiB] == b"\x5a" * MiB and data[MiB:2 * MiB] == b"\x5b" * MiB
    assert data[4 * MiB:5 * MiB] == bytes(MiB)
    # qemu-io itself refuses an access beyond the end cleanly.
    result = qemu_io(uri(primary, "bad"), f"read {size} 64k")
    assert "failed" in result.stdout + result.stderr
    assert primary.proc is not None and primary.proc.poll() is None
    assert nbdinfo(primary, "bad")["export-size"] == size
