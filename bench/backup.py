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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _backup_rig import GiB, pair_with_generations, qd1_writes, two_sites

from client import Client
from splitmirror.testing import Site


async def measure(primary: Site, secondary: Site, label: str, size: int, rounds: int) -> dict[str, float]:
    name = f"vol{label}"
    async with Client(primary.address) as c:
        await pair_with_generations(c, secondary, name, size, generations=3)
        async with qd1_writes(c, name, size) as log:
            latencies, prepares, stalls, windows = [], [], [], []
            for _ in range(rounds):
                started = time.monotonic()
                reply = await c.backup(f"{name}-p", wait=True)
                ended = time.monotonic()
                windows.append((started, ended))
                latencies.append(reply.latency_seconds)
                prepares.append(reply.prepare_seconds)
                stalls.append(log.worst(started, ended))
                await asyncio.sleep(0.5)
        return {
            "latency_p50": statistics.median(latencies),
            "latency_max": max(latencies),
            "split_only_p50": statistics.median(lat - prep for lat, prep in zip(latencies, prepares, strict=True)),
            "stall_max": max(stalls),
            "write_p99_outside": log.p99_outside(windows),
        }


async def bench(base: Path, rounds: int) -> int:
    with two_sites(base) as (primary, secondary):
        results = {label: await measure(primary, secondary, label, size, rounds)
                   for label, size in (("1G", GiB), ("64G", 64 * GiB))}
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
