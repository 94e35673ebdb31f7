"""The event history's rows in the copy table (``events``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3

from ..eventsink import Event
from .sqlthread import SqlThread

#: Event fields kept in the row's JSON body (the others have their own columns).
_EVENT_BODY = tuple(f.name for f in dataclasses.fields(Event) if f.name not in ("seq", "timestamp", "kind", "pair"))


def _event_row(e: Event) -> tuple[int, float, str, str, str]:
    body = {name: getattr(e, name) for name in _EVENT_BODY if getattr(e, name)}
    return (e.seq, e.timestamp, e.kind, e.pair, json.dumps(body, separators=(",", ":")))


def _event(row: tuple[int, float, str, str, str]) -> Event:
    body = json.loads(row[4])
    return Event(seq=row[0], timestamp=row[1], kind=row[2], pair=row[3],
                 **{k: v for k, v in body.items() if k in _EVENT_BODY})


class EventRows(SqlThread):
    """The event history in the copy table (a base of :class:`~splitmirror.storage.copytable.CopyTable`)."""

    def submit_events(self, events: list[Event]) -> asyncio.Future[None]:
        """Queue the insert now, without an await: it commits before any call
        made after this one (one SQLite thread, first come first served), in
        the group commit of its moment."""
        rows = [_event_row(e) for e in events]
        return self._grouped(lambda db: db.executemany(
            "INSERT OR REPLACE INTO events(seq, timestamp, kind, pair, body) VALUES (?, ?, ?, ?, ?)", rows))

    async def last_event_seq(self) -> int:
        def q(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT MAX(seq) FROM events").fetchone()
            return int(row[0] or 0)

        return await self._call(q)

    async def first_event_seq(self) -> int:
        def q(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT MIN(seq) FROM events").fetchone()
            return int(row[0] or 0)

        return await self._call(q)

    async def events_after(self, seq: int, limit: int) -> list[Event]:
        def q(db: sqlite3.Connection) -> list[Event]:
            rows = db.execute("SELECT seq, timestamp, kind, pair, body FROM events WHERE seq > ? ORDER BY seq"
                              " LIMIT ?", (seq, limit))
            return [_event(r) for r in rows]

        return await self._call(q)

    async def latest_events(self, kinds: tuple[str, ...]) -> list[Event]:
        """The newest event of each pair among ``kinds``."""
        marks = ", ".join("?" * len(kinds))

        def q(db: sqlite3.Connection) -> list[Event]:
            rows = db.execute(
                "SELECT seq, timestamp, kind, pair, body FROM events WHERE seq IN (SELECT MAX(seq) FROM events"
                f" WHERE kind IN ({marks}) AND pair != '' GROUP BY pair) ORDER BY seq", kinds)
            return [_event(r) for r in rows]

        return await self._call(q)

    async def trim_events(self, keep_after: int) -> None:
        """Forget the events up to ``keep_after`` (the history is bounded)."""
        await self._call(lambda db: db.execute("DELETE FROM events WHERE seq <= ?", (keep_after,)))
