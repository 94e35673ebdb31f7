"""The ordered write stream of one pair, as a sans-I/O state machine.

Host writes, flushes and resync tracks enter with a sequence number; the
sender takes them out in batches (coalescing small writes into large
interconnect messages); the peer acknowledges cumulatively.  On a fault every
unacknowledged entry is handed back so its tracks can be marked pending.
No asyncio and no gRPC here: :mod:`splitmirror.replication.stream` drives it.
"""

from __future__ import annotations

import collections
import dataclasses
import time


@dataclasses.dataclass(frozen=True, slots=True)
class BackupMarker:
    """Split ``generation`` at the mirror end at this point of the write order."""

    marker: str
    generation: str
    backup_time: str


@dataclasses.dataclass(frozen=True, slots=True)
class GroupCut:
    """One point of an async consistency group's write order (a group barrier).

    The primary pushes a cut with the same ``cut`` number into the stream of
    every async pair of the group that mirrors, with no await between the
    pushes: each stream holds before it exactly the writes pushed before it,
    in every stream alike.  ``members`` is how many streams carry it; the
    mirror knows the cut complete once that many applied it.
    """

    cut: int
    members: int


@dataclasses.dataclass(slots=True)
class Entry:
    seq: int
    offset: int
    data: bytes | memoryview
    zero_length: int = 0
    flush: bool = False
    resync: bool = False
    queued_at: float = 0.0
    marker: BackupMarker | None = None
    cut: GroupCut | None = None

    @property
    def length(self) -> int:
        return self.zero_length or len(self.data)

    @property
    def wire_bytes(self) -> int:
        return len(self.data) + 32


class StreamFailed(Exception):
    """The stream is broken; the entries were not (all) applied."""


class ReplicationQueue:
    """Sequence numbers, batching and cumulative acknowledgement."""

    def __init__(self, max_batch_bytes: int = 4 << 20) -> None:
        self.max_batch_bytes = max_batch_bytes
        self.next_seq = 1
        self._unsent: collections.deque[Entry] = collections.deque()
        self._inflight: collections.deque[Entry] = collections.deque()
        self.queued_bytes = 0  # unacknowledged payload bytes (unsent + in flight)

    def push(self, offset: int, data: bytes | memoryview = b"", *, zero_length: int = 0, flush: bool = False,
             resync: bool = False, marker: BackupMarker | None = None, cut: GroupCut | None = None) -> Entry:
        entry = Entry(self.next_seq, offset, data, zero_length, flush, resync, time.monotonic(), marker, cut)
        self.next_seq += 1
        self._unsent.append(entry)
        self.queued_bytes += len(data)
        return entry

    @property
    def last_unsent(self) -> Entry | None:
        return self._unsent[-1] if self._unsent else None

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent)

    @property
    def unacked(self) -> int:
        return len(self._unsent) + len(self._inflight)

    def oldest_unacked_age(self, now: float | None = None) -> float:
        oldest = self._inflight[0] if self._inflight else self._unsent[0] if self._unsent else None
        if oldest is None:
            return 0.0
        return (time.monotonic() if now is None else now) - oldest.queued_at

    def take_batch(self, limit: int | None = None) -> list[Entry]:
        """Move the next batch (at least one entry, at most max bytes, and at
        most ``limit`` bytes when the carrier has a smaller one) in flight."""
        most = self.max_batch_bytes if limit is None else min(limit, self.max_batch_bytes)
        batch: list[Entry] = []
        size = 0
        while self._unsent:
            entry = self._unsent[0]
            if batch and size + entry.wire_bytes > most:
                break
            batch.append(self._unsent.popleft())
            size += entry.wire_bytes
        self._inflight.extend(batch)
        return batch

    def ack(self, seq: int) -> list[Entry]:
        """Everything up to ``seq`` is applied; returns those entries in order."""
        done: list[Entry] = []
        while self._inflight and self._inflight[0].seq <= seq:
            entry = self._inflight.popleft()
            self.queued_bytes -= len(entry.data)
            done.append(entry)
        return done

    def fail(self) -> list[Entry]:
        """The stream broke: return every unacknowledged entry and reset."""
        lost = list(self._inflight) + list(self._unsent)
        self._inflight.clear()
        self._unsent.clear()
        self.queued_bytes = 0
        return lost
