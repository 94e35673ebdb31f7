"""The copy management table, persisted in SQLite (WAL) in the data directory.

One row per pair per volume end held by this storage system, the volumes
themselves, the pending bitmaps (a compacted blob plus appended runs so that
newly set bits are durable with one small insert), and the write-intent
extents.  All calls run on one dedicated thread so that SQLite never stalls
the event loop; concurrent callers of :meth:`add_runs` share one
transaction (group commit).

Durability follows the volumes' own contract.  Commits go to the WAL with
``synchronous=NORMAL``: they survive a crash of the daemon (``kill -9``) at
once, and :meth:`sync` (called by every FLUSH, FUA write and status change)
fsyncs the WAL so they survive power loss too - just like the volume data,
which is durable once a FLUSH returned.  A commit never waits for a disk
flush on the write path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ..eventsink import Event
from ..status import PairStatus
from .bitmap import TrackBitmap
from .scopes import intent_scopes

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    track_size INTEGER NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    name TEXT NOT NULL,
    volume TEXT NOT NULL,
    copy_type TEXT NOT NULL,
    pair_system_id INTEGER NOT NULL,
    mirror_volume TEXT NOT NULL,
    is_primary INTEGER NOT NULL,
    status TEXT NOT NULL,
    mode TEXT NOT NULL,
    grp TEXT NOT NULL,
    split_time TEXT,
    reason TEXT NOT NULL DEFAULT '',
    direction TEXT NOT NULL DEFAULT 'forward',
    backup_time TEXT,
    backup_seq INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 1,
    role TEXT NOT NULL DEFAULT '',
    applied_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, volume)
);
CREATE TABLE IF NOT EXISTS bitmaps (
    pair TEXT NOT NULL,
    volume TEXT NOT NULL,
    bits BLOB NOT NULL,
    PRIMARY KEY (pair, volume)
);
CREATE TABLE IF NOT EXISTS bitmap_runs (
    pair TEXT NOT NULL,
    volume TEXT NOT NULL,
    start INTEGER NOT NULL,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS intent (
    volume TEXT NOT NULL,
    extent INTEGER NOT NULL,
    PRIMARY KEY (volume, extent)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    timestamp REAL NOT NULL,
    kind TEXT NOT NULL,
    pair TEXT NOT NULL,
    body TEXT NOT NULL
);
"""


@dataclasses.dataclass
class VolumeRow:
    name: str
    size: int
    track_size: int
    created: str


@dataclasses.dataclass
class RoleRecord:
    """How this end got its role, kept with the row (a JSON column)."""

    how: str = ""          # "", "takeover" or "swap": the last role change
    since: str = ""        # ISO 8601: when it happened
    seq: int = 0           # takeover: the last sequence of the write order applied here
    fenced_by: int = 0     # an old primary: the system that took the role over
    divergent: str = ""    # an old primary: the volume its divergent tracks were saved into
    swap: str = ""         # a swap under way: "demoted" (this end gave the role away)
    cut: int = 0           # takeover of an async group pair: the group cut it was rolled back to
    undone: int = 0        # ... and how many tracks that rolled back

    def to_json(self) -> str:
        body = {k: v for k, v in dataclasses.asdict(self).items() if v}
        return json.dumps(body, separators=(",", ":")) if body else ""

    @classmethod
    def from_json(cls, text: str) -> RoleRecord:
        if not text:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in names})


@dataclasses.dataclass
class PairRow:
    """One row of the copy management table (one end of one pair)."""

    name: str
    volume: str
    copy_type: str          # REMOTE or LOCAL
    pair_system_id: int     # serial of the system holding the other end
    mirror_volume: str
    primary: bool
    status: PairStatus
    mode: str               # sync or async
    group: str
    split_time: str | None = None
    reason: str = ""
    direction: str = "forward"
    backup_time: str | None = None  # generations: when their backup was taken; remote pairs: the newest backup
    backup_seq: int = 0             # generations: how many backups they held
    #: Role epoch of a remote pair's end (DRBD's generation identifiers are the
    #: model): it grows by one at every takeover or swap, and on contact the
    #: end with the higher epoch says who is primary.
    epoch: int = 1
    role: RoleRecord = dataclasses.field(default_factory=lambda: RoleRecord())
    #: A remote pair's mirror end: the last sequence of the write stream applied
    #: here (kept with every save of the row: a takeover after a restart names it).
    applied_seq: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.volume)


# -- events ------------------------------------------------------------------------
#: Event fields kept in the row's JSON body (the others have their own columns).
_EVENT_BODY = tuple(f.name for f in dataclasses.fields(Event) if f.name not in ("seq", "timestamp", "kind", "pair"))


def _event_row(e: Event) -> tuple[int, float, str, str, str]:
    body = {name: getattr(e, name) for name in _EVENT_BODY if getattr(e, name)}
    return (e.seq, e.timestamp, e.kind, e.pair, json.dumps(body, separators=(",", ":")))


