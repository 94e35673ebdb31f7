"""The mirror channel of a local pair: into a volume of the same storage system."""

from __future__ import annotations

import asyncio

from ..errors import FailedPrecondition
from ..pairstate.pair import Pair
from ..replication.queue import BackupMarker, GroupCut
from .system import StorageSystem
from .writes import WriteOp


class LocalChannel:
    """Mirror channel to a mirror end inside the same storage system."""

    def __init__(self, system: StorageSystem, pair: Pair) -> None:
        self.system = system
        self.pair = pair

    def push(self, offset: int, data: bytes | memoryview = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: BackupMarker | None = None,
             cut: GroupCut | None = None) -> asyncio.Future[bool]:
        # A group cut orders nothing here: a local mirror applies each write
        # before it is acknowledged (it is a barrier like any other).
        if marker is not None:
            raise FailedPrecondition(f"pair {self.pair.name!r} is a local pair; backups are taken of remote pairs")
        # Tasks start in creation order, and write_ops takes its place in the
        # mirror volume's range order on its first step: order is kept.
        return asyncio.ensure_future(self._apply(offset, data, zero_length, flush))

    async def _apply(self, offset: int, data: bytes | memoryview, zero_length: int, flush: bool) -> bool:
        mirror = self.pair.mirror
        if mirror is None:
            return False
        vol = mirror.volume
        if flush or not (data or zero_length):  # flush, or a barrier
            await self.system.order(vol).drain()  # the writes pushed before it are applied
            if flush:
                await self.system.flush_volume(vol)
        else:
            await self.system.write_ops(vol, [WriteOp(offset, data, zero_length)])
        return True

    def flush_later(self) -> None:
        self.push(0, flush=True)

    async def close(self) -> None:
        return None

    def queued_bytes(self) -> int:
        return 0

    def lag_seconds(self) -> float:
        return 0.0
