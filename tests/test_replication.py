"""The sans-I/O replication queue and the per-volume range ordering."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitmirror.replication.queue import Entry, ReplicationQueue
from splitmirror.storage.ordering import RangeOrder

OVERHEAD = 32  # Entry.wire_bytes = payload + 32


def seqs(entries: list[Entry]) -> list[int]:
    return [e.seq for e in entries]


# ---------------------------------------------------------------------- ReplicationQueue


def test_sequence_numbers_increase() -> None:
    q = ReplicationQueue()
    entries = [q.push(i * 512, b"x" * 512) for i in range(5)]
    entries.append(q.push(0, flush=True))
    entries.append(q.push(4096, zero_length=8192))
    entries.append(q.push(0, b"r", resync=True))
    assert seqs(entries) == list(range(1, 9))
    assert q.next_seq == 9
    assert q.unacked == 8
    assert q.has_unsent


def test_entry_fields() -> None:
    q = ReplicationQueue()
    z = q.push(4096, zero_length=8192)
    assert z.length == 8192 and z.data == b"" and z.wire_bytes == OVERHEAD
    f = q.push(0, flush=True)
    assert f.flush and f.length == 0
    w = q.push(10, b"abc", resync=True)
    assert w.resync and w.length == 3 and w.wire_bytes == 3 + OVERHEAD
    assert q.queued_bytes == 3  # payload bytes only


def test_empty_queue() -> None:
    q = ReplicationQueue()
    assert q.take_batch() == []
    assert q.ack(10) == []
    assert q.fail() == []
    assert q.unacked == 0
    assert not q.has_unsent
    assert q.oldest_unacked_age() == 0.0


def test_take_batch_respects_max_bytes() -> None:
    q = ReplicationQueue(max_batch_bytes=3 * (100 + OVERHEAD))
    for i in range(7):
        q.push(i * 100, b"d" * 100)
    b1 = q.take_batch()
    assert seqs(b1) == [1, 2, 3]
    b2 = q.take_batch()
    assert seqs(b2) == [4, 5, 6]
    b3 = q.take_batch()
    assert seqs(b3) == [7]
    assert q.take_batch() == []
    assert not q.has_unsent
    assert q.unacked == 7  # all in flight, none acked


def test_take_batch_honours_a_smaller_carrier_limit() -> None:
    """The peer's frame limit caps a batch below the queue's own maximum; one
    entry always goes, even when it alone exceeds the limit."""
    q = ReplicationQueue(max_batch_bytes=10 * (100 + OVERHEAD))
    for i in range(5):
        q.push(i * 100, b"d" * 100)
    assert seqs(q.take_batch(2 * (100 + OVERHEAD))) == [1, 2]
    assert seqs(q.take_batch(10)) == [3]
    assert seqs(q.take_batch(None)) == [4, 5]


def test_take_batch_stops_before_overflow_not_after() -> None:
    q = ReplicationQueue(max_batch_bytes=250)
    q.push(0, b"a" * 100)  # 132
    q.push(0, b"b" * 100)  # 264 total > 250
    assert seqs(q.take_batch()) == [1]
    assert seqs(q.take_batch()) == [2]


def test_take_batch_always_takes_one_oversized_entry() -> None:
    q = ReplicationQueue(max_batch_bytes=64)
    q.push(0, b"x" * 1000)
    q.push(0, b"y" * 10)
    assert seqs(q.take_batch()) == [1]
    assert seqs(q.take_batch()) == [2]


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 600), min_size=1, max_size=30),
    max_bytes=st.integers(1, 2000),
)
def test_take_batch_property(sizes: list[int], max_bytes: int) -> None:
    q = ReplicationQueue(max_batch_bytes=max_bytes)
    for n in sizes:
        q.push(0, b"z" * n)
    taken: list[Entry] = []
    while q.has_unsent:
        batch = q.take_batch()
        assert batch, "a non-empty queue always yields at least one entry"
        total = sum(e.wire_bytes for e in batch)
        assert len(batch) == 1 or total <= max_bytes
        taken.extend(batch)
    assert seqs(taken) == list(range(1, len(sizes) + 1))
    assert q.queued_bytes == sum(sizes)


def test_ack_is_cumulative_and_ordered() -> None:
    q = ReplicationQueue()
    for i in range(6):
        q.push(i, bytes([i]) * 10)
    q.take_batch()
    assert q.queued_bytes == 60
    done = q.ack(3)
    assert seqs(done) == [1, 2, 3]
    assert q.queued_bytes == 30
    assert q.unacked == 3
    assert q.ack(3) == []  # repeated ack: nothing more
    assert q.ack(2) == []  # stale ack: nothing
    assert seqs(q.ack(6)) == [4, 5, 6]
    assert q.queued_bytes == 0
    assert q.unacked == 0


def test_ack_beyond_inflight_does_not_ack_unsent() -> None:
    q = ReplicationQueue(max_batch_bytes=1)
    for i in range(3):
        q.push(i, b"p")
    assert seqs(q.take_batch()) == [1]
    assert seqs(q.ack(100)) == [1]
    assert q.unacked == 2
    assert q.queued_bytes == 2
    assert seqs(q.take_batch()) == [2]


def test_fail_returns_inflight_then_unsent_in_seq_order() -> None:
    q = ReplicationQueue(max_batch_bytes=2 * (10 + OVERHEAD))
    for i in range(7):
        q.push(i, b"w" * 10)
    q.take_batch()  # 1, 2
    q.take_batch()  # 3, 4
    q.ack(2)
    lost = q.fail()
    assert seqs(lost) == [3, 4, 5, 6, 7]
    assert q.queued_bytes == 0
    assert q.unacked == 0
    assert not q.has_unsent
    assert q.take_batch() == []
    assert q.fail() == []


def test_sequence_continues_after_fail() -> None:
    q = ReplicationQueue()
    q.push(0, b"a")
    q.push(0, b"b")
    q.fail()
    assert q.push(0, b"c").seq == 3
    assert q.queued_bytes == 1


def test_oldest_unacked_age() -> None:
    q = ReplicationQueue(max_batch_bytes=1)
    e1 = q.push(0, b"a")
    e2 = q.push(0, b"b")
    e1.queued_at, e2.queued_at = 100.0, 105.0
    assert q.oldest_unacked_age(now=110.0) == pytest.approx(10.0)  # oldest unsent
    q.take_batch()
    assert q.oldest_unacked_age(now=110.0) == pytest.approx(10.0)  # oldest in flight
    q.ack(1)
    assert q.oldest_unacked_age(now=110.0) == pytest.approx(5.0)
    q.take_batch()
    q.ack(2)
    assert q.oldest_unacked_age(now=110.0) == 0.0


def test_oldest_unacked_age_uses_monotonic_clock() -> None:
    q = ReplicationQueue()
    q.push(0, b"a")
    age = q.oldest_unacked_age()
    assert 0.0 <= age < 5.0


# ---------------------------------------------------------------------- RangeOrder


async def test_overlapping_holds_run_in_arrival_order() -> None:
    order = RangeOrder()
    log: list[str] = []
    release_first = asyncio.Event()
    first_in = asyncio.Event()

    async def first() -> None:
        async with order.hold(0, 100):
            log.append("first-start")
            first_in.set()
            await release_first.wait()
            log.append("first-end")

    async def second() -> None:
        async with order.hold(50, 100):
            log.append("second")

    async def third() -> None:
        async with order.hold(99, 1):
            log.append("third")

    t1 = asyncio.create_task(first())
    await first_in.wait()
    t2 = asyncio.create_task(second())
    t3 = asyncio.create_task(third())
    for _ in range(10):
        await asyncio.sleep(0)
    assert log == ["first-start"]  # both overlapping holds are waiting
    assert order.busy == 3
    release_first.set()
    await asyncio.wait_for(asyncio.gather(t1, t2, t3), 2)
    assert log == ["first-start", "first-end", "second", "third"]
    assert order.busy == 0


async def test_arrival_order_is_registration_order_not_scheduling() -> None:
    """Holds registered before the first ``await`` keep that order even if the
    first one is slow to get going."""
    order = RangeOrder()
    log: list[int] = []
    gate = asyncio.Event()

    async def writer(i: int) -> None:
        async with order.hold(0, 10):
            if i == 0:
                await gate.wait()
            log.append(i)

    tasks = [asyncio.create_task(writer(i)) for i in range(5)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert log == [0, 1, 2, 3, 4]


async def test_disjoint_holds_run_concurrently() -> None:
    order = RangeOrder()
    a_in, b_in = asyncio.Event(), asyncio.Event()

    async def a() -> None:
        async with order.hold(0, 100):
            a_in.set()
            # Would deadlock if b had to wait for a.
            await asyncio.wait_for(b_in.wait(), 2)

    async def b() -> None:
        async with order.hold(100, 100):  # adjacent, not overlapping
            b_in.set()
            await asyncio.wait_for(a_in.wait(), 2)

    await asyncio.wait_for(asyncio.gather(a(), b()), 3)
    assert order.busy == 0


async def test_later_disjoint_hold_overtakes_waiting_overlapping_one() -> None:
    order = RangeOrder()
    release = asyncio.Event()
    entered: list[str] = []

    async def holder() -> None:
        async with order.hold(0, 10):
            entered.append("holder")
            await release.wait()

    async def blocked() -> None:
        async with order.hold(5, 10):
            entered.append("blocked")

    async def free() -> None:
        async with order.hold(1000, 10):
            entered.append("free")

    t1 = asyncio.create_task(holder())
    await asyncio.sleep(0)
    t2 = asyncio.create_task(blocked())
    t3 = asyncio.create_task(free())
    await asyncio.wait_for(t3, 2)
    assert entered == ["holder", "free"]
    release.set()
    await asyncio.wait_for(asyncio.gather(t1, t2), 2)
    assert entered == ["holder", "free", "blocked"]


async def test_hold_released_on_exception() -> None:
    order = RangeOrder()
    with pytest.raises(ValueError):
        async with order.hold(0, 10):
            raise ValueError("boom")
    assert order.busy == 0
    async with order.hold(0, 10):
        assert order.busy == 1


async def test_cancelled_waiter_does_not_block_others() -> None:
    order = RangeOrder()
    release = asyncio.Event()
    log: list[str] = []

    async def holder() -> None:
        async with order.hold(0, 10):
            await release.wait()
            log.append("holder")

    async def waiter(name: str) -> None:
        async with order.hold(0, 10):
            log.append(name)

    t1 = asyncio.create_task(holder())
    await asyncio.sleep(0)
    t2 = asyncio.create_task(waiter("cancelled"))
    t3 = asyncio.create_task(waiter("third"))
    await asyncio.sleep(0)
    t2.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t2
    await asyncio.sleep(0)
    assert log == []  # third still waits for the holder
    release.set()
    await asyncio.wait_for(asyncio.gather(t1, t3), 2)
    assert log == ["holder", "third"]
    assert order.busy == 0
