"""Host write latency: SIMPLEX volume vs async pair vs sync pair, in one run.

Starts a primaryd and a secondaryd on loopback, creates three volumes on the
primary (one SIMPLEX, the PVOL of an async DUPLEX pair, the PVOL of a sync
DUPLEX pair) and times 8 KiB random writes at queue depth 1 through the gRPC
host API (client library), interleaving the three in rounds so that
background noise hits them alike.  Prints p50/p90/p99/max per volume and the
ratio async p99 / SIMPLEX p99.  Target (issue 4): <= 1.3.  Always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client
from splitmirror.testing import Site

MiB = 1 << 20
BLOCK = 8192
TARGET = 1.3
WARMUP = 200


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0 < q <= 100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def timed_writes(c: Client, volume: str, offsets: list[int], payload: bytes) -> list[float]:
    """One write at a time; seconds each write took, as the host saw it."""
    latencies: list[float] = []
    for offset in offsets:
        started = time.perf_counter()
        await c.write(volume, offset, payload)
        latencies.append(time.perf_counter() - started)
    return latencies


async def wait_duplex(c: Client, pair: str, timeout: float = 60.0) -> None:
    await c.wait_pair(pair, timeout=timeout, interval=0.05)


async def bench(args: argparse.Namespace, base: Path) -> int:
    primary = Site("primary", 1001, base)
    secondary = Site("secondary", 2001, base)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    size = args.size_mib * MiB
    rng = random.Random(args.seed)
    configs = [("SIMPLEX", "simplex", ""), ("async pair", "apvol", "apair"), ("sync pair", "spvol", "spair")]
    try:
        async with Client(primary.address) as c:
            for _, volume, _ in configs:
                await c.create_volume(volume, size)
            await c.create_pair("apair", "apvol", "apvol-r", peer=secondary.system_id, mode="async")
            await c.create_pair("spair", "spvol", "spvol-r", peer=secondary.system_id, mode="sync")
            for _, _, pair in configs:
                if pair:
                    await wait_duplex(c, pair)

            def offsets(n: int) -> list[int]:
                return [rng.randrange(size // BLOCK) * BLOCK for _ in range(n)]

            for _, volume, _ in configs:
                await timed_writes(c, volume, offsets(WARMUP), rng.randbytes(BLOCK))
            latencies: dict[str, list[float]] = {label: [] for label, _, _ in configs}
            per_round = max(1, args.writes // args.rounds)
            for r in range(args.rounds):
                order = configs[r % len(configs):] + configs[:r % len(configs)]
                for label, volume, _ in order:
                    latencies[label] += await timed_writes(c, volume, offsets(per_round), rng.randbytes(BLOCK))

            states = {}
            for _, _, pair in configs:
                if pair:
                    row = (await c.display_pairs(pair))[0]
                    states[pair] = row
            await c.flush("apvol")
    finally:
        primary.kill()
        secondary.kill()

    print(f"8 KiB random writes, queue depth 1, {per_round * args.rounds} per volume "
          f"({args.rounds} interleaved rounds, {WARMUP} warm-up), {args.size_mib} MiB volumes, loopback")
    print(f"{'volume':<12} {'writes':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, _, _ in configs:
        values = latencies[label]
        print(f"{label:<12} {len(values):>7} {percentile(values, 50) * 1e3:>8.3f} {percentile(values, 90) * 1e3:>8.3f} "
              f"{percentile(values, 99) * 1e3:>8.3f} {max(values) * 1e3:>8.3f}")
    for pair, row in states.items():
        extra = f", queue {row.queue_bytes} bytes, lag {row.lag_seconds:.3f}s" if row.mode == "async" else ""
        print(f"pair {pair} ({row.mode}) at the end: {row.status}{' (' + row.reason + ')' if row.reason else ''}"
              f"{extra}")
    simplex_p99 = percentile(latencies["SIMPLEX"], 99)
    async_p99 = percentile(latencies["async pair"], 99)
    sync_p99 = percentile(latencies["sync pair"], 99)
    ratio = async_p99 / simplex_p99
    print(f"sync p99 / SIMPLEX p99 = {sync_p99 / simplex_p99:.2f}")
    verdict = "PASS" if ratio <= TARGET and states["apair"].status == "DUPLEX" else "MISS"
    print(f"async p99 / SIMPLEX p99 = {ratio:.2f} (target <= {TARGET}): {verdict}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--writes", type=int, default=3000, help="timed writes per volume (default 3000)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--size-mib", type=int, default=256, help="volume size in MiB (default 256)")
    parser.add_argument("--seed", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-async-") as tmp:
        return asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
