"""What the NBD server needs from the storage system: named exports, and
who may attach them.

The NBD layer knows nothing about pairs or replication.  The storage system
hands it an :class:`ExportCatalog`; each export opened from it routes reads,
writes and flushes through the same code path as the gRPC host API, so
replication, pending bitmaps and fencing apply to NBD writes too.  An
optional :data:`Admission` callback decides which client may open or list
which export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class ExportError(Exception):
    """A request the export refuses; ``errno`` is sent back to the client.

    ``errno`` is one of the NBD error values (EPERM=1, EIO=5, ENOMEM=12,
    EINVAL=22, ENOSPC=28, EOVERFLOW=75, ESHUTDOWN=108).
    """

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


class Export(Protocol):
    """One opened export (one volume) as seen by one NBD connection."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def block_size(self) -> int:
        """Preferred block size (the volume's track size)."""
        ...

    def read_only(self) -> bool:
        """True when host writes are refused right now.

        Asked at handshake time (to set NBD_FLAG_READ_ONLY) and again before
        each write, so a status change that revokes write access takes effect
        for connected clients too.
        """
        ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, fua: bool) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None: ...

    async def allocation(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Extents from ``offset`` covering at most ``length`` bytes.

        Each item is ``(extent_length, allocated)``; used for
        ``NBD_CMD_BLOCK_STATUS`` with the ``base:allocation`` context.
        """
        ...


class ExportCatalog(Protocol):
    """Looks exports up by name for the handshake phase."""

    def export_names(self) -> list[str]: ...

    def open_export(self, name: str) -> Export:
        """Return the export or raise :class:`ExportError`.

        Raises ``ExportError`` with errno ENOENT(2) for an unknown name and
        EPERM(1) with a message such as ``volume 'db' fenced for restore``
        when the export may not be attached now.
        """
        ...


#: Asked before an export is opened or listed: (export name, client address, DER client certificate
#: or None, only listing) -> why refused, or None.
Admission = Callable[[str, str, bytes | None, bool], str | None]
