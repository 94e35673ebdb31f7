"""What the daemon's settings tell the pairs layer."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Settings:
    link_timeout: float = 5.0
    auto_resync: bool = True
    max_batch_bytes: int = 4 << 20
    async_queue_bytes: int = 256 << 20
    #: Copies (initial copies, resyncs) that run at once over one link, and in all:
    #: a mass recovery queues the rest instead of starving keepalives and memory;
    #: the copies of one link share LINK_WINDOW_BYTES in flight (pairs/copying.py).
    copies_per_link: int = 32
    copies_at_once: int = 64
    #: Pairs brought back to agreement at once after a reconnect: their commands to the
    #: peer travel together (replication/commands.py), a few calls for them all.
    reconciles_at_once: int = 1024
