"""Start-up checks that must pass before a daemon touches its data.

Each failure is one :class:`StartupError` naming the flag and its value; the
daemon prints it as one line and exits with status 2, having opened nothing:
the data directory is locked first (a second daemon on it would overwrite
the first one's clean-start marker), then every address is bound once to
see that it is free, then the certificates are parsed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from ..errors import InvalidArgument
from .config import DaemonConfig

LOCK_NAME = "daemon.lock"


class StartupError(InvalidArgument):
    """A setting that cannot work on this machine: ``FLAG VALUE: reason``."""

    def __init__(self, flag: str, value: object, reason: str) -> None:
        super().__init__(f"{flag} {value}: {reason}")
        self.flag = flag


class DataDirLock:
    """An exclusive ``flock`` on ``DATA_DIR/daemon.lock`` holding the owner's PID.

    The kernel releases it when the process ends, however it ends; the file stays.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self.fd = -1

    def acquire(self) -> None:
        parent = self.data_dir.absolute().parent
        if not self.data_dir.is_dir():
            if self.data_dir.exists():
                raise StartupError("--data-dir", self.data_dir, "is not a directory")
            if not parent.is_dir():
                raise StartupError("--data-dir", self.data_dir, f"its parent {parent} does not exist")
            try:
                self.data_dir.mkdir(exist_ok=True)
            except OSError as exc:
                raise StartupError("--data-dir", self.data_dir, f"cannot create: {exc.strerror}") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError("--data-dir", self.data_dir, f"cannot open {LOCK_NAME}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StartupError("--data-dir", self.data_dir, f"cannot lock: {exc.strerror}") from None
            who = f"process {holder}" if holder else "another process"
            raise StartupError("--data-dir", self.data_dir,
                               f"in use by {who} (another daemon holds {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return 0
    return int(text) if text.isdecimal() else 0


def check_address(flag: str, address: str) -> None:
    """Bind ``address`` once (as the servers will, with SO_REUSEADDR) and let go."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise StartupError(flag, address, f"cannot resolve {host!r}: {exc}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    reason = "address already in use (is another daemon running?)"
                elif exc.errno == errno.EADDRNOTAVAIL:
                    reason = "no such address on this machine"
                else:
                    reason = exc.strerror or str(exc)
                raise StartupError(flag, address, reason) from None


def check_addresses(config: DaemonConfig) -> None:
    named = [("--listen", config.listen), ("--interconnect", config.interconnect),
             ("--nbd", config.nbd), ("--metrics", config.metrics)]
    seen: dict[str, str] = {}
    for flag, address in named:
        if not address:
            continue
        if address in seen and not address.endswith(":0"):
            raise StartupError(flag, address, f"the same address as {seen[address]}")
        seen[address] = flag
        check_address(flag, address)


def check_tls(config: DaemonConfig) -> None:
    """The daemon's certificate, key and the CA parse (a missing file was caught with the settings)."""
    if not config.tls_dir:
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    directory = Path(config.tls_dir)
    stem = str(config.system_id)
    for name in ("ca.pem", f"{stem}.pem"):
        try:
            x509.load_pem_x509_certificate((directory / name).read_bytes())
        except OSError as exc:
            raise StartupError("--tls-dir", directory, f"cannot read {name}: {exc.strerror}") from None
        except ValueError:
            raise StartupError("--tls-dir", directory, f"{name} is not a PEM certificate") from None
    try:
        serialization.load_pem_private_key((directory / f"{stem}.key").read_bytes(), None)
    except OSError as exc:
        raise StartupError("--tls-dir", directory, f"cannot read {stem}.key: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise StartupError("--tls-dir", directory, f"{stem}.key is not an unencrypted PEM private key") from None
