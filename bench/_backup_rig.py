"""Shared set-up of the backup benchmarks (backup, marker_stall).  Not a benchmark itself.

- :func:`two_sites`: a primaryd and a secondaryd on loopback (link timeout 5 s);
- :func:`pair_with_generations`: a volume with 8 MiB of data in a sync DUPLEX
  remote pair ``NAME-p`` and local generations ``NAME-g1..`` (SVOLs ``NAME-s1..``)
  of its SPVOL at the secondary;
- :func:`qd1_writes`: a host writing 8 KiB at random offsets at queue depth 1
  through the host API while the block runs, each write's start and duration
  kept in a :class:`WriteLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client
from splitmirror.testing import Site

MiB = 1 << 20
GiB = 1 << 30


class WriteLog:
    """Host writes as (start, duration), monotonic seconds."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    def worst(self, start: float, end: float) -> float:
        """The longest write that overlapped [start, end]."""
        return max((d for s, d in self.samples if s + d >= start and s <= end), default=0.0)

    def p99_outside(self, windows: list[tuple[float, float]]) -> float:
        """The p99 of the writes that overlapped none of ``windows``."""
        outside = [d for s, d in self.samples if not any(a <= s + d and s <= b for a, b in windows)]
        return sorted(outside)[int(len(outside) * 0.99)] if outside else 0.0


@contextlib.contextmanager
def two_sites(base: Path) -> Iterator[tuple[Site, Site]]:
    primary = Site("primary", 1001, base, link_timeout=5.0)
    secondary = Site("secondary", 2001, base, link_timeout=5.0)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    try:
        yield primary, secondary
    finally:
        primary.stop()
        secondary.stop()


async def pair_with_generations(c: Client, secondary: Site, name: str, size: int, generations: int) -> None:
    await c.create_volume(name, size)
    await c.write(name, 0, os.urandom(8 * MiB))
    await c.create_pair(f"{name}-p", name, f"{name}-r", peer=secondary.system_id)
    await c.wait_pair(f"{name}-p", timeout=120)
    for i in range(1, generations + 1):
        secondary.cli("pair", "create", f"{name}-g{i}", "--pvol", f"{name}-r", "--svol", f"{name}-s{i}", "--wait")


@contextlib.asynccontextmanager
async def qd1_writes(c: Client, volume: str, size: int, warm_up: float = 1.0) -> AsyncIterator[WriteLog]:
    """8 KiB random writes at queue depth 1 into ``volume`` while the block runs (after ``warm_up`` s)."""
    log = WriteLog()
    stop = asyncio.Event()

    async def writer() -> None:
        rng = random.Random(5)
        payload = os.urandom(8192)
        while not stop.is_set():
            offset = rng.randrange(size // 8192) * 8192
            started = time.monotonic()
            await c.write(volume, offset, payload)
            log.samples.append((started, time.monotonic() - started))

    task = asyncio.create_task(writer())
    await asyncio.sleep(warm_up)
    try:
        yield log
    finally:
        stop.set()
        await task
