"""The interconnect seen from one storage system: peer links and write streams.

:class:`PeerLink` holds the gRPC channel to one peer and a keepalive that
notices a lost peer within the configured timeout.  :class:`ReplicationStream`
is the thin I/O layer around :class:`~splitmirror.replication.ReplicationQueue`
for one pair: it keeps one ``Replicate`` call open, sends batches as fast as
flow control allows, resolves waiters on acknowledgements, and hands every
unacknowledged entry to the failure callback when the stream breaks or the
oldest entry waits longer than the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import grpc

from .replication import BackupMarker, Entry, ReplicationQueue
from .tls import TlsFiles, system_host_name
from .v1 import interconnect_pb2 as ic
from .v1 import interconnect_pb2_grpc as ic_grpc

log = logging.getLogger("splitmirror.link")

SYSTEM_ID_KEY = "x-splitmirror-system-id"
MAX_MESSAGE = 64 << 20
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclasses.dataclass
class Counters:
    replicated_writes: int = 0
    replicated_bytes: int = 0
    resync_tracks_sent: int = 0
    resync_bytes_sent: int = 0
    resync_tracks_received: int = 0
    resync_bytes_received: int = 0


def message_options(max_message: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message), ("grpc.max_receive_message_length", max_message)]


PeerCallback = Callable[["PeerLink"], Coroutine[Any, Any, None]]


class PeerLink:
    """Channel and keepalive to one peer storage system."""

    def __init__(self, own_id: int, role: str, peer_id: int, address: str, timeout: float,
                 on_up: PeerCallback, on_down: PeerCallback, tls: TlsFiles | None = None,
                 max_message: int = MAX_MESSAGE) -> None:
        self.own_id = own_id
        self.role = role
        self.peer_id = peer_id
        self.address = address
        self.timeout = timeout
        self.metadata = ((SYSTEM_ID_KEY, str(own_id)),)
        options: list[tuple[str, Any]] = [*message_options(max_message), *RECONNECT_OPTIONS]
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            # The peer must prove it is system ``peer_id``: its certificate
            # carries that system's name, which we verify instead of the address.
            creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            options.append(("grpc.ssl_target_name_override", system_host_name(peer_id)))
            self.channel = grpc.aio.secure_channel(address, creds, options=options)
        self.stub = ic_grpc.InterconnectStub(self.channel)
        self.up: bool | None = None  # None: not known yet
        self.reason = ""
        self._on_up = on_up
        self._on_down = on_down
        #: Called with every keepalive answer (the peer's view of our pairs).
        self.on_hello: Callable[[PeerLink, ic.HelloReply], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_ok = time.monotonic()
        self._callbacks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._keepalive(), name=f"keepalive-{self.peer_id}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._callbacks):
            task.cancel()
        await self.channel.close(grace=None)

    def suspect(self, reason: str) -> None:
        """A stream to this peer broke: treat it as lost until a keepalive
        answers again (which then runs the reconnect handling)."""
        if self.up:
            self.up = False
            self.reason = reason
            log.warning("peer %d at %s suspected lost (%s)", self.peer_id, self.address, reason)

    def _notify(self, callback: PeerCallback) -> None:
        task = asyncio.create_task(callback(self))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _keepalive(self) -> None:
        interval = max(0.05, self.timeout / 4)
        self._last_ok = time.monotonic()
        while True:
            try:
                reply = await self.stub.Hello(ic.HelloRequest(system_id=self.own_id, role=self.role),
                                              metadata=self.metadata, timeout=interval * 2)
            except grpc.aio.AioRpcError as exc:
                if self.up is not False and time.monotonic() - self._last_ok >= self.timeout:
                    self.up = False
                    self.reason = "peer-down" if exc.code() == grpc.StatusCode.UNAVAILABLE else "peer-timeout"
                    log.warning("peer %d at %s lost (%s: %s)", self.peer_id, self.address,
                                exc.code().name, exc.details())
                    self._notify(self._on_down)
            else:
                self._last_ok = time.monotonic()
                if self.up is not True:
                    self.up = True
                    log.info("peer %d at %s connected", self.peer_id, self.address)
                    self._notify(self._on_up)
                elif self.on_hello is not None:
                    self.on_hello(self, reply)
            await asyncio.sleep(interval)

    async def command(self, request: ic.PairCommandRequest) -> ic.MirrorState:
        reply: ic.MirrorState = await self.stub.PairCommand(request, metadata=self.metadata,
                                                            timeout=self.timeout)
        return reply

    def read_tracks(self, pair: str, tracks: bytes) -> AsyncIterator[ic.TrackData]:
        call = self.stub.ReadTracks(ic.ReadTracksRequest(pair=pair, tracks=tracks), metadata=self.metadata)
        return call.__aiter__()


FailureCallback = Callable[[list[Entry], str], Awaitable[None]]


class ReplicationStream:
    """Keeps one ordered ``Replicate`` call open for one pair."""

    def __init__(self, pair: str, link: PeerLink, counters: Counters, on_failure: FailureCallback,
                 max_batch_bytes: int = 4 << 20) -> None:
        self.pair = pair
        self.link = link
        self.counters = counters
        self.queue = ReplicationQueue(max_batch_bytes)
        self._on_failure = on_failure
        self._waiters: dict[int, asyncio.Future[bool]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_progress = time.monotonic()
        #: Seconds the sender waits for more entries before sending a batch
        #: (async pairs: the host does not wait, and batching spares CPU on
        #: both sides for every message and acknowledgement saved).
        self.linger = 0.0

    # -- producer side ------------------------------------------------------
    def push(self, offset: int, data: bytes = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: BackupMarker | None = None) -> asyncio.Future[bool]:
        """Queue one entry now (its sequence number is taken here).

        The future resolves True once the peer applied it, False when the
        stream failed first (the failure callback has then run).
        """
        if not self.queue.unacked:
            self._last_progress = time.monotonic()
        entry = self.queue.push(offset, data, zero_length=zero_length, flush=flush, resync=resync, marker=marker)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters[entry.seq] = fut
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"replicate-{self.pair}")
        return fut

    async def close(self) -> None:
        if self._task and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._fail("stream closed")

    # -- I/O ----------------------------------------------------------------
    async def _run(self) -> None:
        call = self.link.stub.Replicate(metadata=self.link.metadata)  # type: ignore[call-arg]
        sender = asyncio.create_task(self._send(call))
        receiver = asyncio.create_task(self._receive(call))
        watchdog = asyncio.create_task(self._watchdog())
        reason = "stream closed"
        try:
            done, _ = await asyncio.wait({sender, receiver, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, grpc.aio.AioRpcError):
                    reason = f"link error: {exc.code().name}"
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        reason = f"refused by peer: {exc.details()}"
                elif isinstance(exc, asyncio.InvalidStateError):
                    # grpc.aio refuses a write once the call has finished: the
                    # peer ended it, and the receiver reports why (or nothing).
                    reason = "link error: stream ended by peer"
                elif exc is not None:
                    reason = str(exc) or type(exc).__name__
                    if not isinstance(exc, TimeoutError):
                        log.error("pair %s: replication stream error", self.pair, exc_info=exc)
        finally:
            for task in (sender, receiver, watchdog):
                task.cancel()
            call.cancel()
            await asyncio.gather(sender, receiver, watchdog, return_exceptions=True)
        await self._fail(reason)
        if self.queue.has_unsent:  # pushed while the failure was being handled
            self._task = asyncio.create_task(self._run(), name=f"replicate-{self.pair}")

    async def _send(self, call: grpc.aio.StreamStreamCall[ic.ReplicateBatch, ic.ReplicateAck]) -> None:
        first = True
        while True:
            await self._wakeup.wait()
            if self.linger:
                await asyncio.sleep(self.linger)
            self._wakeup.clear()
            while self.queue.has_unsent:
                batch = self.queue.take_batch()
                msg = ic.ReplicateBatch(pair=self.pair if first else "")
                first = False
                for e in batch:
                    wire = msg.entries.add(seq=e.seq, offset=e.offset, data=e.data, zero_length=e.zero_length,
                                           flush=e.flush, resync=e.resync)
                    if e.marker is not None:
                        wire.backup_marker = e.marker.marker
                        wire.backup_generation = e.marker.generation
                        wire.backup_time = e.marker.backup_time
                await call.write(msg)

    async def _receive(self, call: grpc.aio.StreamStreamCall[ic.ReplicateBatch, ic.ReplicateAck]) -> None:
        async for ack in call:
            if ack.error:
                raise RuntimeError(f"peer failed to apply: {ack.error}")
            self._last_progress = time.monotonic()
            for entry in self.queue.ack(ack.seq):
                if not entry.resync and not entry.flush:
                    self.counters.replicated_writes += 1
                    self.counters.replicated_bytes += len(entry.data)
                fut = self._waiters.pop(entry.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(True)
        raise ConnectionError("peer closed the replication stream")

    async def _watchdog(self) -> None:
        """Fail the stream when entries wait and no ack came for the timeout.

        Progress, not age, counts: a long async queue on a slow link is lag,
        not a fault.
        """
        timeout = self.link.timeout
        while True:
            await asyncio.sleep(max(0.05, timeout / 4))
            if self.queue.unacked and time.monotonic() - self._last_progress > timeout:
                raise TimeoutError(f"peer-timeout: no acknowledgement for {timeout:g}s")

    async def _fail(self, reason: str) -> None:
        lost = self.queue.fail()
        waiters, self._waiters = self._waiters, {}
        try:
            if lost:
                await self._on_failure(lost, reason)
        finally:
            # Even when cancelled meanwhile (the stream closed on peer loss):
            # no host write may wait forever.  The bits are already set in
            # memory and the writes' intent extents are still held.
            for fut in waiters.values():
                if not fut.done():
                    fut.set_result(False)
