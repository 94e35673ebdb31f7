"""The ordered write stream of one pair over a peer link.

:class:`ReplicationStream` is the thin I/O layer around
:class:`~splitmirror.replication.queue.ReplicationQueue` for one pair: it
keeps one channel of the peer's data connection (or, when the peer offers
none, one ``Replicate`` call) open, sends batches as fast as flow control
allows, resolves waiters on acknowledgements, and hands every unacknowledged
entry to the failure callback when the stream breaks or the oldest entry
waits longer than the timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc

from ..v1 import interconnect_pb2 as ic
from .datalink import LinkError
from .framing import encode
from .link import Counters, PeerLink
from .queue import BackupMarker, Entry, GroupCut, ReplicationQueue

log = logging.getLogger("splitmirror.link")


#: Batches sent and not yet acknowledged before the sender waits for an ack.
SEND_WINDOW = 2

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
        self._busy = asyncio.Event()  # set by every push: entries may wait for an ack
        self._task: asyncio.Task[None] | None = None
        self._last_progress = time.monotonic()
        #: Last sequence number of each batch sent and not yet acknowledged.
        self._inflight: collections.deque[int] = collections.deque()
        self._acked = asyncio.Event()
        self._lazy_flush: asyncio.Future[bool] | None = None
        self._flush_again = False

    # -- producer side ------------------------------------------------------
    def push(self, offset: int, data: bytes | memoryview = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: BackupMarker | None = None,
             cut: GroupCut | None = None) -> asyncio.Future[bool]:
        """Queue one entry now (its sequence number is taken here).

        The future resolves True once the peer applied it, False when the
        stream failed first (the failure callback has then run).
        """
        if not self.queue.unacked:
            self._last_progress = time.monotonic()
        last = self.queue.last_unsent
        if flush and last is not None and last.flush and last.marker is None and not data:
            # A flush right behind an unsent flush makes nothing more durable:
            # one mirror flush in flight serves both.
            waiter = self._waiters.get(last.seq)
            if waiter is not None:
                return waiter
        entry = self.queue.push(offset, data, zero_length=zero_length, flush=flush, resync=resync, marker=marker,
                                cut=cut)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters[entry.seq] = fut
        self._wakeup.set()
        self._busy.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"replicate-{self.pair}")
        return fut

    def flush_later(self) -> None:
        """A mirror flush no one waits for (async pairs: the host's FLUSH
        returned at local durability).  While one is unacknowledged, later
        requests fold into a single flush pushed when it is acknowledged,
        behind every write pushed meanwhile: one mirror fsync in flight."""
        if self._lazy_flush is not None and not self._lazy_flush.done():
            self._flush_again = True
            return
        self._flush_again = False
        self._lazy_flush = self.push(0, flush=True)
        self._lazy_flush.add_done_callback(self._lazy_flush_done)

    def _lazy_flush_done(self, fut: asyncio.Future[bool]) -> None:
        # A failed stream handed its writes back as pending: nothing to flush.
        if self._flush_again and fut.result():
            self.flush_later()
        else:
            self._flush_again = False

    async def close(self) -> None:
        if self._task and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._fail("stream closed")

    # -- I/O ----------------------------------------------------------------
    async def _carrier(self) -> Carrier:
        """The data connection's channel when the peer offers one, else a ``Replicate`` call."""
        data = self.link.data
        if data is not None and data.offered:
            try:
                return await data.open(self.pair, self._acked_to)
            except LinkError:
                pass  # logged by the link; this run goes over gRPC
        return GrpcCarrier(self.pair, self.link, self._acked_to)

    async def _run(self) -> None:
        reason = "stream closed"
        broken = False
        try:
            carrier = await self._carrier()
        except Exception as opening:
            await self._fail(f"link error: {opening}")
            return
        sender = asyncio.create_task(self._send(carrier))
        receiver = asyncio.create_task(carrier.run())
        watchdog = asyncio.create_task(self._watchdog())
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
                    broken = isinstance(exc, TimeoutError)
                    if isinstance(exc, ConnectionError):  # the peer ended the call or the data channel: a link event
                        log.warning("pair %s: %s", self.pair, reason)
                    elif not isinstance(exc, TimeoutError):
                        log.error("pair %s: replication stream error", self.pair, exc_info=exc)
        finally:
            for task in (sender, receiver, watchdog):
                task.cancel()
            carrier.close(broken)
            await asyncio.gather(sender, receiver, watchdog, return_exceptions=True)
        await self._fail(reason)
        if self.queue.has_unsent:  # pushed while the failure was being handled
            self._task = asyncio.create_task(self._run(), name=f"replicate-{self.pair}")

    async def _send(self, carrier: Carrier) -> None:
        inflight = self._inflight = collections.deque()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.queue.has_unsent:
                # The send window: while SEND_WINDOW batches await their ack,
                # new entries gather into the next batch (one message and
                # one ack for many writes; nothing waits when the link is idle).
                while len(inflight) >= SEND_WINDOW:
                    self._acked.clear()
                    await self._acked.wait()
                batch = self.queue.take_batch(carrier.batch_limit)
                inflight.append(batch[-1].seq)
                await carrier.send(batch)

    def _acked_to(self, seq: int) -> None:
        """The peer applied everything up to ``seq`` (cumulative)."""
        self._last_progress = time.monotonic()
        while self._inflight and self._inflight[0] <= seq:
            self._inflight.popleft()
            self._acked.set()
        for entry in self.queue.ack(seq):
            if not entry.resync and not entry.flush:
                self.counters.replicated_writes += 1
                self.counters.replicated_bytes += len(entry.data)
            fut = self._waiters.pop(entry.seq, None)
            if fut is not None and not fut.done():
                fut.set_result(True)

    async def _watchdog(self) -> None:
        """Fail the stream when entries wait and no ack came for the timeout.

        Progress, not age, counts: a long async queue on a slow link is lag,
        not a fault.
        """
        timeout = self.link.timeout
        while True:
            if not self.queue.unacked:
                # Idle: no timer at all (a thousand idle streams cost no CPU);
                # the next push wakes the watchdog.
                self._busy.clear()
                await self._busy.wait()
                continue
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


