"""Backup latency and host-write stall, 1 GiB vs 64 GiB (sparse) volumes, one run.

For each size: a sync DUPLEX remote pair with three generations at the
secondary, a writer doing 8 KiB random writes at QD1 through the host API,
and a series of backups.  Prints each backup's latency (command to split),
the part spent bringing the reused generation in sync, and the longest host
write during the backup window compared with the writer's p99 outside it.
Targets (issue 5): latency independent of volume size (<= 100 ms plus the
generation's resync), host stall <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client
from splitmirror.testing import Site

MiB = 1 << 20
GiB = 1 << 30


class LatencyLog:
    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (start, duration)

    def worst_between(self, start: float, end: float) -> float:
        return max((d for s, d in self.samples if s + d >= start and s <= end), default=0.0)

    def p99_outside(self, windows: list[tuple[float, float]]) -> float:
        outside = [d for s, d in self.samples if not any(a <= s + d and s <= b for a, b in windows)]
        return sorted(outside)[int(len(outside) * 0.99)] if outside else 0.0


async def writer(c: Client, volume: str, size: int, stop: asyncio.Event, log: LatencyLog) -> None:
    rng = random.Random(5)
    payload = os.urandom(8192)
    while not stop.is_set():
        offset = rng.randrange(size // 8192) * 8192
        started = time.monotonic()
        await c.write(volume, offset, payload)
        log.samples.append((started, time.monotonic() - started))


async def measure(primary: Site, secondary: Site, label: str, size: int, rounds: int) -> dict[str, float]:
    name = f"vol{label}"
    async with Client(primary.address) as c:
        await c.create_volume(name, size)
        await c.write(name, 0, os.urandom(8 * MiB))
        await c.create_pair(f"{name}-p", name, f"{name}-r", peer=2001)
        await c.wait_pair(f"{name}-p", timeout=120)
        for i in range(1, 4):
            secondary.cli("pair", "create", f"{name}-g{i}", "--pvol", f"{name}-r", "--svol", f"{name}-s{i}", "--wait")
        log = LatencyLog()
        stop = asyncio.Event()
        task = asyncio.create_task(writer(c, name, size, stop, log))
        await asyncio.sleep(1.0)
        latencies, prepares, stalls, windows = [], [], [], []
        for _ in range(rounds):
            started = time.monotonic()
            reply = await c.backup(f"{name}-p", wait=True)
            ended = time.monotonic()
            windows.append((started, ended))
            latencies.append(reply.latency_seconds)
            prepares.append(reply.prepare_seconds)
            stalls.append(log.worst_between(started, ended))
            await asyncio.sleep(0.5)
        stop.set()
        await task
        return {
            "latency_p50": statistics.median(latencies),
            "latency_max": max(latencies),
            "split_only_p50": statistics.median(lat - prep for lat, prep in zip(latencies, prepares, strict=True)),
            "stall_max": max(stalls),
            "write_p99_outside": log.p99_outside(windows),
        }


async def bench(base: Path, rounds: int) -> int:
    primary = Site("primary", 1001, base, link_timeout=5.0)
    secondary = Site("secondary", 2001, base, link_timeout=5.0)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    try:
        results = {label: await measure(primary, secondary, label, size, rounds)
                   for label, size in (("1G", GiB), ("64G", 64 * GiB))}
    finally:
        primary.stop()
        secondary.stop()
    ms = 1000.0
    print(f"{'volume':<7} {'latency p50':>12} {'max':>8} {'split part p50':>15} {'worst write':>12} "
          f"{'write p99 (no backup)':>22}")
    for label, r in results.items():
        print(f"{label:<7} {r['latency_p50'] * ms:>10.1f}ms {r['latency_max'] * ms:>6.1f}ms "
              f"{r['split_only_p50'] * ms:>13.1f}ms {r['stall_max'] * ms:>10.1f}ms "
              f"{r['write_p99_outside'] * ms:>20.1f}ms")
    small, big = results["1G"], results["64G"]
    ratio = big["latency_p50"] / small["latency_p50"]
    split_ok = max(r["split_only_p50"] for r in results.values()) <= 0.100
    stall_ok = max(r["stall_max"] for r in results.values()) <= 0.020
    print(f"latency 64G / 1G: {ratio:.2f} (independent of size: {'PASS' if 0.5 <= ratio <= 2.0 else 'MISS'})")
    print(f"latency beyond the generation's resync <= 100 ms: {'PASS' if split_ok else 'MISS'}")
    print(f"longest host write during a backup <= 20 ms: {'PASS' if stall_ok else 'MISS'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-") as tmp:
        return asyncio.run(bench(Path(tmp), args.rounds))


if __name__ == "__main__":
    sys.exit(main())
