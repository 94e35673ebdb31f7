"""Host write stall while a backup marker passes, split by phase, one run.

A sync DUPLEX remote pair (1 GiB) with one generation at the secondary, a
writer doing 8 KiB random writes at queue depth 1 through the host API, and
a series of backups (``wait``).  Each backup has two phases as the host
sees them: *prepare* (the secondary brings the generation in sync) and
*marker* (the marker is pushed, travels the stream, the generation splits,
the outcome returns).  For each phase the bench prints the longest host
write that overlapped it, and, as the control, the longest write in windows
of the same length with no backup running (taken between backups): the
stall a backup adds is the difference.  Target (issue 14): the marker
phase adds <= 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _backup_rig import GiB, pair_with_generations, qd1_writes, two_sites

from client import Client


async def bench(base: Path, rounds: int, gap: float) -> int:
    ms = 1000.0
    with two_sites(base) as (primary, secondary):
        async with Client(primary.address) as c:
            await pair_with_generations(c, secondary, "vol", GiB, generations=1)
            async with qd1_writes(c, "vol", GiB) as log:
                rows = []
                for _ in range(rounds):
                    started = time.monotonic()
                    reply = await c.backup("vol-p", generation="vol-g1", wait=True)
                    ended = time.monotonic()
                    marked = started + reply.prepare_seconds
                    await asyncio.sleep(gap)
                    # Control: a window as long as the marker phase, no backup running.
                    quiet = time.monotonic() - gap / 2
                    rows.append((reply.prepare_seconds, ended - marked, log.worst(started, marked),
                                 log.worst(marked, ended), log.worst(quiet, quiet + (ended - marked))))
    durations = sorted(d for _, d in log.samples)
    print(f"{len(log.samples)} host writes, median {statistics.median(durations) * ms:.2f} ms, "
          f"p99 {durations[int(len(durations) * 0.99)] * ms:.2f} ms; load {os.getloadavg()[0]:.1f}")
    print(f"{'round':>5} {'prepare':>9} {'marker':>8} {'worst write: prepare':>21} {'marker':>8} {'control':>8}")
    for i, (prep, mark, wp, wm, wc) in enumerate(rows, 1):
        print(f"{i:>5} {prep * ms:>7.1f}ms {mark * ms:>6.1f}ms {wp * ms:>19.1f}ms {wm * ms:>6.1f}ms {wc * ms:>6.1f}ms")
    added = statistics.median(wm - wc for *_, wm, wc in rows)
    added_prep = statistics.median(wp - wc for _, _, wp, _, wc in rows)
    print(f"median stall added by the marker phase: {added * ms:.1f} ms (target <= 10 ms: "
          f"{'PASS' if added <= 0.010 else 'MISS'}); by the prepare phase: {added_prep * ms:.1f} ms")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--gap", type=float, default=0.6, help="seconds between backups (default 0.6)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-") as tmp:
        return asyncio.run(bench(Path(tmp), args.rounds, args.gap))


if __name__ == "__main__":
    sys.exit(main())
