"""Pair calls: create, display, split, resync, set-mode, verify, delete, and waiting for a status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence

from splitmirror.v1 import host_pb2

from .connection import Connection
from .errors import ClientError

__all__ = ["POLL_INTERVAL", "PairCalls", "ProgressCallback", "primary_row"]

#: Seconds between two DisplayPairs polls in :meth:`Client.wait_pair`.
POLL_INTERVAL = 0.2

ProgressCallback = Callable[[host_pb2.PairRow], None]


class PairCalls(Connection):
    """Pairs and their copy management table rows."""

    async def create_pair(
        self,
        name: str,
        pvol: str,
        svol: str,
        peer: int = 0,
        mode: str = "sync",
        group: str = "",
    ) -> list[host_pb2.PairRow]:
        """Create a pair (``peer`` 0: local pair) and start its initial copy."""
        req = host_pb2.CreatePairRequest(name=name, pvol=pvol, svol=svol, peer=peer, mode=mode, group=group)
        reply = await self._call(lambda s: s.CreatePair, req)
        return list(reply.rows)

    async def display_pairs(self, name: str = "") -> list[host_pb2.PairRow]:
        """Rows of the copy management table (all pairs when ``name`` is empty)."""
        reply = await self._call(lambda s: s.DisplayPairs, host_pb2.DisplayPairsRequest(name=name))
        return list(reply.rows)

    async def display(self, name: str = "") -> host_pb2.PairList:
        """The rows of :meth:`display_pairs` and, for the consistency groups
        among them that were backed up, each group's newest backup."""
        reply: host_pb2.PairList = await self._call(lambda s: s.DisplayPairs, host_pb2.DisplayPairsRequest(name=name))
        return reply

    async def split_pair(self, name: str) -> list[host_pb2.PairRow]:
        reply = await self._call(lambda s: s.SplitPair, host_pb2.PairRef(name=name))
        return list(reply.rows)

    async def resync_pair(
        self, name: str, reverse: bool = False, force: bool = False
    ) -> list[host_pb2.PairRow]:
        req = host_pb2.ResyncPairRequest(name=name, reverse=reverse, force=force)
        reply = await self._call(lambda s: s.ResyncPair, req)
        return list(reply.rows)

    async def set_pair_mode(self, name: str, mode: str) -> list[host_pb2.PairRow]:
        req = host_pb2.SetPairModeRequest(name=name, mode=mode)
        reply = await self._call(lambda s: s.SetPairMode, req)
        return list(reply.rows)

    async def verify_pair(self, name: str, repair: bool = False) -> host_pb2.VerifyReply:
        req = host_pb2.VerifyPairRequest(name=name, repair=repair)
        reply: host_pb2.VerifyReply = await self._call(lambda s: s.VerifyPair, req)
        return reply

    async def takeover_pair(self, name: str = "", group: str = "", force: bool = False) -> list[host_pb2.PairRow]:
        """At the secondary, with the primary lost: its mirror ends become primary ends."""
        req = host_pb2.RoleChangeRequest(name=name, group=group, force=force)
        reply = await self._call(lambda s: s.TakeoverPair, req)
        return list(reply.rows)

    async def swap_pair(self, name: str = "", group: str = "") -> list[host_pb2.PairRow]:
        """Planned switchover (both ends up, DUPLEX): the roles change, no data is copied."""
        reply = await self._call(lambda s: s.SwapPair, host_pb2.RoleChangeRequest(name=name, group=group))
        return list(reply.rows)

    async def delete_pair(self, name: str) -> None:
        await self._call(lambda s: s.DeletePair, host_pb2.PairRef(name=name))

    async def wait_pair(
        self,
        name: str,
        statuses: Collection[str] = frozenset({"DUPLEX"}),
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        interval: float = POLL_INTERVAL,
    ) -> host_pb2.PairRow:
        """Poll the pair until its primary-end row has a status in ``statuses``
        and return that row. ``on_progress`` is called with the row after each
        poll. Raises ClientError when the pair turns SUSPENDED while waiting
        for DUPLEX, when it disappears, or on timeout (``DEADLINE_EXCEEDED``)."""
        wanted = {s.upper() for s in statuses}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            row = primary_row(name, await self.display_pairs(name))
            if on_progress is not None:
                on_progress(row)
            if row.status in wanted:
                return row
            if row.status == "SUSPENDED" and "DUPLEX" in wanted:
                reason = f": {row.reason}" if row.reason else ""
                raise ClientError("ABORTED", f"pair {name!r} is SUSPENDED{reason}")
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    want = "/".join(sorted(wanted))
                    raise ClientError(
                        "DEADLINE_EXCEEDED",
                        f"pair {name!r} is still {row.status}, not {want}, after {timeout:g}s",
                    )
                await asyncio.sleep(min(interval, remaining))
            else:
                await asyncio.sleep(interval)


def primary_row(name: str, rows: Sequence[host_pb2.PairRow]) -> host_pb2.PairRow:
    """The row of pair ``name`` kept at its primary end (or the only end shown)."""
    mine = [r for r in rows if r.pair == name] or list(rows)
    if not mine:
        raise ClientError("NOT_FOUND", f"pair {name!r} not found")
    for row in mine:
        if row.primary:
            return row
    return mine[0]
