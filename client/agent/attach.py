"""Attach an NBD export as a local file: the ``nbdfuse`` daemon (with ``qemu-nbd`` for TLS).

:class:`NbdAttachment` runs ``nbdfuse`` so that the export appears as the
file ``nbd_dir``/nbd, which :mod:`client.agent.mount` hands to ``fuse2fs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import urllib.parse
from pathlib import Path

from .errors import AgentError
from .fuse import first_line, is_mounted, reap, spawn, unmount, wait_mounted

__all__ = ["NbdAttachment"]


class NbdAttachment:
    """The ``nbdfuse`` daemon that exposes one NBD export as the file ``base``/nbd/nbd."""

    def __init__(self, url: str, writable: bool, base: Path) -> None:
        self.url = url
        self.writable = writable
        self.base = base
        self.nbd_dir = base / "nbd"
        self.device = self.nbd_dir / "nbd"
        self.nbdfuse: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        argv = _nbdfuse_argv(self.url, self.writable, self.nbd_dir)
        self.nbdfuse = await spawn(argv, self.base / "nbdfuse")
        if not await wait_mounted(self.nbdfuse, self.nbd_dir, "nbdfuse"):
            raise AgentError(f"cannot attach {self.url}: {first_line(self.base / 'nbdfuse', self.nbdfuse)}")

    async def stop(self) -> None:
        """Flush (if writable) and unmount the file, wait for nbdfuse to exit; clear a dead mount."""
        if is_mounted(self.nbd_dir):
            if self.writable:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(_fsync_path, self.device)
            await unmount(self.nbd_dir)
        if self.nbdfuse is not None:
            await reap(self.nbdfuse)
        if is_mounted(self.nbd_dir):
            await unmount(self.nbd_dir)


def _nbdfuse_argv(url: str, writable: bool, nbd_dir: Path) -> list[str]:
    """The ``nbdfuse`` command that exposes ``url`` as the file ``nbd_dir``/nbd.

    nbdfuse refuses the ``tls-certificates`` parameter of an ``nbds://`` URI
    (libnbd's "local file access ... is not allowed"), and for root libnbd's
    only default certificate directory is /etc/pki/libnbd. So an ``nbds://``
    URI naming a certificate directory is attached through ``qemu-nbd`` as a
    socket-activated TLS client (the same ca-cert.pem / client-cert.pem /
    client-key.pem layout); nbdfuse starts it and ends it as it unmounts.
    """
    mode = [] if writable else ["--readonly"]
    parsed = urllib.parse.urlsplit(url)
    certs = urllib.parse.parse_qs(parsed.query).get("tls-certificates")
    if parsed.scheme != "nbds" or not certs:
        return ["nbdfuse", *mode, f"{nbd_dir}/", url]
    if shutil.which("qemu-nbd") is None:
        raise AgentError(f"cannot attach {url}: qemu-nbd not found (install the Debian package qemu-utils); "
                         "it carries the client certificate for nbdfuse")

    def opt(value: str) -> str:  # QEMU's option syntax doubles a literal comma
        return value.replace(",", ",,")

    export = urllib.parse.unquote(parsed.path[1:] if parsed.path.startswith("/") else parsed.path)
    image = (f"driver=nbd,host={opt(parsed.hostname or 'localhost')},port={parsed.port or 10809},"
             f"export={opt(export)},tls-creds=tls0")
    qemu_nbd = ["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={opt(certs[-1])}",
                "--image-opts", image, "--shared=16", *(["--discard=unmap"] if writable else ["--read-only"])]
    return ["nbdfuse", *mode, f"{nbd_dir}/", "[", *qemu_nbd, "]"]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
