"""What the daemon's settings tell the pairs layer."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Settings:
    link_timeout: float = 5.0
    auto_resync: bool = True
    max_batch_bytes: int = 4 << 20
    async_queue_bytes: int = 256 << 20
