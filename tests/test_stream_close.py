"""A peer that ends the replication stream (status OK, as a fuzzed or
stopping peer may): the primary says so in one WARNING line, without a
traceback, and fails the stream with that reason (its writes turn pending)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from splitmirror.replication.link import Counters, PeerLink
from splitmirror.replication.queue import Entry
from splitmirror.replication.stream import ReplicationStream
from splitmirror.v1 import interconnect_pb2 as ic
from splitmirror.v1 import interconnect_pb2_grpc as ic_grpc


class ClosingPeer(ic_grpc.InterconnectServicer):
    """Takes the first batch of a Replicate call, then ends the call."""

    async def Hello(self, request: ic.HelloRequest, context: grpc.aio.ServicerContext) -> ic.HelloReply:
        return ic.HelloReply(system_id=2, role="secondary")

    async def Replicate(self, request_iterator: AsyncIterator[ic.ReplicateBatch],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[ic.ReplicateAck]:
        async for _ in request_iterator:
            return
        yield ic.ReplicateAck()  # never reached: makes this an async generator


async def _closed_by_peer() -> list[str]:
    server = grpc.aio.server()
    ic_grpc.add_InterconnectServicer_to_server(ClosingPeer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def nothing(_: PeerLink) -> None:
        return None

    link = PeerLink(1, "primary", 2, f"127.0.0.1:{port}", 30.0, nothing, nothing)
    failures: list[str] = []

    async def on_failure(lost: list[Entry], reason: str) -> None:
        failures.append(reason)

    stream = ReplicationStream("p", link, Counters(), on_failure)
    try:
        ok = await asyncio.wait_for(stream.push(0, b"x" * 4096), 10)
        assert ok is False  # not applied by the peer: the write turns pending, not acknowledged as mirrored
        return failures
    finally:
        await stream.close()
        await link.close()
        await server.stop(None)


def test_a_peer_ending_the_stream_is_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="splitmirror")
    failures = asyncio.run(_closed_by_peer())
    assert failures[:1] == ["peer closed the replication stream"], failures
    mine = [r for r in caplog.records if r.name.startswith("splitmirror.")]
    said = [r for r in mine if "peer closed the replication stream" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [(logging.WARNING,
                                                            "pair p: peer closed the replication stream")]
    assert not [r for r in mine if r.levelno >= logging.ERROR or r.exc_info], \
        [(r.levelname, r.getMessage()) for r in mine]
