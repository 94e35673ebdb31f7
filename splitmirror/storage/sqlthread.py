"""One SQLite database on a thread of its own, with group commit.

Every call runs on one dedicated thread so that SQLite never stalls the
event loop.  Changes queued with :meth:`SqlThread._grouped` while the loop
runs one step, or while the previous group commits, share one transaction;
callers of :meth:`SqlThread.sync` at once share one fsync of the WAL.  A
thousand pairs that save their rows at once (a mass recovery) cost a few
commits and fsyncs, not a thousand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

Change = Callable[[sqlite3.Connection], object]


class SqlThread:
    """Asynchronous front of one SQLite database (WAL, ``synchronous=NORMAL``)."""

    def __init__(self, path: Path, thread_name: str) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changes = 0  # rows changed by the commits so far
        self._synced = -1  # ... when the WAL was last made durable
        self._syncing: asyncio.Future[None] | None = None  # the WAL fsync the callers of sync() join
        #: Changes queued for the next group commit, and their callers' futures.
        self._group: list[tuple[Change, asyncio.Future[None]]] = []
        self._groups_running = 0
        #: Transactions that changed rows, and WAL fsyncs, since opened (the metrics show them).
        self.commits = 0
        self.syncs = 0

    @property
    def is_open(self) -> bool:
        return self._db is not None and self._loop is not None

    async def _connect(self, schema: Callable[[sqlite3.Connection], None]) -> None:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level="DEFERRED")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            schema(db)
            return db

        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._executor, connect)
        self._loop = loop
        self._changes, self._synced = 0, -1

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None

        self._submit_group()  # what is queued commits before the database closes
        self._loop = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)

    # -- calls ----------------------------------------------------------------
    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        self._submit_group()  # changes queued before this call commit before it
        return await loop.run_in_executor(self._executor, self._run, fn)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise RuntimeError(f"copy table {self.path} is closed")
        with self._db:
            result = fn(self._db)
        if self._db.total_changes != self._changes:
            self.commits += 1  # a transaction that changed rows (reads are not counted)
            self._changes = self._db.total_changes  # committed: sync() has work to do
        if isinstance(result, sqlite3.Cursor):
            # Never let a cursor reach the event loop thread: finalizing its
            # statement there races with this thread (SQLITE_MISUSE).
            result.close()
            return None  # type: ignore[return-value]
        return result

    # -- group commit -----------------------------------------------------------
    def _grouped(self, fn: Change) -> asyncio.Future[None]:
        """Queue a change for the next group commit, without an await.

        Order is kept: a group is submitted before any later direct call,
        and groups commit one after the other.
        """
        if self._loop is None:
            raise RuntimeError(f"copy table {self.path} is closed")
        fut: asyncio.Future[None] = self._loop.create_future()
        if not self._group and not self._groups_running:
            self._loop.call_soon(self._submit_group)
        self._group.append((fn, fut))
        return fut

    def _submit_group(self) -> None:
        if not self._group or self._loop is None:
            return
        batch, self._group = self._group, []
        try:
            done = self._loop.run_in_executor(self._executor, self._run_group, [fn for fn, _ in batch])
        except RuntimeError as exc:  # the thread is gone: the daemon is stopping
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self._groups_running += 1
        done.add_done_callback(lambda f: self._group_done(f, [fut for _, fut in batch]))

    def _group_done(self, done: asyncio.Future[list[BaseException | None]],
                    futures: list[asyncio.Future[None]]) -> None:
        self._groups_running -= 1
        error = done.exception()
        outcomes: list[BaseException | None] = [error] * len(futures) if error is not None else done.result()
        for fut, exc in zip(futures, outcomes, strict=True):
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
        self._submit_group()  # what queued meanwhile: the next group

    def _run_group(self, batch: list[Change]) -> list[BaseException | None]:
        """One transaction for the batch; if it fails, each change alone (one bad change fails only its caller)."""

        def all_of(db: sqlite3.Connection) -> None:
            for fn in batch:
                result = fn(db)
                if isinstance(result, sqlite3.Cursor):
                    result.close()

        try:
            self._run(all_of)
            return [None] * len(batch)
        except Exception:
            if len(batch) == 1:
                raise
        out: list[BaseException | None] = []
        for fn in batch:
            try:
                self._run(fn)
                out.append(None)
            except Exception as exc:
                out.append(exc)
        return out

    # -- durability --------------------------------------------------------------
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

        async def one_fsync() -> None:
            changes = self._changes  # what the WAL holds now, at least
            try:
                # Not on the SQLite thread: commits made meanwhile need not
                # wait for the disk.
                await asyncio.to_thread(fsync_wal)
                self.syncs += 1
                self._synced = max(self._synced, changes)
            finally:
                self._syncing = None

        # Nothing committed since the last sync: the WAL is durable already
        # (a host FLUSH with no new pair or bitmap change costs no fsync).
        # Callers at once share one fsync; one that committed after a
        # running fsync began waits for it and then for the next one.
        needed = self._changes
        while needed > self._synced:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(one_fsync())
            await asyncio.shield(self._syncing)
