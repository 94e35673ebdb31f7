"""Runtime objects of a pair: its ends, copy progress and mirror channel."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import ClassVar, Protocol

from .replication.link import Counters, PeerLink
from .replication.queue import BackupMarker
from .replication.stream import ReplicationStream
from .status import PairStatus
from .storage.bitmap import TrackBitmap
from .storage.copytable import PairRow
from .storage.volume import Volume


class MirrorChannel(Protocol):
    """How the primary end sends ordered entries to the mirror end."""

    def push(self, offset: int, data: bytes = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: BackupMarker | None = None) -> asyncio.Future[bool]: ...

    async def close(self) -> None: ...

    def queued_bytes(self) -> int: ...

    def lag_seconds(self) -> float: ...


@dataclasses.dataclass
class PairEnd:
    row: PairRow
    volume: Volume
    bitmap: TrackBitmap


@dataclasses.dataclass
class CopyProgress:
    """Progress of an initial copy or resync (done %, rate, ETA)."""

    direction: str
    total_tracks: int
    track_size: int
    done_tracks: int = 0
    bytes_moved: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def percent(self) -> float:
        return 100.0 if not self.total_tracks else 100.0 * self.done_tracks / self.total_tracks

    @property
    def rate(self) -> float:
        """Tracks' bytes per second (what the volume gained, holes included)."""
        elapsed = time.monotonic() - self.started
        return self.done_tracks * self.track_size / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        rate = self.rate
        remaining = (self.total_tracks - self.done_tracks) * self.track_size
        return remaining / rate if rate > 0 else 0.0


@dataclasses.dataclass
class RetryBackoff:
    """When a failed automatic resync may be tried again: after the link
    timeout, then twice as long each time, at most :attr:`MAX_DELAY`."""

    MAX_DELAY: ClassVar[float] = 30.0
    delay: float = 0.0
    not_before: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.not_before

    def failed(self, now: float, first_delay: float) -> None:
        self.delay = min(self.MAX_DELAY, self.delay * 2 if self.delay else first_delay)
        self.not_before = now + self.delay

    def reset(self) -> None:
        self.delay = self.not_before = 0.0


class Pair:
    """One pair as held by this storage system: one or both of its ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.primary: PairEnd | None = None  # the end this system copies from
        self.mirror: PairEnd | None = None   # the end this system copies into
        self.link: PeerLink | None = None    # remote pairs: the peer
        self.channel: MirrorChannel | None = None  # primary end: towards the mirror end
        self.progress: CopyProgress | None = None
        self.counters = Counters()
        self.copy_task: asyncio.Task[None] | None = None
        self.apply_lock = asyncio.Lock()     # mirror end: one Replicate stream at a time
        self.backup_running = False
        self.reconciling = False
        self.retry = RetryBackoff()           # primary end: automatic resync attempts

    @property
    def ends(self) -> list[PairEnd]:
        return [e for e in (self.primary, self.mirror) if e is not None]

    @property
    def row(self) -> PairRow:
        return self.ends[0].row

    @property
    def status(self) -> PairStatus:
        return self.row.status

    @property
    def remote(self) -> bool:
        return self.row.copy_type == "REMOTE"

    @property
    def peer_id(self) -> int:
        return self.row.pair_system_id

    def queued_bytes(self) -> int:
        """Payload bytes queued to the mirror and not yet acknowledged."""
        return self.channel.queued_bytes() if self.channel is not None else 0

    def lag_seconds(self) -> float:
        return self.channel.lag_seconds() if self.channel is not None else 0.0


class RemoteChannel:
    """Mirror channel over the interconnect (a :class:`ReplicationStream`)."""

    def __init__(self, stream: ReplicationStream) -> None:
        self.stream = stream

    def push(self, offset: int, data: bytes = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: BackupMarker | None = None) -> asyncio.Future[bool]:
        return self.stream.push(offset, data, zero_length=zero_length, flush=flush, resync=resync, marker=marker)

    async def close(self) -> None:
        await self.stream.close()

    def queued_bytes(self) -> int:
        return self.stream.queue.queued_bytes

    def lag_seconds(self) -> float:
        return self.stream.queue.oldest_unacked_age()
