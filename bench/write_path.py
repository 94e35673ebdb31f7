"""Host write throughput: SIMPLEX volume vs sync DUPLEX pair, in one run.

Starts a primaryd and a secondaryd on loopback, then writes through the gRPC
host API (client library) with 1 MiB sequential writes and 64 KiB / 8 KiB
random writes at queue depth 16, first to a SIMPLEX volume, then to the
PVOL of a sync DUPLEX pair, and prints the ratios.  Finally it creates ten
16 GiB volumes and reports each daemon's peak RSS, and the daemons' start
time.  Targets (issue 2): sync >= 70% of SIMPLEX at 1 MiB, >= 50% at 8 KiB;
peak RSS <= 200 MiB with ten 16 GiB volumes; start < 2 s.

Then the cost of metrics (issue 17, target <= 3 %): two more primaryd, one
with ``--metrics`` (scraped every second, far more often than Prometheus
would) and one without, take SIMPLEX writes at the same time for the same
seconds (so that the rest of a shared machine's load slows both alike); the
bytes each wrote and the daemon's CPU time per write are compared.
``--metrics-only`` runs only this part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
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


def cpu_seconds(site: Site) -> float:
    """User + system CPU time of the daemon process so far."""
    assert site.proc is not None
    fields = Path(f"/proc/{site.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scraper(site: Site, stop: asyncio.Event, scrapes: list[int]) -> None:
    """A Prometheus-like scraper, once a second (the thread keeps the loop free)."""
    url = f"http://127.0.0.1:{site.metrics_port}/metrics"
    while not stop.is_set():
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        scrapes[0] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def run_for(c: Client, volume: str, size: int, block: int, seconds: float, depth: int,
                  sequential: bool) -> int:
    """Write ``block``-sized requests, ``depth`` in flight, for ``seconds``; bytes written."""
    payload = os.urandom(block)
    rng = random.Random(block)
    written = 0
    deadline = time.perf_counter() + seconds
    position = 0

    async def worker() -> None:
        nonlocal written, position
        while time.perf_counter() < deadline:
            if sequential:
                offset, position = position, (position + block) % size
            else:
                offset = rng.randrange(size // block) * block
            await c.write(volume, offset, payload, chunk=block)
            written += block

    await asyncio.gather(*(worker() for _ in range(depth)))
    return written


def _spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]"


class PinnedSite(Site):
    """A daemon whose threads all run on one CPU."""

    cpu = 0

    def argv(self) -> list[str]:
        return ["taskset", "-c", str(self.cpu), *super().argv()]


async def metrics_cost(base: Path, scale: float, rounds: int, control: bool = False) -> None:
    """Host writes with metrics on vs off: both daemons loaded at the same
    time, for the same seconds, pinned to the same CPU (the client runs on
    the others), so that whatever else the machine runs slows both alike and
    the CPU each write needs decides how many each completes; the ratio of
    what each wrote is the cost.  ``control`` runs off vs off (the noise)."""
    cpus = os.sched_getaffinity(0)
    PinnedSite.cpu = max(cpus)
    if len(cpus) > 1:
        os.sched_setaffinity(0, cpus - {PinnedSite.cpu})
    on = PinnedSite("primary", 1101, base, metrics=not control)
    off = PinnedSite("primary", 1102, base)
    if control:
        on.metrics_port = 0
    on.start()
    off.start()
    size = 256 * MiB
    seconds = 4.0 * scale
    cases = [("8 KiB rand", 8192, False), ("1 MiB seq", MiB, True)]
    scrapes = [0]
    stop = asyncio.Event()
    try:
        async with Client(on.address) as c_on, Client(off.address) as c_off:
            for c in (c_on, c_off):
                await c.create_volume("simplex", size)
                await run_writes(c, "simplex", size, 8192, 8 * MiB, 16, False)  # warm up
            scraping = asyncio.create_task(scraper(on, stop, scrapes) if not control else stop.wait())
            what = "off (control: the noise)" if control else "on (scraped every second)"
            tuned = ", glibc malloc thresholds raised" if "MALLOC_TRIM_THRESHOLD_" in os.environ else ""
            print(f"\nmetrics {what} vs off: SIMPLEX writes at QD16 to both daemons at once, both on CPU "
                  f"{PinnedSite.cpu}, {rounds} rounds of {seconds:g} s{tuned}, load average {os.getloadavg()[0]:.2f}")
            print(f"{'workload':<12} {'off MiB/s':>10} {'on MiB/s':>10} {'on/off':>7} {'rounds on/off':>22} "
                  f"{'off CPU us/wr':>14} {'on CPU us/wr':>13} {'on/off':>7}  target")
            for label, block, seq in cases:
                done = {"off": 0, "on": 0}
                cpu = {"off": 0.0, "on": 0.0}
                ratios = []
                for _ in range(rounds):
                    before = {"on": cpu_seconds(on), "off": cpu_seconds(off)}
                    got_on, got_off = await asyncio.gather(run_for(c_on, "simplex", size, block, seconds, 16, seq),
                                                           run_for(c_off, "simplex", size, block, seconds, 16, seq))
                    cpu["on"] += cpu_seconds(on) - before["on"]
                    cpu["off"] += cpu_seconds(off) - before["off"]
                    done["on"] += got_on
                    done["off"] += got_off
                    ratios.append(got_on / got_off)
                ratio = done["on"] / done["off"]
                wall = rounds * seconds
                cpu_on, cpu_off = (cpu[k] / (done[k] / block) * 1e6 for k in ("on", "off"))
                verdict = "PASS" if ratio >= 0.97 else "MISS"
                print(f"{label:<12} {done['off'] / MiB / wall:>10.1f} {done['on'] / MiB / wall:>10.1f} {ratio:>7.3f} "
                      f"{_spread(ratios):>22} {cpu_off:>14.1f} {cpu_on:>13.1f} {cpu_on / cpu_off:>7.3f}  "
                      f"cost <= 3%: {verdict} ({(1 - ratio) * 100:+.1f}%)")
            stop.set()
            await scraping
        print(f"scrapes of the metrics daemon meanwhile: {scrapes[0]} (load average {os.getloadavg()[0]:.2f})")
    finally:
        stop.set()
        on.stop()
        off.stop()
        os.sched_setaffinity(0, cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the amount of data written")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the metrics comparison")
    parser.add_argument("--metrics-only", action="store_true", help="run only the metrics on/off comparison")
    parser.add_argument("--control", action="store_true", help="also compare two daemons without metrics (noise)")
    parser.add_argument("--malloc-thresholds", action="store_true",
                        help="run the compared daemons with glibc's mmap/trim thresholds raised, which takes the "
                             "page faults of 1 MiB payloads (heap trimming) out of the comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-") as tmp:
        if not args.metrics_only:
            asyncio.run(bench(Path(tmp), args.scale))
        if args.malloc_thresholds:  # inherited by the daemons started from here on
            os.environ.update(MALLOC_MMAP_THRESHOLD_=str(64 * MiB), MALLOC_TRIM_THRESHOLD_=str(256 * MiB))
        asyncio.run(metrics_cost(Path(tmp), args.scale, args.rounds))
        if args.control:
            (Path(tmp) / "control").mkdir()
            asyncio.run(metrics_cost(Path(tmp) / "control", args.scale, args.rounds, control=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
