"""The primary's side of the replication stream against a peer that holds its acks.

A small in-process gRPC peer serves ``Replicate``: it records every entry it
receives (decoded with the real framing) and acknowledges a batch only when
the test releases it.  This pins the send window (at most SEND_WINDOW
batches unacknowledged; entries pushed meanwhile travel together in the next
batch) and the lazy mirror flush of async pairs (one flush in flight; the
requests made meanwhile fold into one flush behind every write).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from splitmirror.replication.framing import Frame, frames_of
from splitmirror.replication.link import Counters, PeerLink
from splitmirror.replication.queue import Entry
from splitmirror.replication.stream import SEND_WINDOW, ReplicationStream
from splitmirror.v1 import interconnect_pb2 as ic
from splitmirror.v1 import interconnect_pb2_grpc as ic_grpc


class HoldingPeer(ic_grpc.InterconnectServicer):
    def __init__(self) -> None:
        self.batches: list[list[Frame]] = []
        self.release = asyncio.Semaphore(0)
        self.arrived = asyncio.Event()

    async def Hello(self, request: ic.HelloRequest, context: grpc.aio.ServicerContext) -> ic.HelloReply:
        return ic.HelloReply(system_id=2, role="secondary")

    async def Replicate(self, request_iterator: AsyncIterator[ic.ReplicateBatch],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[ic.ReplicateAck]:
        applied: asyncio.Queue[int] = asyncio.Queue()

        async def receive() -> None:  # records each batch as it arrives
            async for batch in request_iterator:
                frames = frames_of(batch, 10_000)
                self.batches.append(frames)
                self.arrived.set()
                applied.put_nowait(frames[-1].seq)

        reader = asyncio.create_task(receive())
        try:
            while True:  # acks only as the test releases them
                seq = await applied.get()
                await self.release.acquire()
                yield ic.ReplicateAck(seq=seq)
        finally:
            reader.cancel()

    async def wait_batches(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.batches) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def _noop(_: PeerLink) -> None:
    return None


@contextlib.asynccontextmanager
async def holding_peer() -> AsyncIterator[tuple[ReplicationStream, HoldingPeer]]:
    """A ReplicationStream to a HoldingPeer (in the test's own event loop)."""
    peer = HoldingPeer()
    server = grpc.aio.server()
    ic_grpc.add_InterconnectServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = PeerLink(1, "primary", 2, f"127.0.0.1:{port}", 30.0, _noop, _noop)
    failures: list[str] = []

    async def on_failure(lost: list[Entry], reason: str) -> None:
        failures.append(reason)

    s = ReplicationStream("p", link, Counters(), on_failure)
    try:
        yield s, peer
    finally:
        for _ in range(100):
            peer.release.release()
        await s.close()
        await link.close()
        await server.stop(None)
    assert not failures or failures == ["stream closed"], failures


def test_send_window_gathers_writes_while_batches_wait() -> None:
    asyncio.run(_in_loop(_window))


async def _in_loop(body: Callable[[ReplicationStream, HoldingPeer], Awaitable[None]]) -> None:
    # A loop of its own (asyncio.run), as grpc.aio binds to the loop it starts in.
    async with holding_peer() as (s, peer):
        await body(s, peer)


async def _window(s: ReplicationStream, peer: HoldingPeer) -> None:
    first = []
    for i in range(SEND_WINDOW):  # each goes out at once, alone: the window has room
        first.append(s.push(i * 4096, bytes([i]) * 4096))
        await peer.wait_batches(i + 1)
    assert [len(b) for b in peer.batches] == [1] * SEND_WINDOW
    later = [s.push((100 + i) * 4096, bytes([i]) * 4096) for i in range(20)]
    await asyncio.sleep(0.3)
    assert len(peer.batches) == SEND_WINDOW, "the window is full: the 20 new writes wait, unsent"
    peer.release.release()  # one ack opens the window: the 20 travel in one batch
    await peer.wait_batches(SEND_WINDOW + 1)
    assert [f.offset for f in peer.batches[-1]] == [(100 + i) * 4096 for i in range(20)]
    for _ in range(10):
        peer.release.release()
    assert all(await asyncio.gather(*first, *later))
    seqs = [f.seq for b in peer.batches for f in b]
    assert seqs == list(range(1, 21 + SEND_WINDOW)), seqs


def test_lazy_flush_keeps_one_mirror_flush_in_flight() -> None:
    asyncio.run(_in_loop(_lazy_flush))


async def _lazy_flush(s: ReplicationStream, peer: HoldingPeer) -> None:
    s.push(0, b"a" * 4096)
    s.flush_later()
    await peer.wait_batches(1)
    for i in range(5):  # writes and FLUSHes while the first flush is unacknowledged
        s.push((i + 1) * 4096, b"b" * 4096)
        s.flush_later()
    for _ in range(20):
        peer.release.release()
    async with asyncio.timeout(10):
        while not (s.queue.unacked == 0 and peer.batches and peer.batches[-1][-1].flush):
            await asyncio.sleep(0.05)
    frames = [f for b in peer.batches for f in b]
    flushes = [i for i, f in enumerate(frames) if f.flush]
    # The first flush, then one for all five requests made meanwhile, last of all.
    assert len(flushes) <= 3 and flushes[-1] == len(frames) - 1, [(f.seq, f.flush) for f in frames]
    assert sum(1 for f in frames if not f.flush) == 6
