"""A thousand pairs per daemon (issue 20): the table, in one run.

Starts a primaryd and a secondaryd on loopback (link timeout 5 s) and grows
to ``--pairs`` sparse volumes (``--size`` each) in sync pairs, measuring:

- create and display: seconds per pair created, and ``pair display`` of
  every pair, at 1, 100 and ``--pairs`` pairs;
- write latency: median 8 KiB sync write (queue depth 1, gRPC) to the PVOL of
  a pair at 1 pair and at ``--pairs`` pairs, and to an unpaired volume;
- idle: CPU % and RSS of each daemon over ``--idle-seconds`` with every
  pair's replication stream opened by a write, then idle;
- mass recovery after ``kill -9`` of the primary right after one 8 KiB
  write to every volume: seconds until every pair is DUPLEX again, bytes the
  resync sent against bytes written (and against bytes that differ: 0, the
  writes were acknowledged by the mirror), peak RSS of both daemons, and how
  often a link was declared lost or a copy interrupted (from the logs);
- the same after ``kill -9`` of the secondary, with one 8 KiB write to every
  volume while it is down (these bytes differ);
- fan-in: ``--fanin`` primaries into one secondary, each copying a
  ``--fanin-mib`` volume of random data while it takes 8 KiB writes; time to
  DUPLEX, equal checksums, secondary peak RSS.

Targets (ratios in one run): write at N pairs <= 1.1 x at 1 pair; recovery
<= 15 s, no link lost, RSS <= 300 MiB; resync bytes <= 1.1 x bytes that
differ; idle CPU <= 1 % per daemon.  Heavy: run it once, on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import Profiler

from client import Client
from splitmirror.sizes import parse_size
from splitmirror.testing import Site

T = TypeVar("T")
MiB = 1 << 20
TRACK = 8192
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_status(site: Site, key: str) -> float:
    """A ``/proc/PID/status`` size field in MiB (VmRSS, VmHWM)."""
    assert site.proc is not None
    for line in Path(f"/proc/{site.proc.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(site: Site) -> float:
    assert site.proc is not None
    fields = Path(f"/proc/{site.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def bounded(items: list[T], fn: Callable[[T], Awaitable[Any]], at_once: int = 16) -> None:
    gate = asyncio.Semaphore(at_once)

    async def one(item: T) -> None:
        async with gate:
            await fn(item)

    await asyncio.gather(*(one(i) for i in items))


async def statuses(site: Site) -> dict[str, str]:
    async with Client(site.address, timeout=120) as c:
        return {r.pair: r.status for r in await c.display_pairs()}


async def wait_all(site: Site, status: str, timeout: float) -> float:
    """Seconds until every pair of ``site`` is ``status`` (inf: not within ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if set((await statuses(site)).values()) == {status}:
                return time.monotonic() - started
        except Exception:  # a daemon still starting
            pass
        await asyncio.sleep(1.0)  # displaying a thousand pairs is work for the daemon too
    return float("inf")


async def write_latency(site: Site, volume: str, count: int) -> float:
    """Median seconds of ``count`` 8 KiB writes, one at a time."""
    payload = os.urandom(TRACK)
    times = []
    async with Client(site.address) as c:
        for i in range(count):
            started = time.perf_counter()
            await c.write(volume, (i * 7919 % 1024) * TRACK, payload)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


async def grow(primary: Site, first: int, last: int, size: int) -> float:
    """Create volumes and pairs ``first``..``last - 1``; seconds per pair."""
    started = time.monotonic()

    async def one(i: int) -> None:
        async with Client(primary.address, timeout=120) as c:
            await c.create_volume(f"v{i}", size)
            await c.create_pair(f"p{i}", f"v{i}", f"v{i}-r", peer=2001)

    await bounded(list(range(first, last)), one, 8)
    return (time.monotonic() - started) / max(1, last - first)


async def display_seconds(site: Site) -> float:
    started = time.monotonic()
    async with Client(site.address, timeout=120) as c:
        await c.display_pairs()
    return time.monotonic() - started


async def write_each(site: Site, n: int, offset: int) -> int:
    payload = os.urandom(TRACK)

    async def one(i: int) -> None:
        async with Client(site.address, timeout=120) as c:
            await c.write(f"v{i}", offset, payload)

    await bounded(list(range(n)), one, 32)
    return n * TRACK


async def resync_bytes(site: Site) -> int:
    async with Client(site.address, timeout=120) as c:
        stats = await c.stats()
    return sum(p.resync_bytes_sent for p in stats.pairs)


def count_in_log(site: Site, since: int, *needles: str) -> int:
    text = site.log()[since:]
    return sum(text.count(n) for n in needles)


async def idle(primary: Site, secondary: Site, seconds: float) -> dict[str, float]:
    await asyncio.sleep(3)  # the intent log settles, copies finished
    before = {s.role: cpu_seconds(s) for s in (primary, secondary)}
    await asyncio.sleep(seconds)
    out = {f"idle CPU % {s.role}d": 100 * (cpu_seconds(s) - before[s.role]) / seconds for s in (primary, secondary)}
    out.update({f"RSS MiB {s.role}d": proc_status(s, "VmRSS") for s in (primary, secondary)})
    return out


async def recovery(victim: Site, primary: Site, secondary: Site, n: int, timeout: float,
                   profile: Path | None = None) -> dict[str, float]:
    """kill -9 ``victim`` with every volume dirty; time to all DUPLEX, bytes, RSS, warnings."""
    if victim is primary:
        written = await write_each(primary, n, 3 * TRACK)
        differ = 0  # sync writes: acknowledged once the mirror applied them
        primary.kill()
        sent_before = 0  # counters start at 0 with the new process
    else:
        sent_before = await resync_bytes(primary)
        secondary.kill()
        await wait_all(primary, "SUSPENDED", 60)
        written = differ = await write_each(primary, n, 5 * TRACK)
    started = time.monotonic()
    wall = time.time()
    victim.start(timeout=120)
    healthy = time.monotonic() - started
    # From here on: the survivor noticing the kill itself is not counted.
    marks = {s.role: len(s.log()) for s in (primary, secondary)}
    with contextlib.ExitStack() as stack:
        if profile is not None:
            assert primary.proc is not None and secondary.proc is not None
            stack.enter_context(Profiler(profile, f"recovery-{victim.role}",
                                         {"primaryd": primary.proc.pid, "secondaryd": secondary.proc.pid}, rate=50))
        seconds = await wait_all(primary, "DUPLEX", timeout)
    total = time.monotonic() - started if seconds != float("inf") else seconds
    await wait_all(secondary, "DUPLEX", 30)
    sent = await resync_bytes(primary) - sent_before
    first_copy, last_copy = await copy_span(primary, wall)
    return {
        "seconds to all DUPLEX": total,
        "... of which restart until healthy": healthy,
        "... first resync start, s after restart": first_copy,
        "... last resync finish, s after restart": last_copy,
        "bytes written": written,
        "bytes that differ": differ,
        "resync bytes sent": sent,
        "peak RSS MiB primaryd": proc_status(primary, "VmHWM"),
        "peak RSS MiB secondaryd": proc_status(secondary, "VmHWM"),
        "links declared lost": sum(count_in_log(s, marks[s.role], "suspected lost", " lost (")
                                   for s in (primary, secondary)),
        "copies interrupted": count_in_log(primary, marks["primary"], "copy interrupted"),
        "cannot resync": count_in_log(primary, marks["primary"], "cannot resync"),
    }


async def copy_span(primary: Site, since: float) -> tuple[float, float]:
    """Seconds after ``since`` (wall clock) of the first resync start and the last resync finish."""
    first = last = float("nan")
    async with Client(primary.address, timeout=120) as c:
        async for event in c.events():
            if event.timestamp < since:
                continue
            if event.kind == "resync-start" and first != first:
                first = event.timestamp - since
            elif event.kind == "resync-finish":
                last = event.timestamp - since
    return first, last


async def fan_in(base: Path, primaries: int, mib: int, timeout: float) -> dict[str, float]:
    secondary = Site("secondary", 2001, base / "fanin", link_timeout=5.0)
    sites = [Site("primary", 1001 + k, base / "fanin", link_timeout=5.0) for k in range(primaries)]
    for site in sites:
        site.peer_with(secondary)
    (base / "fanin").mkdir(parents=True, exist_ok=True)
    try:
        secondary.start(timeout=60)
        for site in sites:
            site.start(timeout=60)
        data = os.urandom(MiB)

        async def prepare(k: int) -> None:
            async with Client(sites[k].address, timeout=120) as c:
                await c.create_volume("db", mib * MiB)
                for off in range(0, mib * MiB, MiB):
                    await c.write("db", off, data[off // MiB % 251:] + data[:off // MiB % 251])

        await asyncio.gather(*(prepare(k) for k in range(primaries)))
        started = time.monotonic()

        async def copy_and_write(k: int) -> None:
            async with Client(sites[k].address, timeout=120) as c:
                await c.create_pair(f"db-p{k}", "db", f"db-{k}", peer=2001)  # pair names are unique per secondary
                for i in range(64):  # writes while the copy runs
                    await c.write("db", (i * 97 % (mib * MiB // TRACK)) * TRACK, os.urandom(TRACK))

        await asyncio.gather(*(copy_and_write(k) for k in range(primaries)))
        times = await asyncio.gather(*(wait_all(s, "DUPLEX", timeout) for s in sites))
        seconds = time.monotonic() - started if max(times) != float("inf") else float("inf")
        equal = 0
        async with Client(secondary.address, timeout=120) as sc:
            for k, site in enumerate(sites):
                async with Client(site.address, timeout=120) as c:
                    equal += await c.checksum("db") == await sc.checksum(f"db-{k}")
        return {"fan-in primaries": primaries, "fan-in MiB copied each": mib, "fan-in seconds to all DUPLEX": seconds,
                "fan-in checksums equal": equal, "fan-in peak RSS MiB secondaryd": proc_status(secondary, "VmHWM")}
    finally:
        for site in [*sites, secondary]:
            site.kill()


def row(name: str, value: float, target: str = "") -> None:
    text = f"{value:,.0f}" if abs(value) >= 1000 or value == int(value) else f"{value:.3g}"
    print(f"  {name:<42} {text:>16}  {target}", flush=True)


async def bench(args: argparse.Namespace, base: Path) -> int:
    n = args.pairs
    size = parse_size(args.size)
    primary = Site("primary", 1001, base, link_timeout=5.0)
    secondary = Site("secondary", 2001, base, link_timeout=5.0)
    primary.peer_with(secondary)
    misses = 0
    try:
        secondary.start(timeout=60)
        primary.start(timeout=60)
        async with Client(primary.address) as c:
            if "unpaired" not in [v.name for v in await c.list_volumes()]:  # a --dir of an earlier run has it
                await c.create_volume("unpaired", size)
        print(f"# {n} pairs of {args.size} sparse volumes, sync, one primaryd -> one secondaryd", flush=True)
        if args.recovery_only:
            done = len(await statuses(primary))
            await grow(primary, done, n, size)
            await wait_all(primary, "DUPLEX", 300)
            victims = {"primary": [primary], "secondary": [secondary], "both": [primary, secondary]}[args.recovery_only]
            for victim in victims:
                misses += await recover_and_report(victim, primary, secondary, args, base)
            # A clean stop keeps the pairs for the next run (--dir).
            primary.stop()
            secondary.stop()
            return 1 if misses else 0
        if args.idle_only:
            await grow(primary, 0, n, size)
            await wait_all(primary, "DUPLEX", 120)
            await write_each(primary, n, 0)  # every pair's stream open
            print(f"## idle, {n} pairs with open streams, over {args.idle_seconds:g} s", flush=True)
            for key, value in (await idle(primary, secondary, args.idle_seconds)).items():
                misses += key.startswith("idle CPU") and value > 1.0
                row(key, value, "target <= 1" if key.startswith("idle CPU") else "")
            return 1 if misses else 0
        print("## create and display", flush=True)
        lat: dict[int, float] = {}
        unpaired: dict[int, float] = {}
        done = 0
        for target in sorted({1, min(100, n), n}):
            per_pair = await grow(primary, done, target, size)
            done = target
            await wait_all(primary, "DUPLEX", 120)
            row(f"create, s per pair (pairs {target})", per_pair)
            row(f"display all, s (pairs {target})", await display_seconds(primary))
            if target in (1, n):
                await write_each(primary, target, 0)  # every pair's stream open
                lat[target] = await write_latency(primary, "v0", args.writes)
                unpaired[target] = await write_latency(primary, "unpaired", args.writes)
        print("## write latency, median 8 KiB sync write (gRPC, queue depth 1)", flush=True)
        row("PVOL ms at 1 pair", lat[1] * 1000)
        row(f"PVOL ms at {n} pairs", lat[n] * 1000)
        ratio = lat[n] / lat[1]
        misses += ratio > 1.1
        row(f"ratio {n} / 1", ratio, "target <= 1.1")
        row("unpaired volume ms at 1 pair", unpaired[1] * 1000)
        row(f"unpaired volume ms at {n} pairs", unpaired[n] * 1000)
        print(f"## idle, {n} pairs with open streams, over {args.idle_seconds:g} s", flush=True)
        for key, value in (await idle(primary, secondary, args.idle_seconds)).items():
            target = "target <= 1" if key.startswith("idle CPU") else ""
            misses += bool(target) and value > 1.0
            row(key, value, target)
        for victim in (primary, secondary):
            misses += await recover_and_report(victim, primary, secondary, args, base)
        row("allocated MiB primary volumes", allocated_mib(primary, "v"))
        row("allocated MiB secondary volumes", allocated_mib(secondary, "v"), "target <= 1.1 x primary")
    finally:
        primary.kill()
        secondary.kill()
    if args.fanin:
        print(f"## fan-in: {args.fanin} primaries -> one secondary, concurrent copies and writes", flush=True)
        for key, value in (await fan_in(base, args.fanin, args.fanin_mib, args.recovery_timeout)).items():
            row(key, value)
    print(f"# {misses} target(s) missed", flush=True)
    return 1 if misses else 0


async def recover_and_report(victim: Site, primary: Site, secondary: Site, args: argparse.Namespace,
                             base: Path) -> int:
    """One mass recovery with its rows; the number of targets it missed."""
    n = args.pairs
    print(f"## mass recovery after kill -9 of the {victim.role}d, {n} dirty pairs "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    result = await recovery(victim, primary, secondary, n, args.recovery_timeout,
                            Path(args.profile) if args.profile else None)
    for key, value in result.items():
        target = {"seconds to all DUPLEX": "target <= 15", "links declared lost": "target 0",
                  "peak RSS MiB primaryd": "target <= 300",
                  "peak RSS MiB secondaryd": "target <= 300",
                  "resync bytes sent": "target <= 1.1 x bytes that differ"}.get(key, "")
        row(key, value, target)
    misses = int(result["seconds to all DUPLEX"] > 15 or result["links declared lost"] > 0)
    misses += result["resync bytes sent"] > 1.1 * result["bytes that differ"]
    misses += max(result["peak RSS MiB primaryd"], result["peak RSS MiB secondaryd"]) > 300
    return misses


def allocated_mib(site: Site, prefix: str) -> float:
    return sum(p.stat().st_blocks * 512 for p in (site.data_dir / "volumes").glob(f"{prefix}*.vol")) / MiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--size", default="16G", help="size of each (sparse) volume")
    parser.add_argument("--writes", type=int, default=400, help="8 KiB writes per latency figure")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--idle-only", action="store_true", help="only the idle part (create, open streams, idle)")
    parser.add_argument("--recovery-timeout", type=float, default=300.0)
    parser.add_argument("--recovery-only", choices=["primary", "secondary", "both"],
                        help="only mass recovery after kill -9 of this daemon (pairs kept in --dir are reused)")
    parser.add_argument("--profile", help="py-spy both daemons during each recovery; raw stacks into this directory")
    parser.add_argument("--fanin", type=int, default=10, help="primaries into one secondary (0: skip)")
    parser.add_argument("--fanin-mib", type=int, default=64)
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args()
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        return asyncio.run(bench(args, Path(args.dir)))
    with tempfile.TemporaryDirectory(prefix="splitmirror-scale-") as tmp:
        return asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
