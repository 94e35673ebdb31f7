"""The interconnect seen from one storage system: its link to each peer.

:class:`PeerLink` holds the gRPC channel to one peer and a keepalive that
notices a lost peer within the configured timeout; :func:`relay` turns what
a peer refused (or its unreachability) into our own error.  The write
stream of one pair over a link is :mod:`splitmirror.replication.stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc

from ..errors import SplitmirrorError, Unavailable, from_status
from ..tls import TlsFiles, system_host_name
from ..v1 import interconnect_pb2 as ic
from ..v1 import interconnect_pb2_grpc as ic_grpc
from .commands import CommandBatcher
from .datalink import DataLink

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
                 max_message: int = MAX_MESSAGE, data_address: str = "") -> None:
        self.own_id = own_id
        self.role = role
        self.peer_id = peer_id
        self.address = address
        self.timeout = timeout
        self.metadata = ((SYSTEM_ID_KEY, str(own_id)),)
        self.channel = self._channel(address, tls, max_message)
        # The keepalive has a connection of its own: a pair whose copy or
        # write stream fills the data connection (or its peer's receive
        # window) cannot delay the keepalive answers of every other pair on
        # the link into a false "peer lost".
        self.keepalive_channel = self._channel(address, tls, max_message, [("grpc.use_local_subchannel_pool", 1)])
        self.keepalive_stub = ic_grpc.InterconnectStub(self.keepalive_channel)
        self.stub = ic_grpc.InterconnectStub(self.channel)
        #: The data connection carrying the pairs' write streams (when the peer offers one).
        self.data = DataLink(own_id, peer_id, (data_address or address).rpartition(":")[0], timeout, tls,
                             int(data_address.rpartition(":")[2]) if data_address else 0)
        #: Pair commands to the peer, many in one call (a mass recovery).
        self.commands = CommandBatcher(self.stub, self.metadata, timeout, peer_id)
        self.up: bool | None = None  # None: not known yet
        self.reason = ""
        self._on_up = on_up
        self._on_down = on_down
        #: Called with every keepalive answer (the peer's view of our pairs).
        self.on_hello: Callable[[PeerLink, ic.HelloReply], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_ok = time.monotonic()
        self._callbacks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()  # set: keepalive now (the lost peer called us)
        #: Seconds the last keepalive answered took (None: none answered yet).
        self.rtt: float | None = None
        #: The peer's roles list (its ends' role and epoch) from the last
        #: keepalive that carried it, and that list's digest: a keepalive
        #: answer leaves the list out while the digest still matches.
        self.peer_roles: list[ic.MirrorState] = []
        self.peer_roles_digest = b""

    def _channel(self, address: str, tls: TlsFiles | None, max_message: int,
                 extra: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = [*message_options(max_message), *RECONNECT_OPTIONS, *(extra or [])]
        if tls is None:
            return grpc.aio.insecure_channel(address, options=options)
        # The peer must prove it is system ``peer_id``: its certificate
        # carries that system's name, which we verify instead of the address.
        creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        options.append(("grpc.ssl_target_name_override", system_host_name(self.peer_id)))
        return grpc.aio.secure_channel(address, creds, options=options)

    def start(self) -> None:
        self._task = asyncio.create_task(self._keepalive(), name=f"keepalive-{self.peer_id}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._callbacks):
            task.cancel()
        self.data.close()
        await self.commands.close()
        await self.channel.close(grace=None)
        await self.keepalive_channel.close(grace=None)

    async def goodbye(self) -> None:
        """Tell the peer this system stops cleanly (bounded, best effort); the keepalive ends first."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self.up:
            return
        request = ic.HelloRequest(system_id=self.own_id, role=self.role, goodbye=True)
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            await self.stub.Hello(request, metadata=self.metadata, timeout=min(1.0, self.timeout))

    def peer_left(self) -> None:
        """The peer said goodbye: lost now, not a link timeout later."""
        if self.up is not False:
            self.up = False
            self.reason = "peer-stopped"
            log.info("peer %d at %s stopped cleanly (it said goodbye); its pairs wait for it to return",
                     self.peer_id, self.address)
            self._notify(self._on_down)

    def heard_from(self) -> None:
        """The peer called us: it is alive, whatever our keepalive's channel
        to it says.  A peer restarted within the link timeout drives its
        recovery while our keepalive reconnects to its new process; without
        this, the timeout ran out in the middle of that recovery and every
        pair with the peer was suspended again.  A link already lost comes
        back only by a keepalive answer (which runs the reconnect handling)."""
        if self.up is not False:
            self._last_ok = max(self._last_ok, time.monotonic())
        else:
            # A peer we lost is back (it restarted): ask now, not at the next
            # keepalive, so its reconnect handling starts at once.
            self._wake.set()

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
            asked = time.monotonic()
            try:
                reply = await self.keepalive_stub.Hello(
                    ic.HelloRequest(system_id=self.own_id, role=self.role, roles_digest=self.peer_roles_digest),
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
                self.rtt = self._last_ok - asked
                self.data.port = reply.data_port
                self._take_roles(reply)
                if self.up is not True:
                    self.up = True
                    log.info("peer %d at %s connected", self.peer_id, self.address)
                    self._notify(self._on_up)
                elif self.on_hello is not None:
                    self.on_hello(self, reply)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            # Woken by a call from the peer: at most one keepalive per 0.1 s all the same.
            await asyncio.sleep(max(0.0, min(interval, 0.1) - (time.monotonic() - asked)))

    def _take_roles(self, reply: ic.HelloReply) -> None:
        if not reply.roles_unchanged:
            self.peer_roles = list(reply.roles)
            self.peer_roles_digest = reply.roles_digest
        elif reply.roles_digest != self.peer_roles_digest:
            self.peer_roles_digest = b""  # not the list we hold: ask for it in full next time

    async def command(self, request: ic.PairCommandRequest) -> ic.MirrorState:
        """The peer's answer to a pair command, sent with the others issued at
        the same moment (raises AioRpcError for the call, SplitmirrorError for
        the peer's refusal of this command)."""
        return await self.commands.command(request)

    def read_tracks(self, pair: str, tracks: bytes) -> AsyncIterator[ic.TrackData]:
        call = self.stub.ReadTracks(ic.ReadTracksRequest(pair=pair, tracks=tracks), metadata=self.metadata)
        return call.__aiter__()


def relay(exc: grpc.aio.AioRpcError, peer: int) -> SplitmirrorError:
    """A peer's refusal, or its unreachability, as our own error."""
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"peer system {peer} is unreachable ({exc.code().name})")
    return from_status(exc.code(), f"peer system {peer}: {exc.details()}")
