"""What every module of the pairs layer works with.

:class:`PairContext` holds the storage system, the links to peers, the
settings and the background tasks of the pairs layer; it looks pairs and
links up (refusing unknown names) and applies status transitions, the one
way a pair's status changes in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from ..datapath.system import StorageSystem
from ..errors import NotFound
from ..pairstate.pair import Pair
from ..replication.link import PeerLink
from ..status import PairOp
from ..v1 import interconnect_pb2 as ic
from .group_point import GroupPoints
from .settings import Settings
from .transitions import apply_transition


class ResyncCommand(Protocol):
    """``pair resync`` by name, with every check of the command (the manager's)."""

    async def __call__(self, name: str, reverse: bool, force: bool = False,
                       known: ic.MirrorState | None = None) -> Pair: ...


class PairContext:
    def __init__(self, system: StorageSystem, links: dict[int, PeerLink], settings: Settings) -> None:
        self.system = system
        self.links = links
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        #: Mirror ends of async group pairs: pre-images since the group's last complete cut.
        self.group_points = GroupPoints()

    # -- background tasks -------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- status -------------------------------------------------------------------
    def set_status(self, pair: Pair, op: PairOp, reason: str = "") -> bool:
        """Apply a transition to every end held here (in memory, no await)."""
        return apply_transition(pair, op, reason, self.system.events)

    # -- lookups ------------------------------------------------------------------
    def pair(self, name: str) -> Pair:
        try:
            return self.system.pairs[name]
        except KeyError:
            raise NotFound(f"pair {name!r} not found on system {self.system.system_id}") from None

    def link(self, peer: int) -> PeerLink:
        try:
            return self.links[peer]
        except KeyError:
            raise NotFound(f"peer system {peer} is not configured on system {self.system.system_id}") from None

    def pairs_with(self, peer: int) -> list[Pair]:
        return [p for p in self.system.pairs.with_peer(peer) if p.remote and p.peer_id == peer]
