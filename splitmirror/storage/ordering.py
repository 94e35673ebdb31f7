"""Write ordering on one volume: overlapping operations run in arrival order.

A write takes a sequence number on the replication stream and is applied
locally while it holds its byte range; a later write (or a resync read) that
overlaps waits for it.  So the local image and the stream agree on the
order of overlapping writes, while disjoint writes still run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class RangeOrder:
    def __init__(self) -> None:
        self._held: list[tuple[int, int, asyncio.Event]] = []

    @contextlib.asynccontextmanager
    async def hold(self, offset: int, length: int) -> AsyncIterator[None]:
        end = offset + length
        # Registration happens before the first await: arrival order decides.
        earlier = [ev for (s, e, ev) in self._held if s < end and offset < e]
        mine = (offset, end, asyncio.Event())
        self._held.append(mine)
        try:
            for ev in earlier:
                await ev.wait()
            yield
        finally:
            self._held.remove(mine)
            mine[2].set()

    async def drain(self) -> None:
        """Wait for every operation that holds a range now (not later ones).

        A barrier for flushes: later writes are not held up while it waits.
        """
        for _s, _e, ev in list(self._held):
            await ev.wait()

    @property
    def busy(self) -> int:
        return len(self._held)
