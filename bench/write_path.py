"""Host write throughput: SIMPLEX volume vs sync DUPLEX pair, in one run.

Starts a primaryd and a secondaryd on loopback, then writes through the gRPC
host API (client library) with 1 MiB sequential writes and 64 KiB / 8 KiB
random writes at queue depth 16, first to a SIMPLEX volume, then to the
PVOL of a sync DUPLEX pair, and prints the ratios.  Finally it creates ten
16 GiB volumes and reports each daemon's peak RSS, and the daemons' start
time.  Targets (issue 2): sync >= 70% of SIMPLEX at 1 MiB, >= 50% at 8 KiB;
peak RSS <= 200 MiB with ten 16 GiB volumes; start < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client
from splitmirror.testing import Site, wait_status

MiB = 1 << 20
GiB = 1 << 30


async def run_writes(c: Client, volume: str, size: int, block: int, total: int, depth: int, sequential: bool) -> float:
    """Write ``total`` bytes in ``block``-sized requests, ``depth`` in flight; MiB/s."""
    count = total // block
    payload = os.urandom(block)
    rng = random.Random(1)
    offsets = ([(i * block) % size for i in range(count)] if sequential
               else [rng.randrange(size // block) * block for _ in range(count)])
    queue = iter(offsets)

    async def worker() -> None:
        for offset in queue:
            await c.write(volume, offset, payload, chunk=block)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(depth)))
    return total / MiB / (time.perf_counter() - started)


def peak_rss_mib(site: Site) -> float:
    assert site.proc is not None
    for line in Path(f"/proc/{site.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bench(base: Path, scale: float) -> int:
    primary = Site("primary", 1001, base, link_timeout=5.0)
    secondary = Site("secondary", 2001, base, link_timeout=5.0)
    primary.peer_with(secondary)
    start_s = secondary.start()
    start_p = primary.start()
    try:
        size = 256 * MiB
        cases = [("1 MiB seq", MiB, int(512 * MiB * scale), True),
                 ("64 KiB rand", 64 * 1024, int(128 * MiB * scale), False),
                 ("8 KiB rand", 8192, int(24 * MiB * scale), False)]
        async with Client(primary.address) as c:
            await c.create_volume("simplex", size)
            await c.create_volume("mirrored", size)
            await c.create_pair("bench", "mirrored", "mirrored-r", peer=2001)
            await c.wait_pair("bench", timeout=60)
            results = []
            for label, block, total, seq in cases:
                await run_writes(c, "simplex", size, block, min(total, 16 * MiB), 16, seq)  # warm up
                simplex = await run_writes(c, "simplex", size, block, total, 16, seq)
                duplex = await run_writes(c, "mirrored", size, block, total, 16, seq)
                results.append((label, simplex, duplex))
            row = wait_status(primary, "bench", ["DUPLEX"])
            assert row["status"] == "DUPLEX", row
            same = await c.checksum("mirrored") == await Client(secondary.address).checksum("mirrored-r")
        print(f"{'workload (QD16)':<14} {'SIMPLEX MiB/s':>14} {'sync DUPLEX MiB/s':>18} {'ratio':>7}  target")
        targets = {"1 MiB seq": 0.70, "8 KiB rand": 0.50}
        for label, simplex, duplex in results:
            ratio = duplex / simplex
            target = targets.get(label)
            verdict = "" if target is None else f">= {target:.0%} {'PASS' if ratio >= target else 'MISS'}"
            print(f"{label:<14} {simplex:>14.1f} {duplex:>18.1f} {ratio:>7.2f}  {verdict}")
        print(f"PVOL and SPVOL identical after the run: {same}")

        async with Client(primary.address) as c, Client(secondary.address) as s:
            for i in range(10):
                await c.create_volume(f"big{i}", 16 * GiB)
                await s.create_volume(f"big{i}", 16 * GiB)
            await c.write("big0", 8 * GiB, os.urandom(MiB))
        rss_p, rss_s = peak_rss_mib(primary), peak_rss_mib(secondary)
        print(f"peak RSS with ten 16 GiB volumes: primaryd {rss_p:.0f} MiB, secondaryd {rss_s:.0f} MiB "
              f"(target <= 200 MiB: {'PASS' if max(rss_p, rss_s) <= 200 else 'MISS'})")
        print(f"start time: primaryd {start_p:.2f} s, secondaryd {start_s:.2f} s "
              f"(target < 2 s: {'PASS' if max(start_p, start_s) < 2 else 'MISS'})")
    finally:
        primary.stop()
        secondary.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the amount of data written")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-") as tmp:
        return asyncio.run(bench(Path(tmp), args.scale))


if __name__ == "__main__":
    sys.exit(main())
