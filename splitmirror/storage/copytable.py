"""The copy management table, persisted in SQLite (WAL) in the data directory.

One row per pair per volume end held by this storage system, the volumes
themselves, the pending bitmaps (a compacted blob plus appended runs so that
newly set bits are durable with one small insert), and the write-intent
extents.  All calls run on one dedicated thread so that SQLite never stalls
the event loop (:mod:`splitmirror.storage.sqlthread`); rows, bitmaps and
events saved at once share one transaction, concurrent callers of
:meth:`add_runs` share one too, and callers of ``sync`` at once share one
fsync (group commit).

Durability follows the volumes' own contract.  Commits go to the WAL with
``synchronous=NORMAL``: they survive a crash of the daemon (``kill -9``) at
once, and :meth:`sync` (called by every FLUSH, FUA write and status change)
fsyncs the WAL so they survive power loss too - just like the volume data,
which is durable once a FLUSH returned.  A commit never waits for a disk
flush on the write path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from ..status import PairStatus
from .bitmap import TrackBitmap
from .eventrows import EventRows
from .scopes import intent_scopes

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
    undone_runs: list[list[int]] = dataclasses.field(default_factory=list)  # ... as [first, count] runs

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
        super().__init__(path, "copytable")
        self._pending_runs: list[tuple[str, str, int, int]] = []
        self._commit_future: asyncio.Future[None] | None = None  # the commit writers join
        self._pending_intent: list[tuple[str, int]] = []
        self._intent_future: asyncio.Future[None] | None = None  # the intent commit writers join

    async def open(self) -> None:
        def schema(db: sqlite3.Connection) -> None:
            db.executescript(SCHEMA)
            _add_columns(db)

        await self._connect(schema)

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

    async def save_pairs(self, rows: Iterable[PairRow]) -> None:
        """Save pair rows (in the group commit of the moment)."""
        values = [(row.name, row.volume, row.copy_type, row.pair_system_id, row.mirror_volume,
                   int(row.primary), row.status.value, row.mode, row.group, row.split_time, row.reason,
                   row.direction, row.backup_time, row.backup_seq, row.epoch, row.role.to_json(), row.applied_seq)
                  for row in rows]
        await self._grouped(lambda db: db.executemany(
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

        await self._grouped(q)

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
        await self.remove_intents([(volume, e) for e in extents])

    async def remove_intents(self, rows: list[tuple[str, int]]) -> None:
        """Forget ``(volume scope, extent)`` records, in one transaction."""
        await self._call(lambda db: db.executemany(
            "DELETE FROM intent WHERE volume=? AND extent=?", rows))

    async def remove_intent_all(self) -> None:
        await self._call(lambda db: db.execute("DELETE FROM intent"))

