"""What the procedures need of the pair machinery, and nothing more.

Backup and restore depend on pairs through this :class:`PairOperations`
protocol (structural typing: :class:`splitmirror.pairs.manager.PairManager`
satisfies it without naming it), so they import no module of the pairs
layer and the pairs layer imports none of theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ..datapath.system import StorageSystem
from ..pairstate.pair import Pair
from ..replication.link import PeerLink
from ..status import PairOp


class PairOperations(Protocol):
    @property
    def system(self) -> StorageSystem: ...

    @property
    def links(self) -> Mapping[int, PeerLink]: ...

    def pair(self, name: str) -> Pair:
        """The pair ``name`` held here, or NotFound."""
        ...

    def mirror_pair(self, peer: int, name: str) -> Pair:
        """The pair ``name`` whose mirror end is here, driven by system ``peer``, or NotFound."""
        ...

    def set_status(self, pair: Pair, op: PairOp, reason: str = "") -> bool:
        """Apply a transition to the ends held here, in memory and without an await."""
        ...

    async def split(self, name: str) -> Pair: ...

    async def resync(self, name: str, reverse: bool, force: bool = False) -> Pair: ...
