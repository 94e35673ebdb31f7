"""How the primary end of a pair reaches its mirror end: the mirror channel.

A :class:`MirrorChannel` takes ordered entries (writes, flushes, barriers,
resync tracks, backup markers) and resolves each one's future once the
mirror end applied it.  :class:`RemoteChannel` is the one over the
interconnect; a local pair's channel (into a volume of the same storage
system) is :class:`splitmirror.datapath.local_channel.LocalChannel`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ..replication.queue import BackupMarker, GroupCut
from ..replication.stream import ReplicationStream


class MirrorChannel(Protocol):
    """How the primary end sends ordered entries to the mirror end."""

    def push(self, offset: int, data: bytes | memoryview = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: BackupMarker | None = None,
             cut: GroupCut | None = None) -> asyncio.Future[bool]: ...

    def flush_later(self) -> None:
        """Make the mirror end durable up to here; no one waits for it."""

    async def close(self) -> None: ...

    def queued_bytes(self) -> int: ...

    def lag_seconds(self) -> float: ...


class RemoteChannel:
    """Mirror channel over the interconnect (a :class:`ReplicationStream`)."""

    def __init__(self, stream: ReplicationStream) -> None:
        self.stream = stream

    def push(self, offset: int, data: bytes | memoryview = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: BackupMarker | None = None,
             cut: GroupCut | None = None) -> asyncio.Future[bool]:
        return self.stream.push(offset, data, zero_length=zero_length, flush=flush, resync=resync, marker=marker,
                                cut=cut)

    def flush_later(self) -> None:
        self.stream.flush_later()

    async def close(self) -> None:
        await self.stream.close()

    def queued_bytes(self) -> int:
        return self.stream.queue.queued_bytes

    def lag_seconds(self) -> float:
        return self.stream.queue.oldest_unacked_age()
