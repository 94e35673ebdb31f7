"""nbdcopy of 512 MiB into an export, 1 MiB requests, with FLUSH: nbdkit file vs SIMPLEX vs sync vs async.

Runs ``nbdcopy --request-size=1048576 --flush SOURCE nbd://...`` (SOURCE: a
file of random bytes, so nothing is skipped as zeroes) against, in one run:

  (a) ``nbdkit file`` serving a plain sparse file (the reference NBD server),
  (b) a SIMPLEX volume on primaryd,
  (c) the PVOL of a sync DUPLEX pair (primaryd -> secondaryd),
  (d) the PVOL of an async DUPLEX pair.

Then the same exports are read back (``nbdcopy --request-size=1048576 URI
null:``; no target, for comparison).  Rounds are interleaved (each target
leads a round in turn); the median of the rounds counts.  Prints MiB/s,
the serving process's CPU milliseconds per MiB (nbdkit's, or primaryd's and
secondaryd's), and the ratios of issue 14:
SIMPLEX/nbdkit >= 0.80 and sync/SIMPLEX >= 0.80 (copy-in throughput).
After the runs it waits for the async queue to drain and checks that each
PVOL and its SPVOL hold the same bytes.  ``--profile DIR`` profiles both
daemons (py-spy) for each kind's copy and prints the CPU cost per MiB of
each stage.  Exits 0 whether the targets are met or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import (
    KINDS,
    CpuMeter,
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

TOOLS = ("nbdcopy", "nbdkit")
MiB = 1 << 20
TARGETS = {"SIMPLEX/nbdkit copy in": 0.80, "sync/SIMPLEX copy in": 0.80}


@dataclasses.dataclass
class Result:
    seconds: list[float] = dataclasses.field(default_factory=list)
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # daemon -> ms per MiB
    statuses: list[str] = dataclasses.field(default_factory=list)


def nbdcopy(source: str, dest: str) -> float:
    """Seconds of one ``nbdcopy`` run (1 MiB requests; with --flush when writing an export)."""
    argv = ["nbdcopy", "--request-size=1048576", *(["--flush"] if dest.startswith("nbd") else []), source, dest]
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed


def run_once(daemons: Daemons, target: Target, source: Path, write: bool, size: int, result: Result,
             nbdkit_pid: int) -> None:
    # The serving process's CPU: nbdkit's, or primaryd's (and secondaryd's behind it).
    meter = CpuMeter(daemons.pids if target.kind is not None else {"primaryd": nbdkit_pid})
    meter.start()
    seconds = nbdcopy(str(source), target.uri) if write else nbdcopy(target.uri, "null:")
    use = meter.stop()
    result.seconds.append(seconds)
    for name, u in use.items():
        result.cpu.setdefault(name, []).append(u.seconds / (size / MiB) * 1e3)
    if target.kind is not None and write:
        result.statuses.append(daemons.settle(target.kind))


def bench(base: Path, args: argparse.Namespace) -> int:
    size = args.size
    source = base / "source.bin"
    with source.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    nbdkit, reference = start_nbdkit(base, size)
    daemons = Daemons(base, size)
    try:
        daemons.start()
        targets = [reference, *(Target(k.label, daemons.uri(k), k) for k in KINDS)]
        print(f"nbdcopy --request-size=1048576 --flush: {size >> 20} MiB of random bytes into each export, then "
              f"read back to null:, {args.rounds} interleaved rounds; load average {load_average()}")
        for t in targets:  # warm-up: allocate the volume, page in the source, connect once
            nbdcopy(str(source), t.uri)
            if t.kind is not None:
                daemons.settle(t.kind)
        results = {(t.label, op): Result() for t in targets for op in ("write", "read")}
        for r in range(args.rounds):
            for t in rotated(targets, r):
                for op in ("write", "read"):
                    run_once(daemons, t, source, op == "write", size, results[(t.label, op)], nbdkit.pid)
            print(f"  round {r + 1}/{args.rounds} done, load average {load_average()}", flush=True)
        same = daemons.checksums_match()

        print()
        print(f"{'target':<10} {'op':<6} {'MiB/s median':>12} {'min':>8} {'max':>8} "
              f"{'server ms/MiB':>16} {'secondaryd ms/MiB':>18}  pair after writes")
        for t in targets:
            for op in ("write", "read"):
                res = results[(t.label, op)]
                rates = [size / MiB / s for s in res.seconds]
                cpu_p = median(res.cpu.get("primaryd", []))  # nbdkit's own for nbdkit
                cpu_s = median(res.cpu.get("secondaryd", [])) if t.kind else float("nan")
                status = ",".join(sorted(set(res.statuses))) if res.statuses else "-"
                print(f"{t.label:<10} {op:<6} {median(rates):>12.0f} {min(rates):>8.0f} {max(rates):>8.0f} "
                      f"{cpu_p:>16.2f} {cpu_s:>18.2f}  {status}")
        med = {key: median(res.seconds) for key, res in results.items()}
        figures = {  # throughput ratios: the inverse of the time ratios
            "SIMPLEX/nbdkit copy in": med[("nbdkit", "write")] / med[("SIMPLEX", "write")],
            "sync/SIMPLEX copy in": med[("SIMPLEX", "write")] / med[("sync", "write")],
        }
        print()
        print(f"{'figure':<24} {'value':>6}  target   verdict")
        for name, value in figures.items():
            print(f"{name:<24} {value:>6.2f}  >= {TARGETS[name]:.2f}  {verdict(value >= TARGETS[name])}")
        extra = {"async/SIMPLEX copy in": med[("SIMPLEX", "write")] / med[("async", "write")],
                 "SIMPLEX/nbdkit read": med[("nbdkit", "read")] / med[("SIMPLEX", "read")],
                 "sync/SIMPLEX read": med[("SIMPLEX", "read")] / med[("sync", "read")]}
        for name, value in extra.items():
            print(f"{name:<24} {value:>6.2f}  (no target)")
        cpu = {key: median(res.cpu.get("primaryd", [])) for key, res in results.items()}
        write_cpu = cpu[("nbdkit", "write")] / cpu[("SIMPLEX", "write")]
        read_cpu = cpu[("nbdkit", "read")] / cpu[("SIMPLEX", "read")]
        print(f"CPU per MiB, nbdkit / SIMPLEX primaryd: copy in {write_cpu:.2f}, read back {read_cpu:.2f} "
              "(steadier than times under load)")
        print(f"PVOL and SPVOL hold the same bytes: {same}; load average {load_average()}")
        if args.profile:
            profile(daemons, targets, source, args)
        if not all(same.values()):
            print("ERROR: a PVOL and its SPVOL differ after the run", file=sys.stderr)
            return 1
    finally:
        daemons.stop()
        stop_process(nbdkit)
    return 0


def profile(daemons: Daemons, targets: list[Target], source: Path, args: argparse.Namespace) -> None:
    """One profiled copy in (and one read back) per kind; several copies when one is shorter than
    --profile-seconds."""
    costs: dict[str, dict[str, dict[str, float]]] = {}
    mibs: dict[str, int] = {}
    for t in targets:
        if t.kind is None:
            continue
        for op in ("write", "read"):
            once = nbdcopy(str(source), t.uri) if op == "write" else nbdcopy(t.uri, "null:")
            times = max(1, round(args.profile_seconds / max(once, 0.01)))
            column = f"{t.label} {op}"

            def work(t: Target = t, op: str = op, times: int = times) -> None:
                for _ in range(times):
                    nbdcopy(str(source), t.uri) if op == "write" else nbdcopy(t.uri, "null:")

            _, _, costs[column] = profiled(args.profile, f"nbdcopy-{t.label}-{op}", daemons.pids, args.profile_rate,
                                           not args.no_native, work)
            mibs[column] = times * args.size // MiB
            if op == "write":
                daemons.settle(t.kind)
    print()
    print(f"profiles (py-spy --rate {args.profile_rate}{'' if args.no_native else ' --native'}, "
          f"~{args.profile_seconds:g} s per column; raw stacks in {args.profile}); load average {load_average()}")
    print_profiles(costs, mibs, "MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512M", help="bytes copied into every target (default 512M)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts (default 3)")
    add_profile_args(parser, seconds=10)
    args = parser.parse_args()
    args.size = parse_size(args.size)
    if args.size <= 0 or args.size % MiB:
        parser.error("--size must be a positive multiple of 1M")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (Debian packages libnbd-bin, nbdkit)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-nbdcopy-") as tmp:
        return bench(Path(tmp), args)


if __name__ == "__main__":
    sys.exit(main())
