"""The event log: numbered events, kept in the copy table, streamed to followers.

:class:`EventLog` is the daemon's :class:`~splitmirror.eventsink.EventSink`.
:meth:`EventLog.emit` gives each event the next sequence number and a
timestamp and queues its insert on the copy table's SQLite thread at once
(no await: the emitting code keeps its place).  Followers see an event only
once it is committed, so nothing a client was shown can vanish in a crash:
after ``kill -9`` and a restart the numbering goes on from the last committed
event, and ``--since SEQ`` resumes without a gap.  The history is bounded
(:data:`KEEP_EVENTS`); asking for events older than the oldest kept is
refused with OUT_OF_RANGE rather than silently skipping them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from ..errors import OutOfRange
from ..eventsink import SPLIT_BRAIN, STATUS, Event
from ..storage.copytable import CopyTable

log = logging.getLogger("splitmirror.events")

#: Events kept in the copy table; older ones are trimmed.
KEEP_EVENTS = 10_000
#: Events kept in memory for followers that are (nearly) in step.
RECENT_EVENTS = 1_000
#: Events read from the copy table at once for a follower far behind.
PAGE = 500


class EventLog:
    """Numbers, persists and streams the events of one storage system."""

    def __init__(self, table: CopyTable, keep: int = KEEP_EVENTS) -> None:
        self.table = table
        self.keep = keep
        self.next_seq = 1
        #: The highest sequence number committed to the copy table.
        self.committed = 0
        self._recent: collections.deque[Event] = collections.deque(maxlen=RECENT_EVENTS)
        self._unsaved: list[Event] = []
        self._saving: asyncio.Future[None] | None = None
        self._changed = asyncio.Event()
        self._closed = False
        self._first_kept = 1
        #: Per pair: when its status last changed (epoch seconds).
        self.status_since: dict[str, float] = {}
        #: Pairs whose last word was a detected split brain (cleared by a status change).
        self.split_brain: set[str] = set()
        self.emitted = 0

    async def open(self) -> None:
        """Go on from the last committed event."""
        self.committed = await self.table.last_event_seq()
        self.next_seq = self.committed + 1
        self._first_kept = (await self.table.first_event_seq()) or self.next_seq
        for event in await self.table.latest_events((STATUS, SPLIT_BRAIN)):
            self._note(event)
        early, self._unsaved = self._unsaved, []
        for event in early:  # emitted before the history was open: numbered now
            self.emit(dataclasses.replace(event, seq=0))

    # -- the sink ---------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        if event.kind == SPLIT_BRAIN and event.pair in self.split_brain:
            return  # said already; a retried resync must not flood the history
        event = dataclasses.replace(event, seq=self.next_seq, timestamp=time.time())
        self.next_seq += 1
        self.emitted += 1
        self._note(event)
        self._unsaved.append(event)
        if not self.table.is_open:
            return  # not open yet (or closed): saved by the next flush
        try:
            future = self.table.submit_events(self._unsaved)
        except RuntimeError:  # the copy table's thread is gone: the daemon is stopping
            return
        batch, self._unsaved = self._unsaved, []
        previous = self._saving
        self._saving = asyncio.ensure_future(self._committed(previous, future, batch))

    def _note(self, event: Event) -> None:
        if event.kind == STATUS:
            self.status_since[event.pair] = event.timestamp
            self.split_brain.discard(event.pair)
        elif event.kind == SPLIT_BRAIN:
            self.split_brain.add(event.pair)

    async def _committed(self, previous: asyncio.Future[None] | None, future: asyncio.Future[None],
                         batch: list[Event]) -> None:
        if previous is not None:
            await asyncio.shield(previous)  # commits are published in order
        try:
            await future
        except Exception:
            log.exception("events %d..%d could not be saved", batch[0].seq, batch[-1].seq)
            return
        self._recent.extend(batch)
        self.committed = batch[-1].seq
        self._wake()
        if self.committed - self._first_kept >= self.keep + PAGE:
            self._first_kept = self.committed - self.keep + 1
            await self.table.trim_events(self._first_kept - 1)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def flush(self) -> None:
        """Wait until every event emitted so far is committed."""
        if self._unsaved and self.table.is_open:
            batch, self._unsaved = self._unsaved, []
            previous = self._saving
            self._saving = asyncio.ensure_future(self._committed(previous, self.table.submit_events(batch), batch))
        if self._saving is not None:
            await asyncio.shield(self._saving)

    def close_followers(self) -> None:
        """End every follower's stream (the daemon is stopping)."""
        self._closed = True
        self._wake()

    # -- reading --------------------------------------------------------------------------
    async def _after(self, seq: int) -> list[Event]:
        if self._recent and self._recent[0].seq <= seq + 1:
            return [e for e in self._recent if seq < e.seq <= self.committed]
        if seq >= self.committed:
            return []
        return await self.table.events_after(seq, PAGE)

    async def read(self, since: int = 0, follow: bool = False) -> AsyncIterator[Event]:
        """The committed events after ``since`` in order; with ``follow``,
        then every new one as it is committed, until the daemon stops."""
        first = await self.table.first_event_seq() or self.committed + 1
        if since and since + 1 < first:
            raise OutOfRange(f"events after {since} are no longer kept: the history holds the last {self.keep} "
                             f"events, the oldest is {first}; ask for --since {first - 1} or follow from now")
        if since > self.committed:
            raise OutOfRange(f"there is no event {since} yet: the newest is {self.committed}")
        last = since
        while not self._closed:
            changed = self._changed
            batch = await self._after(last)
            for event in batch:
                yield event
                last = event.seq
            if not batch:
                if not follow:
                    return
                await changed.wait()
