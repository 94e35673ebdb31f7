"""The event log over a real copy table: numbering, persistence, bounded history, followers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from splitmirror.errors import OutOfRange
from splitmirror.eventsink import SPLIT_BRAIN, STATUS, Event, caused_by, current_cause
from splitmirror.observe.events import EventLog
from splitmirror.storage.copytable import CopyTable


async def opened(path: Path, keep: int = 10_000) -> tuple[CopyTable, EventLog]:
    table = CopyTable(path / "copytable.sqlite")
    await table.open()
    log = EventLog(table, keep=keep)
    await log.open()
    return table, log


async def collect(log: EventLog, since: int = 0) -> list[Event]:
    return [e async for e in log.read(since)]


async def test_events_are_numbered_kept_and_resumed_after_reopen(tmp_path: Path) -> None:
    table, log = await opened(tmp_path)
    for i in range(5):
        log.emit(Event(STATUS, pair=f"p{i}", old_status="DUPLEX", status="SPLIT", reason="operator", tracks=i))
    await log.flush()
    events = await collect(log)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[3] == Event(STATUS, pair="p3", old_status="DUPLEX", status="SPLIT", reason="operator", tracks=3,
                              seq=4, timestamp=events[3].timestamp)
    assert [e.seq for e in await collect(log, since=3)] == [4, 5]
    await table.close()

    table, log = await opened(tmp_path)
    assert log.next_seq == 6
    assert log.status_since["p4"] == events[4].timestamp
    log.emit(Event("link-up", peer=2001))
    await log.flush()
    assert [(e.seq, e.kind) for e in await collect(log, since=4)] == [(5, STATUS), (6, "link-up")]
    await table.close()


async def test_the_history_is_bounded_and_older_requests_are_refused(tmp_path: Path) -> None:
    table, log = await opened(tmp_path, keep=10)
    for i in range(1200):  # far more than RECENT_EVENTS: reading goes through the copy table
        log.emit(Event("fence", volume=f"v{i}"))
    await log.flush()
    first = await table.first_event_seq()
    assert 1200 - first + 1 <= 10 + 500  # trimmed, within one page of slack
    kept = await collect(log, since=first - 1)
    assert [e.seq for e in kept] == list(range(first, 1201))
    with pytest.raises(OutOfRange, match=f"the oldest is {first}"):
        await collect(log, since=1)
    with pytest.raises(OutOfRange, match="there is no event 5000 yet: the newest is 1200"):
        await collect(log, since=5000)
    await table.close()


async def test_followers_see_only_committed_events_in_order(tmp_path: Path) -> None:
    table, log = await opened(tmp_path)
    seen: list[int] = []

    async def follow() -> None:
        async for event in log.read(0, follow=True):
            seen.append(event.seq)
            assert event.seq <= log.committed  # never ahead of the copy table

    task = asyncio.create_task(follow())
    for i in range(20):
        log.emit(Event("unfence", volume=f"v{i}"))
        if i % 7 == 0:
            await asyncio.sleep(0.01)
    await log.flush()
    for _ in range(100):
        if len(seen) == 20:
            break
        await asyncio.sleep(0.01)
    log.close_followers()
    await asyncio.wait_for(task, 5)
    assert seen == list(range(1, 21))
    await table.close()


async def test_split_brain_is_said_once_until_the_status_changes(tmp_path: Path) -> None:
    table, log = await opened(tmp_path)
    for _ in range(3):  # automatic resync retries find it again and again
        log.emit(Event(SPLIT_BRAIN, pair="db"))
    assert log.split_brain == {"db"}
    log.emit(Event(STATUS, pair="db", old_status="SUSPENDED", status="COPY"))
    assert log.split_brain == set()
    log.emit(Event(SPLIT_BRAIN, pair="db"))
    await log.flush()
    assert [e.kind for e in await collect(log)] == [SPLIT_BRAIN, STATUS, SPLIT_BRAIN]
    await table.close()


async def test_a_cause_reaches_tasks_started_inside() -> None:
    async def inner() -> str:
        return current_cause()

    with caused_by("auto-resync"):
        task = asyncio.create_task(inner())
    assert current_cause() == ""
    assert await task == "auto-resync"
