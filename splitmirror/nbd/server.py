"""Asyncio NBD server: the listener.

:class:`NbdServer` accepts clients, keeps track of their connections and ends
them all on close.  Each client is driven by a
:class:`~splitmirror.nbd.connection.Connection` around its own
:class:`~splitmirror.nbd.codec.NbdCodec`.  Works on the default event loop and
on uvloop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from typing import Final

from .backend import Admission, ExportCatalog
from .codec import NbdCodec
from .connection import Connection
from .constants import DEFAULT_MAX_REQUEST

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IN_FLIGHT_BYTES",
    "DEFAULT_MAX_PER_CLIENT",
    "Admission",
    "NbdServer",
]

DEFAULT_MAX_IN_FLIGHT: Final = 64
#: Connections served at once, in all and per client address (more are closed at once).
DEFAULT_MAX_CONNECTIONS: Final = 512
DEFAULT_MAX_PER_CLIENT: Final = 64
#: Seconds from accept to the end of the handshake (TLS included), as qemu-nbd.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
#: Request and reply payload bytes one connection may hold; reading stops beyond.
DEFAULT_MAX_IN_FLIGHT_BYTES: Final = 2 * DEFAULT_MAX_REQUEST
_SHUTDOWN_GRACE: Final = 5.0  # seconds in-flight commands get on shutdown; handed to each Connection


class NbdServer:
    """Serves the exports of ``catalog`` over NBD (fixed newstyle; TLS by
    NBD_OPT_STARTTLS, required when ``tls`` is given)."""

    def __init__(
        self,
        catalog: ExportCatalog,
        host: str,
        port: int,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        logger: logging.Logger | None = None,
        tls: ssl.SSLContext | None = None,
        admit: Admission | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_client: int = DEFAULT_MAX_PER_CLIENT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
    ) -> None:
        NbdCodec(max_request=max_request)  # raises ValueError for a bad max_request
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be positive: {max_in_flight}")
        if min(max_connections, max_per_client) < 1 or handshake_timeout <= 0:
            raise ValueError("connection limits and the handshake timeout must be positive")
        if max_in_flight_bytes < max_request:
            raise ValueError(f"max_in_flight_bytes {max_in_flight_bytes} is below max_request {max_request}")
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.handshake_timeout = handshake_timeout
        self.max_in_flight_bytes = max_in_flight_bytes
        self._per_client: collections.Counter[str] = collections.Counter()
        self.refused_connections = 0
        self.catalog = catalog
        self.host = host
        self.port = port
        self.max_request = max_request
        self.max_in_flight = max_in_flight
        #: With a context, TLS is required (NBD_OPT_STARTTLS before anything else).
        self.tls = tls
        #: Asked before an export is opened or listed: (export, client address, TLS peer certificate,
        #: whether only listing).
        self.admit = admit
        self.log = logger or logging.getLogger("splitmirror.nbd")
        self._server: asyncio.Server | None = None
        self._clients: set[Connection] = set()
        self._closing = False

    async def start(self) -> None:
        """Bind and start accepting connections."""
        if self._server is not None:
            raise RuntimeError("NbdServer already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_connection, self.host, self.port, backlog=128)

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful when constructed with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("NbdServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, end every connection and wait until all are gone."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.shutdown(_SHUTDOWN_GRACE) for c in list(self._clients)), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> NbdServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _new_connection(self) -> Connection:
        return Connection(self, self._admit_connection, self._closed)

    def _admit_connection(self, connection: Connection) -> str | None:
        address = connection.address
        refusal = "server shutting down" if self._closing else self._over_limit(address)
        if refusal is not None:
            self.refused_connections += 1
            if self.refused_connections & (self.refused_connections - 1) == 0:  # 1, 2, 4, ...: no log flood
                self.log.warning("nbd %s: connection refused: %s (%d refused so far)", address, refusal,
                                 self.refused_connections)
            return refusal
        self._clients.add(connection)
        self._per_client[address] += 1
        return None

    def _closed(self, connection: Connection) -> None:
        if connection in self._clients:
            self._clients.discard(connection)
            address = connection.address
            self._per_client[address] -= 1
            if self._per_client[address] <= 0:
                del self._per_client[address]

    def _over_limit(self, address: str) -> str | None:
        if len(self._clients) >= self.max_connections:
            return f"{self.max_connections} NBD connections open (the server's limit)"
        if self._per_client[address] >= self.max_per_client:
            return f"{self.max_per_client} NBD connections open from this address (the limit per client)"
        return None

    def export_connections(self) -> dict[str, int]:
        """Connections attached to each export now."""
        return dict(collections.Counter(c.export_name for c in self._clients if c.export is not None))
