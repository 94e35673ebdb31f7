"""The replication data port: where peers' write streams arrive (the mirror end).

A peer opens one connection (TLS with ``--tls-dir``: a system certificate of
the CA, as on the interconnect) and says HELLO with its system id; each of
its pairs' streams is a channel (:mod:`splitmirror.replication.dataproto`).
A channel's batches are applied in order by a task of its own, exactly as a
``Replicate`` call's (the same take-over of a stale stream, sequence checks,
suspension of the pair on a malformed batch) and acknowledged cumulatively.

Limits, each enforced before anything is allocated for what it bounds
(docs/security.md): connections in all and per peer, seconds to finish the
handshake (TLS and HELLO), the largest frame, bytes received and not yet
applied per connection (reading pauses above it: TCP pushes back on that
peer only) and per pair (a source that ignores its send window gets an
ERROR for that channel).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import cast

import grpc

from ..errors import SplitmirrorError
from ..replication import dataproto as dp
from ..replication.datalink import keepalive
from ..replication.framing import SequenceCheck
from ..tls import SYSTEM_OU, TlsFiles, subject_from_der
from .interconnect import InterconnectServicer, ServedStream

log = logging.getLogger("splitmirror.dataport")


@dataclasses.dataclass(frozen=True)
class DataLimits:
    max_connections: int = 64
    max_per_peer: int = 4
    handshake_timeout: float = 10.0
    max_frame: int = 64 << 20
    connection_inflight: int = 256 << 20
    pair_inflight: int = 128 << 20


def code_of(status: grpc.StatusCode) -> dp.Code:
    return dp.Code.__members__.get(status.name, dp.Code.UNKNOWN)


class _Channel:
    """One pair's stream on a connection: what waits to be applied."""

    def __init__(self, number: int, pair: str) -> None:
        self.number = number
        self.pair = pair
        self.items: collections.deque[dp.Batch | dp.BadBatch | None] = collections.deque()
        self.bytes = 0
        self.ready = asyncio.Event()
        self.stopped = False
        self.task: asyncio.Task[None] | None = None

    def put(self, item: dp.Batch | dp.BadBatch | None) -> None:
        self.items.append(item)
        self.ready.set()

    def stop(self) -> None:
        """Superseded by a newer stream of the pair: stop after the batch being applied."""
        self.stopped = True
        self.ready.set()


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: DataServer) -> None:
        self.server = server
        self.limits = server.limits
        self.proto = dp.DataProtocol("mirror", self.limits.max_frame)
        self.transport: asyncio.Transport | None = None
        self.peer = 0  # the system id, once its HELLO was accepted
        self.address = "?"
        self.channels: dict[int, _Channel] = {}
        self.inflight = 0
        self.paused = False
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        peername = transport.get_extra_info("peername")
        self.address = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        keepalive(transport.get_extra_info("socket"), self.server.link_timeout)
        if len(self.server.connections) >= self.limits.max_connections:
            self._refuse(0, dp.Code.RESOURCE_EXHAUSTED, f"system {self.server.system_id}: "
                         f"{len(self.server.connections)} data connections are open, the limit is "
                         f"{self.limits.max_connections}")
            return
        self.server.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(self.limits.handshake_timeout, self._too_slow)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proto.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            events = self.proto.received(nbytes)
        except dp.ProtocolError as exc:
            self._refuse(0, exc.code, f"system {self.server.system_id} refused the data connection: {exc.message}")
            return
        for event in events:
            if self.closed:
                return
            if isinstance(event, (dp.Batch, dp.BadBatch)):
                self._batch(event)
            elif isinstance(event, dp.Hello):
                self._hello(event)
            elif isinstance(event, dp.Open):
                self._open(event)
            elif isinstance(event, dp.Close):
                channel = self.channels.get(event.channel)
                if channel is not None:
                    channel.put(None)
            elif isinstance(event, dp.Error):
                log.warning("data connection from system %d (%s) ended by the peer: %s: %s", self.peer,
                            self.address, event.code.name, event.message)
                self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    # -- events -------------------------------------------------------------------------------
    def _hello(self, event: dp.Hello) -> None:
        claim = event.system_id
        why = self.server.identity_refusal(claim, self.transport)
        if not why:
            count = sum(1 for c in self.server.connections if c.peer == claim)
            if count >= self.limits.max_per_peer:
                self._refuse(0, dp.Code.RESOURCE_EXHAUSTED, f"system {claim} has {count} data connections open "
                             f"to system {self.server.system_id}; the limit is {self.limits.max_per_peer}")
                return
        if why:
            log.warning("refused data connection from %s claiming system id %d: %s", self.address, claim, why)
            self._refuse(0, dp.Code.PERMISSION_DENIED, why)
            return
        if self._timer is not None:
            self._timer.cancel()
        self.peer = claim
        assert self.transport is not None
        self.transport.write(dp.hello(self.server.system_id, self.limits.max_frame))
        log.info("data connection from system %d (%s) accepted", claim, self.address)

    def _open(self, event: dp.Open) -> None:
        try:
            pair = self.server.servicer.manager.mirror_pair(self.peer, event.pair)
        except SplitmirrorError as exc:
            self._error(event.channel, code_of(exc.code), exc.message)
            return
        channel = _Channel(event.channel, pair.name)
        self.channels[event.channel] = channel
        channel.task = asyncio.create_task(self._serve(channel), name=f"apply-{pair.name}")

    def _batch(self, event: dp.Batch | dp.BadBatch) -> None:
        channel = self.channels.get(event.channel)
        if channel is None:
            return
        if channel.bytes + event.size > self.limits.pair_inflight:
            self._error(channel.number, dp.Code.RESOURCE_EXHAUSTED,
                        f"pair {channel.pair!r}: {channel.bytes + event.size} bytes received and not yet applied "
                        f"exceed the limit of {self.limits.pair_inflight} per pair")
            channel.put(None)
            return
        channel.bytes += event.size
        self.inflight += event.size
        channel.put(event)
        if self.inflight > self.limits.connection_inflight and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _applied(self, channel: _Channel, size: int) -> None:
        channel.bytes -= size
        self.inflight -= size
        if self.paused and self.inflight <= self.limits.connection_inflight // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # -- one channel ----------------------------------------------------------------------------
    async def _serve(self, channel: _Channel) -> None:
        servicer = self.server.servicer
        manager = servicer.manager
        pair = manager.mirror_pair(self.peer, channel.pair)
        stream = ServedStream(channel.stop, asyncio.current_task())
        await servicer.take_over(pair.name, stream, pair.apply_lock)
        try:
            sequence = SequenceCheck()
            applied = acked = 0
            while True:
                if stream.superseded or channel.stopped:
                    self._error(channel.number, dp.Code.UNAVAILABLE,
                                f"pair {pair.name!r}: a newer stream of the pair took over on system "
                                f"{self.server.system_id}")
                    break
                if not channel.items:
                    channel.ready.clear()
                    await channel.ready.wait()
                    continue
                item = channel.items.popleft()
                if item is None:
                    break
                try:
                    if isinstance(item, dp.BadBatch):
                        await manager.mirror_refuse_stream(pair, f"malformed batch ({item.message})")
                    else:
                        applied = await manager.mirror_apply_frames(pair, item.frames, sequence) or applied
                finally:
                    self._applied(channel, item.size)
                if applied != acked and not self.closed and self.transport is not None:
                    acked = applied
                    self.transport.write(dp.ack(channel.number, applied))
        except SplitmirrorError as exc:
            log.warning("pair %s: refused replicated writes: %s", pair.name, exc.message)
            self._error(channel.number, code_of(exc.code), exc.message)
        except Exception:
            log.exception("pair %s: applying the data channel from system %d failed", pair.name, self.peer)
            self._error(channel.number, dp.Code.INTERNAL,
                        f"internal error applying pair {pair.name!r}; see the daemon log")
        finally:
            servicer.release(pair.name, stream, pair.apply_lock)
            for item in channel.items:
                if item is not None:
                    self._applied(channel, item.size)
            channel.items.clear()
            if self.channels.get(channel.number) is channel:
                del self.channels[channel.number]

    # -- ending -------------------------------------------------------------------------------
    def _error(self, channel: int, code: dp.Code, message: str) -> None:
        self.proto.closed(channel)
        self.channels.pop(channel, None)
        if not self.closed and self.transport is not None:
            self.transport.write(dp.error(channel, code, message))

    def _refuse(self, channel: int, code: dp.Code, message: str) -> None:
        """One precise error, then the connection ends (what was received is still applied)."""
        log.warning("data connection from %s (system %s): %s", self.address, self.peer or "?", message)
        if self.transport is not None and not self.closed:
            self.transport.write(dp.error(channel, code, message))
            self.transport.close()
        self._end()

    def _too_slow(self) -> None:
        self._refuse(0, dp.Code.UNAVAILABLE, f"no HELLO within {self.limits.handshake_timeout:g}s; "
                                             "the data connection is closed")

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.server.connections.discard(self)
        for channel in self.channels.values():
            channel.put(None)  # what was received is applied, then the pair's lock is free
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class DataServer:
    """The listener of the replication data port."""

    def __init__(self, servicer: InterconnectServicer, peers: Callable[[], set[int]], limits: DataLimits,
                 tls: TlsFiles | None, link_timeout: float) -> None:
        self.servicer = servicer
        self.system_id = servicer.system.system_id
        self.peers = peers
        self.limits = limits
        self.tls = tls
        self.link_timeout = link_timeout
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        ctx = self.tls.server_ssl_context() if self.tls is not None else None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host.strip("[]"), int(port), ssl=ctx,
            ssl_handshake_timeout=self.limits.handshake_timeout if ctx else None, reuse_address=True, backlog=128)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def identity_refusal(self, claim: int, transport: asyncio.Transport | None) -> str:
        """'' when ``claim`` is a configured peer proven as on the interconnect, else why not."""
        own = self.system_id
        if self.tls is not None:
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            subject = subject_from_der(der) if der else None
            if subject is None or subject.kind != SYSTEM_OU:
                who = f"certificate {subject.kind} {subject.name!r}" if subject else "no system certificate"
                return f"caller ({who}) is not a configured peer of system {own}"
            if subject.name != str(claim):
                return f"caller (certificate system {subject.name!r}) claims system id {claim}"
        if claim not in self.peers():
            return f"system {claim} is not a configured peer of system {own}"
        return ""

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [ch.task for conn in list(self.connections) for ch in conn.channels.values() if ch.task]
        for conn in list(self.connections):
            conn._end()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