def _event(row: tuple[int, float, str, str, str]) -> Event:
    body = json.loads(row[4])
    return Event(seq=row[0], timestamp=row[1], kind=row[2], pair=row[3],
                 **{k: v for k, v in body.items() if k in _EVENT_BODY})


class EventRows:
    """The event history in the copy table (mixed into :class:`CopyTable`)."""

    _executor: concurrent.futures.ThreadPoolExecutor
    _loop: asyncio.AbstractEventLoop | None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    def submit_events(self, events: list[Event]) -> asyncio.Future[None]:
        """Queue the insert now, without an await: it commits before any call
        made after this one (one SQLite thread, first come first served)."""
        rows = [_event_row(e) for e in events]
        assert self._loop is not None, "copy table not open"
        return self._loop.run_in_executor(self._executor, self._run, lambda db: db.executemany(
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


def _add_columns(db: sqlite3.Connection) -> None:
    """Columns newer than a copy table made by an earlier release."""
    have = {str(r[1]) for r in db.execute("PRAGMA table_info(pairs)")}
    for name, decl in (("epoch", "INTEGER NOT NULL DEFAULT 1"), ("role", "TEXT NOT NULL DEFAULT ''"),
                       ("applied_seq", "INTEGER NOT NULL DEFAULT 0")):
        if name not in have:
            db.execute(f"ALTER TABLE pairs ADD COLUMN {name} {decl}")


class CopyTable(EventRows):
    """Asynchronous front of the SQLite database ``DATA_DIR/copytable.sqlite``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="copytable")
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_runs: list[tuple[str, str, int, int]] = []
        self._commit_future: asyncio.Future[None] | None = None  # the commit writers join
        self._pending_intent: list[tuple[str, int]] = []
        self._intent_future: asyncio.Future[None] | None = None  # the intent commit writers join
        self._changes = 0  # rows changed by the commits so far
        self._synced = -1  # ... when the WAL was last made durable

    @property
    def is_open(self) -> bool:
        return self._db is not None and self._loop is not None

    # -- plumbing ---------------------------------------------------------
    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, fn)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise RuntimeError(f"copy table {self.path} is closed")
        with self._db:
            result = fn(self._db)
        self._changes = self._db.total_changes  # committed: sync() has work to do
        if isinstance(result, sqlite3.Cursor):
            # Never let a cursor reach the event loop thread: finalizing its
            # statement there races with this thread (SQLITE_MISUSE).
            result.close()
            return None  # type: ignore[return-value]
        return result

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level="DEFERRED")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            _add_columns(db)
            return db

        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._executor, connect)
        self._loop = loop
        self._changes, self._synced = 0, -1

    async def sync(self) -> None:
        """Make every commit so far durable against power loss (fsync the WAL)."""

        def fsync_wal() -> None:
            wal = Path(f"{self.path}-wal")
            try:
                fd = os.open(wal, os.O_RDONLY)
            except FileNotFoundError:
                return  # checkpointed and truncated: the database file is synced
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        # Nothing committed since the last sync: the WAL is durable already
        # (a host FLUSH with no new pair or bitmap change costs no fsync).
        changes = self._changes
        if changes == self._synced:
            return
        # Not on the SQLite thread: commits made meanwhile need not wait for
        # the disk, and everything committed before this call is in the WAL.
        await asyncio.to_thread(fsync_wal)
        self._synced = max(self._synced, changes)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None

        self._loop = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)

    # -- meta ---------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        def q(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._call(q)

    async def set_meta(self, key: str, value: str) -> None:
        await self._call(lambda db: db.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value)))

    async def delete_meta(self, key: str) -> None:
        await self._call(lambda db: db.execute("DELETE FROM meta WHERE key=?", (key,)))

    async def meta_items(self, prefix: str) -> dict[str, str]:
        def q(db: sqlite3.Connection) -> dict[str, str]:
            rows = db.execute("SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
            return {str(k): str(v) for k, v in rows}

        return await self._call(q)

    # -- volumes --------------------------------------------------------
    async def load_volumes(self) -> list[VolumeRow]:
        def q(db: sqlite3.Connection) -> list[VolumeRow]:
            rows = db.execute("SELECT name, size, track_size, created FROM volumes ORDER BY name")
            return [VolumeRow(*r) for r in rows]

        return await self._call(q)

    async def add_volume(self, row: VolumeRow) -> None:
        await self._call(lambda db: db.execute(
            "INSERT INTO volumes(name, size, track_size, created) VALUES (?, ?, ?, ?)",
            (row.name, row.size, row.track_size, row.created)))

    async def remove_volume(self, name: str) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM volumes WHERE name=?", (name,))
            db.execute("DELETE FROM intent WHERE volume IN (?, ?)", intent_scopes(name))

        await self._call(q)

    # -- pairs ------------------------------------------------------------
    async def load_pairs(self) -> list[PairRow]:
        def q(db: sqlite3.Connection) -> list[PairRow]:
            rows = db.execute(
                "SELECT name, volume, copy_type, pair_system_id, mirror_volume, is_primary, status,"
                " mode, grp, split_time, reason, direction, backup_time, backup_seq, epoch, role, applied_seq"
                " FROM pairs ORDER BY name, is_primary DESC")
            return [
                PairRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), PairStatus(r[6]), r[7], r[8], r[9],
                        r[10], r[11], r[12], r[13], r[14], RoleRecord.from_json(r[15]), r[16])
                for r in rows
            ]

        return await self._call(q)

    async def save_pair(self, row: PairRow) -> None:
        await self.save_pairs([row])

    async def save_pairs(self, rows: list[PairRow]) -> None:
        """Save rows in one transaction."""
        values = [(row.name, row.volume, row.copy_type, row.pair_system_id, row.mirror_volume,
                   int(row.primary), row.status.value, row.mode, row.group, row.split_time, row.reason,
                   row.direction, row.backup_time, row.backup_seq, row.epoch, row.role.to_json(), row.applied_seq)
                  for row in rows]
        await self._call(lambda db: db.executemany(
            "INSERT OR REPLACE INTO pairs(name, volume, copy_type, pair_system_id, mirror_volume,"
            " is_primary, status, mode, grp, split_time, reason, direction, backup_time, backup_seq, epoch, role,"
            " applied_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values))

    async def remove_pair(self, name: str, volume: str) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM pairs WHERE name=? AND volume=?", (name, volume))
            db.execute("DELETE FROM bitmaps WHERE pair=? AND volume=?", (name, volume))
            db.execute("DELETE FROM bitmap_runs WHERE pair=? AND volume=?", (name, volume))

        await self._call(q)

    # -- bitmaps ----------------------------------------------------------
    async def load_bitmap(self, pair: str, volume: str, tracks: int) -> TrackBitmap:
        def q(db: sqlite3.Connection) -> TrackBitmap:
            row = db.execute("SELECT bits FROM bitmaps WHERE pair=? AND volume=?", (pair, volume)).fetchone()
            bitmap = TrackBitmap.from_bytes(tracks, bytes(row[0]) if row else b"")
            for start, count in db.execute(
                    "SELECT start, count FROM bitmap_runs WHERE pair=? AND volume=?", (pair, volume)):
                bitmap.add_range(start, start + count)
            return bitmap

        return await self._call(q)

    async def save_bitmap(self, pair: str, volume: str, bitmap: TrackBitmap) -> None:
        """Replace the stored bitmap (compaction: the runs are folded in)."""
        blob = bitmap.to_bytes()

        def q(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO bitmaps(pair, volume, bits) VALUES (?, ?, ?)",
                       (pair, volume, blob))
            db.execute("DELETE FROM bitmap_runs WHERE pair=? AND volume=?", (pair, volume))

        await self._call(q)

    async def add_runs(self, pair: str, volume: str, runs: Iterable[tuple[int, int]]) -> None:
        """Durably add set bits; returns once they are committed.

        Callers arriving while a commit runs share the next one.
        """
        self._pending_runs.extend((pair, volume, s, c) for s, c in runs)
        if self._commit_future is None:
            # The commit runs as its own task: a cancelled caller cannot
            # strand the writers that joined it.
            self._commit_future = asyncio.ensure_future(self._commit_runs())
        await asyncio.shield(self._commit_future)

    async def _commit_runs(self) -> None:
        await asyncio.sleep(0)  # let concurrent writers join this commit
        batch, self._pending_runs = self._pending_runs, []
        self._commit_future = None
        await self._call(lambda db: db.executemany(
            "INSERT INTO bitmap_runs(pair, volume, start, count) VALUES (?, ?, ?, ?)", batch))

    # -- write intent -------------------------------------------------------
    async def load_intent(self) -> dict[str, set[int]]:
        def q(db: sqlite3.Connection) -> dict[str, set[int]]:
            result: dict[str, set[int]] = {}
            for volume, extent in db.execute("SELECT volume, extent FROM intent"):
                result.setdefault(volume, set()).add(extent)
            return result

        return await self._call(q)

    async def add_intent(self, volume: str, extents: Iterable[int]) -> None:
        """Durably record write-intent extents; returns once they are committed.

        The writes that record extents in the same step of the event loop
        (a copy chunk's tracks, a burst of host writes) share one commit
        instead of queueing one each on the SQLite thread.
        """
        self._pending_intent.extend((volume, e) for e in extents)
        if self._intent_future is None:
            self._intent_future = asyncio.ensure_future(self._commit_intent())
        await asyncio.shield(self._intent_future)

    async def _commit_intent(self) -> None:
        await asyncio.sleep(0)  # let concurrent writers join this commit
        batch, self._pending_intent = self._pending_intent, []
        self._intent_future = None
        await self._call(lambda db: db.executemany(
            "INSERT OR IGNORE INTO intent(volume, extent) VALUES (?, ?)", batch))

    async def remove_intent(self, volume: str, extents: Iterable[int]) -> None:
        rows = [(volume, e) for e in extents]
        await self._call(lambda db: db.executemany(
            "DELETE FROM intent WHERE volume=? AND extent=?", rows))

    async def remove_intent_all(self) -> None:
        await self._call(lambda db: db.execute("DELETE FROM intent"))

