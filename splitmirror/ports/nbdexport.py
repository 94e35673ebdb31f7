"""Volumes as NBD exports: the storage system behind :mod:`splitmirror.nbd`.

Every NBD request goes through the same :class:`StorageSystem` calls as the
gRPC host API, so replication, pending bitmaps, write ordering and fencing
apply unchanged.  Access is asked of the system at each request, so a status
change that revokes write access reaches connected clients at once.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Mapping
from typing import NamedTuple

from ..addresses import parse_address
from ..datapath.system import StorageSystem
from ..errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, PermissionDenied, SplitmirrorError
from ..nbd import ExportError, NbdServer
from ..nbd.server import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PER_CLIENT
from ..observe.iometer import IoMeter
from ..storage.volume import Volume
from ..tls import TlsFiles, subject_from_der
from .access import AccessPolicy
from .nbdmeter import MeteredExport

log = logging.getLogger("splitmirror.nbd")


def _errno(exc: SplitmirrorError) -> int:
    if isinstance(exc, FailedPrecondition | PermissionDenied):
        return errno.EPERM
    if isinstance(exc, OutOfRange):
        return errno.ENOSPC
    if isinstance(exc, InvalidArgument):
        return errno.EINVAL
    if isinstance(exc, NotFound):
        return errno.ENOENT
    return errno.EIO


class VolumeExport:
    """One volume seen by one NBD connection."""

    def __init__(self, system: StorageSystem, volume: Volume) -> None:
        self.system = system
        self.volume = volume

    @property
    def name(self) -> str:
        return self.volume.name

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def block_size(self) -> int:
        return self.volume.track_size

    def _live(self) -> Volume:
        if self.system.volumes.get(self.volume.name) is not self.volume:
            raise ExportError(errno.ESHUTDOWN, f"volume {self.volume.name!r} was deleted")
        return self.volume

    def read_only(self) -> bool:
        return self.system.write_refusal(self._live()) is not None

    async def read(self, offset: int, length: int) -> bytes:
        try:
            return await self.system.host_read(self._live().name, offset, length)
        except SplitmirrorError as exc:
            raise ExportError(_errno(exc), exc.message) from None

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        try:
            await self.system.host_write(self._live().name, offset, data, fua)
        except SplitmirrorError as exc:
            raise ExportError(_errno(exc), exc.message) from None

    async def flush(self) -> None:
        try:
            await self.system.host_flush(self._live().name)
        except SplitmirrorError as exc:
            raise ExportError(_errno(exc), exc.message) from None

    async def trim(self, offset: int, length: int) -> None:
        # Discarded ranges read back as zeroes on both ends of every mirror.
        await self.write_zeroes(offset, length, fua=False)

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        try:
            await self.system.host_write_zeroes(self._live().name, offset, length)
            if fua:
                await self.system.host_flush(self.volume.name)
        except SplitmirrorError as exc:
            raise ExportError(_errno(exc), exc.message) from None

    async def allocation(self, offset: int, length: int) -> list[tuple[int, bool]]:
        vol = self._live()
        end = min(vol.size, offset + length)
        ranges = await vol.run(lambda: vol.allocated_ranges(offset, end))
        extents: list[tuple[int, bool]] = []
        pos = offset
        for start, n in ranges:
            start = max(start, offset)
            if start > pos:
                extents.append((start - pos, False))
            extents.append((start + n - max(start, pos), True))
            pos = start + n
        if pos < end:
            extents.append((end - pos, False))
        return [(n, a) for n, a in extents if n > 0]


class VolumeCatalog:
    """All volumes of a storage system, by name."""

    def __init__(self, system: StorageSystem, meter: IoMeter | None = None) -> None:
        self.system = system
        self.meter = meter

    def export_names(self) -> list[str]:
        return sorted(self.system.volumes)

    def open_export(self, name: str) -> VolumeExport:
        vol = self.system.volumes.get(name)
        if vol is None:
            raise ExportError(errno.ENOENT, f"no volume named {name!r} on system {self.system.system_id}")
        fence = self.system.fences.get(name)
        if fence is not None:
            raise ExportError(errno.EPERM, f"volume {name!r} fenced for restore ({fence})")
        export = VolumeExport(self.system, vol)
        return export if self.meter is None else MeteredExport(export, self.meter)  # type: ignore[return-value]


class Admission:
    """Who may attach which export.

    Client networks per export (``--nbd-allow``; ``*``: every export; no
    entry: any address). With TLS, also the identity of the verified client
    certificate, by the same rules as the host API (see
    :meth:`AccessPolicy.export_refusal`): admin every export, host those its
    ``--host-volumes`` patterns name, viewer none. Refused attaches (not
    listings, which merely leave the export out) get an audit line.
    """

    def __init__(self, allow: Mapping[str, list[str]], tls: bool, policy: AccessPolicy | None = None) -> None:
        self.allow = {name: [ipaddress.ip_network(n, strict=False) for n in nets] for name, nets in allow.items()}
        self.tls = tls
        self.policy = policy or AccessPolicy(tls)

    def __call__(self, export: str, address: str, cert: bytes | None, listing: bool = False) -> str | None:
        nets = self.allow.get(export, self.allow.get("*"))
        if nets is not None:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return f"client address {address} is not allowed to attach export {export!r}"
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not any(ip.version == n.version and ip in n for n in nets):
                return f"client address {address} is not allowed to attach export {export!r}"
        if self.tls:
            subject = subject_from_der(cert) if cert else None
            refusal = self.policy.export_refusal(subject, export)
            if refusal is not None and not listing:
                self.policy.audit_export(subject, export, address, refusal)
            return refusal
        return None


class NbdLimits(NamedTuple):
    """How many NBD connections are served at once, and how long a handshake may take."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_client: int = DEFAULT_MAX_PER_CLIENT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT


async def start_nbd(system: StorageSystem, address: str, tls: TlsFiles | None = None,
                    allow: Mapping[str, list[str]] | None = None,
                    policy: AccessPolicy | None = None, meter: IoMeter | None = None,
                    limits: NbdLimits | None = None) -> tuple[NbdServer, int]:
    """Serve ``system``'s volumes over NBD; ``policy`` (the host API's) says which
    client certificate may attach what when ``tls`` is given."""
    host, _, port = parse_address("nbd", address).rpartition(":")
    admit = Admission(allow or {}, tls is not None, policy)
    limits = limits or NbdLimits()
    server = NbdServer(VolumeCatalog(system, meter), host.strip("[]"), int(port), logger=log,
                       tls=tls.server_ssl_context() if tls is not None else None, admit=admit,
                       max_connections=limits.max_connections, max_per_client=limits.max_per_client,
                       handshake_timeout=limits.handshake_timeout)
    await server.start()
    return server, server.bound_port
