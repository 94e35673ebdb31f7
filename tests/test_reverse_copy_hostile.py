"""Finding 9 of issue 15, second half: a reverse copy checks every run the peer returns.

A real primaryd and a real secondaryd, with a gRPC proxy between them that
passes every interconnect call through untouched except the runs of tracks
the secondary returns to a reverse copy (``ReadTracks``), which it relabels
as tracks the primary never asked for.  The primary must stop the copy,
write none of the relabelled data into its PVOL, and say why in its log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from client import Client
from splitmirror.testing import Site, free_port, wait_for
from splitmirror.v1 import interconnect_pb2 as ic

MiB = 1 << 20
TRACK = 8192
SERVICE = ic.DESCRIPTOR.services_by_name["Interconnect"]


class TamperingProxy(grpc.GenericRpcHandler):
    """Forwards raw interconnect calls to ``target``; ``tamper`` rewrites ReadTracks replies."""

    def __init__(self, target: str, tamper: Callable[[ic.TrackData], ic.TrackData]) -> None:
        self.channel = grpc.insecure_channel(target)
        self.tamper = tamper
        self.tampered = threading.Event()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        desc = SERVICE.methods_by_name.get(method.rsplit("/", 1)[-1])
        if desc is None:
            return None
        metadata = tuple((m.key, m.value) for m in details.invocation_metadata  # type: ignore[attr-defined]
                         if m.key.startswith("x-splitmirror"))

        def timeout(context: grpc.ServicerContext) -> float | None:
            remaining = context.time_remaining()
            return None if remaining is None or remaining > 1e6 else remaining

        def relay(context: grpc.ServicerContext, replies: Iterator[bytes]) -> Iterator[bytes]:
            try:
                for reply in replies:
                    if desc.name == "ReadTracks":
                        data = ic.TrackData.FromString(reply)
                        reply = self.tamper(data).SerializeToString()
                        self.tampered.set()
                    yield reply
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")

        if desc.client_streaming and desc.server_streaming:
            call_ss = self.channel.stream_stream(method)

            def stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
                yield from relay(context, call_ss(requests, metadata=metadata, timeout=timeout(context)))
            return grpc.stream_stream_rpc_method_handler(stream_stream)
        if desc.server_streaming:
            call_us = self.channel.unary_stream(method)

            def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                yield from relay(context, call_us(request, metadata=metadata, timeout=timeout(context)))
            return grpc.unary_stream_rpc_method_handler(unary_stream)
        if desc.client_streaming:
            call_su = self.channel.stream_unary(method)

            def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                try:
                    return call_su(requests, metadata=metadata, timeout=timeout(context))
                except grpc.RpcError as exc:
                    context.abort(exc.code(), exc.details() or "")
            return grpc.stream_unary_rpc_method_handler(stream_unary)
        call_uu = self.channel.unary_unary(method)

        def unary_unary(request: bytes, context: grpc.ServicerContext) -> Any:
            try:
                return call_uu(request, metadata=metadata, timeout=timeout(context))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
        return grpc.unary_unary_rpc_method_handler(unary_unary)


def _relabel(data: ic.TrackData) -> ic.TrackData:
    """The same bytes, claimed to be the next tracks (never asked for)."""
    return ic.TrackData(track=data.track + data.count, count=data.count, data=data.data)


@pytest.fixture()
def rig(tmp_path: Any) -> Iterator[tuple[Site, Site, TamperingProxy]]:
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    proxy_port = free_port()
    proxy = TamperingProxy(secondary.interconnect, _relabel)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=(proxy,))
    server.add_insecure_port(f"127.0.0.1:{proxy_port}")
    server.start()
    primary.peers[2001] = proxy_port  # the primary reaches its mirror only through the proxy
    try:
        secondary.start()
        primary.start()
        yield primary, secondary, proxy
    finally:
        primary.kill()
        secondary.kill()
        server.stop(0)
        proxy.channel.close()


async def test_reverse_copy_refuses_tracks_it_did_not_ask_for(rig: tuple[Site, Site, TamperingProxy]) -> None:
    primary, secondary, proxy = rig
    primary.cli("volume", "create", "p", "--size", "1M", "--track-size", "8K")
    async with Client(primary.address, timeout=20) as c:
        await c.write("p", 0, b"A" * MiB)
    primary.cli("pair", "create", "rp", "--pvol", "p", "--svol", "s", "--peer", "2001", "--wait")
    primary.cli("pair", "split", "rp")
    # Hosts at site B write two tracks of the split SPVOL; a reverse resync
    # asks the secondary for exactly those.
    async with Client(secondary.address, timeout=20) as c:
        await c.write("s", 2 * TRACK, b"B" * TRACK)
        await c.write("s", 5 * TRACK, b"B" * TRACK)
    result = primary.cli("pair", "resync", "rp", "--reverse", "--force", "--wait", check=False)
    assert proxy.tampered.is_set()
    wait_for(lambda: "to the reverse copy; the copy stops" in primary.log(), timeout=30,
             what="the primary refusing the relabelled tracks")
    async with Client(primary.address, timeout=20) as c:
        pvol = await c.read("p", 0, MiB)
    # Nothing of the relabelled runs reached the PVOL: the tracks they claimed
    # (3 and 6) and every other track still hold the primary's own data.
    tags = {pvol[t * TRACK:(t + 1) * TRACK] for t in range(MiB // TRACK) if t not in (2, 5)}
    assert tags == {b"A" * TRACK}, (result.returncode, result.stderr)
    # The interrupted reverse copy is never turned into a forward one by the
    # automatic resync: what hosts wrote at site B is still there.
    time_to_retry = 3.0
    wait_for(lambda: primary.log().count("to the reverse copy; the copy stops") >= 2, timeout=30 + time_to_retry,
             what="the automatic resync retrying the reverse copy")
    assert "forward resync" not in primary.log().split("DUPLEX -> SPLIT", 1)[1]
    async with Client(secondary.address, timeout=20) as c:
        assert await c.read("s", 2 * TRACK, TRACK) == b"B" * TRACK
        assert await c.read("s", 5 * TRACK, TRACK) == b"B" * TRACK
    assert "Traceback" not in primary.log(), primary.log()[-3000:]