class Carrier(Protocol):
    """What carries one run of a stream: sends batches, reports acks, ends."""

    @property
    def batch_limit(self) -> int | None:
        """Most wire bytes of one batch the peer accepts (None: the stream's own limit)."""

    async def send(self, batch: list[Entry]) -> None: ...

    async def run(self) -> None:
        """Until the carrier ends (raises why)."""

    def close(self, broken: bool = False) -> None: ...


class GrpcCarrier:
    """A ``Replicate`` call: the stream when the peer offers no data connection."""

    def __init__(self, pair: str, link: PeerLink, on_ack: Callable[[int], None]) -> None:
        self.pair = pair
        self.call = link.stub.Replicate(metadata=link.metadata)  # type: ignore[call-arg]
        self.on_ack = on_ack
        self.first = True
        self.batch_limit: int | None = None

    async def send(self, batch: list[Entry]) -> None:
        for msg in messages(batch):
            if self.first:
                msg.pair = self.pair
                self.first = False
            await self.call.write(msg)

    async def run(self) -> None:
        async for ack in self.call:
            if ack.error:
                raise RuntimeError(f"peer failed to apply: {ack.error}")
            self.on_ack(ack.seq)
        raise ConnectionError("peer closed the replication stream")

    def close(self, broken: bool = False) -> None:
        self.call.cancel()


def messages(batch: list[Entry]) -> list[ic.ReplicateBatch]:
    """A batch as stream messages: runs of entries packed into one buffer
    each, a backup marker in a message of its own."""
    out: list[ic.ReplicateBatch] = []
    run: list[Entry] = []
    for e in batch:
        if e.marker is None:
            run.append(e)
            continue
        if run:
            out.append(ic.ReplicateBatch(packed=encode(run)))
            run = []
        out.append(ic.ReplicateBatch(entries=[ic.WriteEntry(
            seq=e.seq, offset=e.offset, backup_marker=e.marker.marker, backup_generation=e.marker.generation,
            backup_time=e.marker.backup_time)]))
    if run:
        out.append(ic.ReplicateBatch(packed=encode(run)))
    return out
