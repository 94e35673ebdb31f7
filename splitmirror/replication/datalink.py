"""The data connection to one peer, seen from the primary end (the source).

One TCP connection (TLS with ``--tls-dir``, the same certificates and names
as the interconnect) per peer link carries the ordered write streams of
every pair with that peer, each on a channel of its own
(:mod:`.dataproto`).  The peer offers the connection by advertising its
data port in its keepalive answers (``HelloReply.data_port``); a peer that
advertises none is reached over the ``Replicate`` gRPC call instead.

The thin I/O layer: an :class:`asyncio.BufferedProtocol` reads straight into
the protocol's buffers; a batch goes out as one ``writelines`` of its frame
head, entry headers and payloads (no copy of a payload here); acks reach
the stream by a direct call from the read callback (no task, no queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

from ..tls import TlsFiles, system_host_name
from . import dataproto as dp
from .queue import Entry

log = logging.getLogger("splitmirror.link")

#: Seconds the data connection is not tried again after it could not be made
#: (the streams meanwhile use the gRPC interconnect).
RETRY_AFTER = 10.0


class LinkError(ConnectionError):
    """A data channel ended; the text is the stream's failure reason."""


def keepalive(sock: socket.socket | None, timeout: float) -> None:
    """TCP keepalive: a connection to a peer that vanished ends within ~2 link timeouts."""
    if sock is None:
        return
    idle = max(1, round(timeout))
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 2))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Data sent and not acknowledged by the peer's TCP for this long ends the connection too.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 2 * idle * 1000)


