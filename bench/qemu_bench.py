"""qemu-img bench, 4 KiB requests at depth 16: nbdkit file vs SIMPLEX vs sync vs async.

Runs ``qemu-img bench -f raw -s 4096 -d 16 -c COUNT`` (writes with ``-w``,
then reads of what was written) over NBD on 127.0.0.1 against, in one run:

  (a) ``nbdkit file`` serving a plain sparse file (the reference NBD server),
  (b) a SIMPLEX volume on primaryd,
  (c) the PVOL of a sync DUPLEX pair (primaryd -> secondaryd),
  (d) the PVOL of an async DUPLEX pair.

Rounds are interleaved (each target leads a round in turn) so background
load hits every target alike; the median of the rounds counts.  Prints
ops/s, each daemon's CPU microseconds per request, and the ratios.
Targets (issue 14): SIMPLEX/nbdkit >= 0.60 for read and for write;
sync/SIMPLEX write >= 0.70.  After the runs it waits for the async queue to
drain and checks that each PVOL and its SPVOL hold the same bytes.
``--profile DIR`` then profiles both daemons (py-spy) for each kind and
prints the CPU cost per request of each stage of the data path.  Exits 0
whether the targets are met or not (non-zero only when the run fails).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import (
    KINDS,
    CpuMeter,
    CpuUse,
    Daemons,
    Target,
    add_profile_args,
    load_average,
    median,
    print_profiles,
    profiled,
    rotated,
    start_nbdkit,
    stop_process,
    verdict,
)

from splitmirror.sizes import parse_size

TOOLS = ("qemu-img", "nbdkit")
BLOCK = 4096
TARGETS = {"SIMPLEX/nbdkit read": 0.60, "SIMPLEX/nbdkit write": 0.60, "sync/SIMPLEX write": 0.70}


@dataclasses.dataclass
class Result:
    ops: list[float] = dataclasses.field(default_factory=list)
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # daemon -> us per request
    statuses: list[str] = dataclasses.field(default_factory=list)


def qemu_bench(uri: str, write: bool, count: int, depth: int) -> float:
    """ops/s of one ``qemu-img bench`` run (its own 'Run completed in' time)."""
    argv = ["qemu-img", "bench", "-f", "raw", "-s", str(BLOCK), "-d", str(depth), "-c", str(count)]
    if write:
        argv += ["-w", "--pattern=0xa5"]
    argv.append(uri)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    m = re.search(r"Run completed in ([0-9.]+) seconds", result.stdout)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {result.stdout!r}")
    return count / float(m.group(1))


def run_once(daemons: Daemons, target: Target, write: bool, count: int, depth: int, result: Result) -> None:
    meter = CpuMeter(daemons.pids)
    meter.start()
    ops = qemu_bench(target.uri, write, count, depth)
    use: dict[str, CpuUse] = meter.stop()
    result.ops.append(ops)
    for name, u in use.items():
        result.cpu.setdefault(name, []).append(u.seconds / count * 1e6)
    if target.kind is not None and write:
        result.statuses.append(daemons.settle(target.kind))


def bench(base: Path, args: argparse.Namespace) -> int:
    size, count, depth = args.size, args.count, args.depth
    nbdkit, reference = start_nbdkit(base, size)
    daemons = Daemons(base, size, grpc_stream=args.grpc_stream)
    try:
        daemons.start()
        targets = [reference, *(Target(k.label, daemons.uri(k), k) for k in KINDS)]
        print(f"qemu-img bench: {BLOCK} B requests, depth {depth}, {count} per run, {size >> 20} MiB targets, "
              f"{args.rounds} interleaved rounds (write, then read back); load average {load_average()}")
        for t in targets:  # warm-up: allocate the range, connect once
            qemu_bench(t.uri, True, max(1000, count // 10), depth)
            if t.kind is not None:
                daemons.settle(t.kind)
        results = {(t.label, op): Result() for t in targets for op in ("write", "read")}
        for r in range(args.rounds):
            for t in rotated(targets, r):
                for op in ("write", "read"):
                    run_once(daemons, t, op == "write", count, depth, results[(t.label, op)])
            print(f"  round {r + 1}/{args.rounds} done, load average {load_average()}", flush=True)
        same = daemons.checksums_match()

        print()
        print(f"{'target':<10} {'op':<6} {'ops/s median':>12} {'min':>8} {'max':>8} "
              f"{'primaryd us/req':>16} {'secondaryd us/req':>18}  pair after writes")
        for t in targets:
            for op in ("write", "read"):
                res = results[(t.label, op)]
                cpu_p = median(res.cpu.get("primaryd", [])) if t.kind else float("nan")
                cpu_s = median(res.cpu.get("secondaryd", [])) if t.kind else float("nan")
                status = ",".join(sorted(set(res.statuses))) if res.statuses else "-"
                print(f"{t.label:<10} {op:<6} {median(res.ops):>12.0f} {min(res.ops):>8.0f} {max(res.ops):>8.0f} "
                      f"{cpu_p:>16.1f} {cpu_s:>18.1f}  {status}")
        med = {key: median(res.ops) for key, res in results.items()}
        figures = {
            "SIMPLEX/nbdkit read": med[("SIMPLEX", "read")] / med[("nbdkit", "read")],
            "SIMPLEX/nbdkit write": med[("SIMPLEX", "write")] / med[("nbdkit", "write")],
            "sync/SIMPLEX write": med[("sync", "write")] / med[("SIMPLEX", "write")],
        }
        print()
        print(f"{'figure':<24} {'value':>6}  target   verdict")
        for name, value in figures.items():
            print(f"{name:<24} {value:>6.2f}  >= {TARGETS[name]:.2f}  {verdict(value >= TARGETS[name])}")
        print(f"{'async/SIMPLEX write':<24} {med[('async', 'write')] / med[('SIMPLEX', 'write')]:>6.2f}  (no target)")
        print(f"{'sync/SIMPLEX read':<24} {med[('sync', 'read')] / med[('SIMPLEX', 'read')]:>6.2f}  (no target)")
        print(f"PVOL and SPVOL hold the same bytes: {same}; load average {load_average()}")
        if args.profile:
            profile(daemons, targets, args)
        if not all(same.values()):
            print("ERROR: a PVOL and its SPVOL differ after the run", file=sys.stderr)
            return 1
    finally:
        daemons.stop()
        stop_process(nbdkit)
    return 0


def profile(daemons: Daemons, targets: list[Target], args: argparse.Namespace) -> None:
    """One profiled run per kind and op, about --profile-seconds long each."""
    costs: dict[str, dict[str, dict[str, float]]] = {}
    requests: dict[str, int] = {}
    for t in targets:
        if t.kind is None:
            continue
        for op in ("write", "read"):
            started = time.perf_counter()
            qemu_bench(t.uri, op == "write", max(1000, args.count // 10), args.depth)
            rate = max(1000, args.count // 10) / (time.perf_counter() - started)
            count = max(1000, int(rate * args.profile_seconds))
            column = f"{t.label} {op}"
            _, _, costs[column] = profiled(args.profile, f"qemu-{t.label}-{op}", daemons.pids, args.profile_rate,
                                           not args.no_native,
                                           lambda t=t, op=op, count=count: qemu_bench(t.uri, op == "write", count,
                                                                                       args.depth))
            requests[column] = count
            if op == "write":
                daemons.settle(t.kind)
    print()
    print(f"profiles (py-spy --rate {args.profile_rate}{'' if args.no_native else ' --native'}, "
          f"~{args.profile_seconds:g} s per column; raw stacks in {args.profile}); load average {load_average()}")
    print_profiles(costs, requests, "request")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256M", help="size of every target (default 256M)")
    parser.add_argument("--count", type=int, default=40000,
                        help="requests per qemu-img bench run (default 40000: a few seconds each)")
    parser.add_argument("--depth", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts (default 3)")
    add_profile_args(parser, seconds=20)
    args = parser.parse_args()
    args.size = parse_size(args.size)
    if args.size <= 0 or args.size % (1 << 20):
        parser.error("--size must be a positive multiple of 1M (qemu-img bench wraps around at the end)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (Debian packages qemu-utils, nbdkit)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-qemu-") as tmp:
        return bench(Path(tmp), args)


if __name__ == "__main__":
    sys.exit(main())
