"""The event stream: every status change, copy, backup point, restore step,
fence and link change of a storage system, numbered."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio

from splitmirror.v1 import host_pb2

from .connection import Connection
from .errors import from_rpc_error

__all__ = ["EventCalls"]


class EventCalls(Connection):
    """``Events``: the history kept by the server, then (``follow``) new events as they happen."""

    async def events(self, since: int = 0, follow: bool = False) -> AsyncIterator[host_pb2.Event]:
        """Events after sequence number ``since`` (0: the oldest kept), in order.

        Without ``follow`` the iterator ends at the newest event; with it, it
        waits for new ones until the server stops or the caller stops
        iterating.  Remember the last ``seq`` seen and pass it as ``since``
        to resume after a reconnect (or a restart of the daemon) without a
        gap; events older than the server's bounded history are refused with
        ``OUT_OF_RANGE``.
        """
        if not self._connected:
            await self.connect()
        stub = self._get_stub()
        call = stub.Events(host_pb2.EventsRequest(since=since, follow=follow), timeout=None if follow else self.timeout,
                           metadata=self._metadata or None)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()