class DataChannel:
    """One pair's stream on the data connection."""

    def __init__(self, conn: _Connection, number: int, on_ack: Callable[[int], None]) -> None:
        self.conn = conn
        self.number = number
        self.on_ack = on_ack
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def batch_limit(self) -> int | None:
        """A batch fits in one frame of the size the peer announced in its HELLO
        (entry headers are within ``Entry.wire_bytes``)."""
        peer = self.conn.proto.peer
        return None if peer is None else peer.max_frame - dp.CHANNEL_BYTES

    async def send(self, batch: list[Entry]) -> None:
        """The batch's frames in one write; waits while the socket's buffer is full."""
        if self.ended.done():
            await self.ended
        parts: list[bytes | memoryview] = []
        run: list[Entry] = []
        for e in batch:
            if e.marker is None:
                run.append(e)
                continue
            if run:
                parts += dp.batch(self.number, run)
                run = []
            parts.append(dp.marker(self.number, e))
        if run:
            parts += dp.batch(self.number, run)
        await self.conn.write(parts)

    async def run(self) -> None:
        """Until the channel ends: raises :class:`LinkError` with the reason."""
        await self.ended

    def end(self, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_exception(LinkError(reason))
            self.ended.exception()  # retrieved: nobody need wait for it

    def close(self, broken: bool = False) -> None:
        """The stream stops using this channel; ``broken``: no ack came in time (the
        connection is dropped too when the peer sent nothing on any channel meanwhile)."""
        self.end("stream closed")
        self.conn.release(self, broken)


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, link: DataLink) -> None:
        self.link = link
        self.proto = dp.DataProtocol("source", dp.SMALL_FRAME)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[dp.Hello] = asyncio.get_running_loop().create_future()
        self.channels: dict[int, DataChannel] = {}
        self.next_channel = 1
        self.lost = ""
        #: When the peer last sent anything: a silent connection is suspect, one slow pair is not.
        self.last_heard = time.monotonic()
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio callbacks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        keepalive(transport.get_extra_info("socket"), self.link.timeout)
        self.transport.write(dp.hello(self.link.own_id, dp.SMALL_FRAME))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proto.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.last_heard = time.monotonic()
        try:
            events = self.proto.received(nbytes)
        except dp.ProtocolError as exc:
            self.fail(f"link error: peer system {self.link.peer_id} broke the data protocol: {exc.message}")
            return
        for event in events:
            if isinstance(event, dp.Ack):
                channel = self.channels.get(event.channel)
                if channel is not None:
                    channel.on_ack(event.seq)
            elif isinstance(event, dp.Hello):
                self._hello(event)
            elif isinstance(event, dp.Error):
                self._error(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail("link error: data connection lost" + (f" ({exc})" if exc else ""))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- events -------------------------------------------------------------------------------
    def _hello(self, event: dp.Hello) -> None:
        if event.system_id != self.link.peer_id:
            self.fail(f"link error: the data port of peer system {self.link.peer_id} answered as system "
                      f"{event.system_id}")
        elif not self.ready.done():
            self.ready.set_result(event)

    def _error(self, event: dp.Error) -> None:
        reason = f"{event.code.name}: {event.message}"
        if event.code is dp.Code.FAILED_PRECONDITION:
            reason = f"refused by peer: {event.message}"
        if event.channel == 0:
            self.fail(f"link error: peer system {self.link.peer_id} ended the data connection: {reason}")
            return
        channel = self.channels.pop(event.channel, None)
        if channel is not None:
            channel.end(reason if reason.startswith("refused") else f"link error: {reason}")

    # -- what the streams do ----------------------------------------------------------------------
    def open(self, pair: str, on_ack: Callable[[int], None]) -> DataChannel:
        assert self.transport is not None
        number = self.next_channel
        self.next_channel += 1
        channel = DataChannel(self, number, on_ack)
        self.channels[number] = channel
        self.proto.opened(number)
        self.transport.write(dp.open_channel(number, pair))
        return channel

    async def write(self, parts: list[bytes | memoryview]) -> None:
        if self.lost or self.transport is None:
            raise LinkError(self.lost or "link error: data connection closed")
        self.transport.writelines(parts)
        if self._drained is not None:
            await asyncio.shield(self._drained)
            if self.lost:
                raise LinkError(self.lost)

    def release(self, channel: DataChannel, broken: bool) -> None:
        if self.channels.pop(channel.number, None) is not None and not self.lost and self.transport is not None:
            self.proto.closed(channel.number)
            self.transport.write(dp.close(channel.number))
        if broken and time.monotonic() - self.last_heard > self.link.timeout:
            # Nothing from the peer on any channel: the connection, not one pair, is stuck.
            self.fail("link error: the data connection is suspect (the peer sent nothing in time)")

    def fail(self, reason: str) -> None:
        if not self.lost:
            self.lost = reason
            log.warning("data connection to peer %d: %s", self.link.peer_id, reason)
        if not self.ready.done():
            self.ready.set_exception(LinkError(reason))
            self.ready.exception()
        for channel in list(self.channels.values()):
            channel.end(reason)
        self.channels.clear()
        if self.transport is not None:
            self.transport.abort()
        self.link.forget(self)


class DataLink:
    """The data connection to one peer: made on first use, shared by every pair's stream."""

    def __init__(self, own_id: int, peer_id: int, host: str, timeout: float, tls: TlsFiles | None = None,
                 fixed_port: int = 0) -> None:
        self.own_id = own_id
        self.peer_id = peer_id
        self.host = host.strip("[]")
        self.timeout = timeout
        #: The data port the peer advertised in its last keepalive answer (0: none).
        self.port = 0
        #: Where the peer's data port is reached instead (``--peer-data``), while it advertises one.
        self.fixed_port = fixed_port
        self._ssl = self._context(tls) if tls is not None else None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._failed_at = 0.0

    @staticmethod
    def _context(tls: TlsFiles) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls.cert_path, tls.key_path)
        ctx.load_verify_locations(cadata=tls.ca.decode())
        return ctx

    @property
    def offered(self) -> bool:
        """Whether streams should use the data connection now."""
        return bool(self.port) and time.monotonic() - self._failed_at >= RETRY_AFTER

    async def open(self, pair: str, on_ack: Callable[[int], None]) -> DataChannel:
        """A channel for ``pair``'s stream; raises :class:`LinkError` when the connection cannot be made."""
        conn = self._conn
        if conn is None or conn.lost:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            try:
                conn = await asyncio.shield(self._connecting)
            finally:
                if self._connecting is not None and self._connecting.done():
                    self._connecting = None
        return conn.open(pair, on_ack)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        try:
            async with asyncio.timeout(self.timeout):
                await loop.create_connection(lambda: conn, self.host, self.fixed_port or self.port, ssl=self._ssl,
                                             server_hostname=system_host_name(self.peer_id) if self._ssl else None)
                await conn.ready
        except (OSError, TimeoutError, LinkError, ssl.SSLError) as exc:
            self._failed_at = time.monotonic()
            why = str(exc) or type(exc).__name__
            log.warning("no data connection to peer %d at %s:%d (%s); its streams use the gRPC interconnect "
                        "for %gs", self.peer_id, self.host, self.fixed_port or self.port, why, RETRY_AFTER)
            conn.fail(f"link error: no data connection ({why})")
            raise LinkError(f"link error: no data connection to peer system {self.peer_id} ({why})") from None
        self._conn = conn
        log.info("data connection to peer %d at %s:%d%s", self.peer_id, self.host, self.fixed_port or self.port,
                 " (TLS)" if self._ssl else "")
        return conn

    def forget(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.fail("link error: data connection closed")
        if self._connecting is not None:
            self._connecting.cancel()
