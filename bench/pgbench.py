"""PostgreSQL 15 pgbench on ext4 over NBD: SIMPLEX vs sync DUPLEX vs async (root).

For each volume kind -- a twin SIMPLEX volume (the reference), the PVOL of a
sync DUPLEX pair and the PVOL of an async DUPLEX pair, all on one primaryd
with a secondaryd as the peer -- it attaches the NBD export with
``nbdfuse`` (a file in a FUSE mount), puts a kernel loop device on that
file, makes ext4 on it and mounts it, and creates a PostgreSQL cluster
there (``initdb`` as the postgres user, a port of its own, socket in the
mount), then ``pgbench -i``.  The measured runs are ``pgbench -n -c 4 -T
SECONDS``, interleaved SIMPLEX / sync / async (each kind leads a round in
turn), each cluster started just before its run and stopped after it, so
only one database works at a time.  Prints the median tps per kind, each
daemon's CPU per transaction and per block request at the loop device, and
the ratios.  Targets (issue 14): sync/SIMPLEX >= 0.70, async/SIMPLEX >=
0.90.  ``--profile DIR`` then profiles both daemons (py-spy) during one
more run per kind and prints the CPU cost per transaction of each stage.

Needs root (FUSE, loop devices, mounts, runuser).  Installs PostgreSQL 15
from Debian (``postgresql-15``) when it is missing, waiting for the dpkg
lock.  Everything it set up (postgres, mounts, loop devices, FUSE mounts,
daemons) is torn down at the end, also on failure or SIGTERM.  Exits 0
whether the targets are met or not (non-zero only when the run fails).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from _harness import (
    KINDS,
    CpuMeter,
    Daemons,
    Kind,
    add_profile_args,
    load_average,
    median,
    print_profiles,
    profiled,
    rotated,
    verdict,
)

from splitmirror.sizes import parse_size
from splitmirror.testing import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
TOOLS = ("nbdfuse", "losetup", "mkfs.ext4", "mount", "umount", "runuser")
TARGETS = {"sync/SIMPLEX": 0.70, "async/SIMPLEX": 0.90}


def run(argv: list[str], timeout: float = 300, check: bool = True, user: str | None = None) -> str:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")
    return result.stdout


def ensure_postgres() -> None:
    """Install PostgreSQL 15 from Debian when it is missing."""
    if all((PG_BIN / tool).exists() for tool in ("initdb", "pg_ctl", "postgres", "pgbench")):
        return
    print("PostgreSQL 15 is missing: apt-get install postgresql-15 (waiting for the dpkg lock)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=900", "-y", "-q"]
    install = [*apt, "install", "--no-install-recommends", "postgresql-15", "postgresql-client-15"]
    if subprocess.run(install, env=env, timeout=1800).returncode != 0:
        subprocess.run([*apt, "update"], env=env, timeout=1800, check=True)
        subprocess.run(install, env=env, timeout=1800, check=True)


def loop_stats(device: str) -> tuple[int, int, int]:
    """(reads, writes, flushes) completed by a block device so far."""
    fields = [int(x) for x in Path(f"/sys/block/{Path(device).name}/stat").read_text().split()]
    flushes = fields[15] if len(fields) > 15 else 0
    discards = fields[11] if len(fields) > 11 else 0
    return fields[0], fields[4] + discards, flushes


@dataclasses.dataclass
class Database:
    """One kind's stack: nbdfuse -> loop -> ext4 -> PostgreSQL cluster."""

    kind: Kind
    base: Path
    port: int = dataclasses.field(default_factory=free_port)
    fuse: subprocess.Popen[bytes] | None = None
    loop: str = ""

    @property
    def fuse_dir(self) -> Path:
        return self.base / f"fuse-{self.kind.label}"

    @property
    def mount_dir(self) -> Path:
        return self.base / f"mnt-{self.kind.label}"

    @property
    def data_dir(self) -> Path:
        return self.mount_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.mount_dir / "run"

    def setup(self, uri: str, stack: contextlib.ExitStack, scale: int) -> None:
        self.fuse_dir.mkdir()
        self.mount_dir.mkdir()
        pidfile = self.base / f"nbdfuse-{self.kind.label}.pid"
        self.fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(self.fuse_dir / "disk"), uri],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stack.callback(self.unfuse)
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text().strip():
            if self.fuse.poll() is not None:
                err = self.fuse.stderr.read().decode(errors="replace") if self.fuse.stderr else ""
                raise RuntimeError(f"nbdfuse exited with {self.fuse.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise TimeoutError("nbdfuse did not become ready")
            time.sleep(0.05)
        self.loop = run(["losetup", "-f", "--show", str(self.fuse_dir / "disk")]).strip()
        stack.callback(self.detach)
        # Inode tables and journal written now, not by ext4lazyinit in the background of the measured runs.
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.loop], timeout=600)
        run(["mount", "-o", "noatime", self.loop, str(self.mount_dir)])
        stack.callback(self.umount)
        for d in (self.data_dir, self.socket_dir):
            d.mkdir()
            shutil.chown(d, PG_USER, PG_USER)
        self.data_dir.chmod(0o700)
        run([str(PG_BIN / "initdb"), "-D", str(self.data_dir), "-U", PG_USER, "--auth=trust", "-E", "UTF8",
             "--no-sync"], user=PG_USER, timeout=300)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# splitmirror bench/pgbench.py\nport = {self.port}\nlisten_addresses = ''\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n")
        stack.callback(self.stop, "immediate")
        self.start()
        run([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), *self.connection()], user=PG_USER, timeout=900)
        self.stop()

    def connection(self) -> list[str]:
        return ["-h", str(self.socket_dir), "-p", str(self.port), "postgres"]

    @property
    def log_file(self) -> Path:
        return self.base / "pglogs" / f"{self.kind.label}.log"

    def start(self) -> None:
        self.log_file.parent.mkdir(exist_ok=True)
        shutil.chown(self.log_file.parent, PG_USER, PG_USER)
        run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
             "-w", "-t", "120", "start"], user=PG_USER, timeout=180)

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "120", "stop"],
                user=PG_USER, timeout=180, check=mode == "fast")

    def pgbench(self, clients: int, seconds: float) -> float:
        out = run([str(PG_BIN / "pgbench"), "-n", "-c", str(clients), "-T", str(int(seconds)), *self.connection()],
                  user=PG_USER, timeout=seconds + 300)
        m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
        if not m:
            raise RuntimeError(f"no tps in pgbench output: {out!r}")
        return float(m.group(1))

    # -- teardown (each step retried; never raises) ------------------------
    def umount(self) -> None:
        for attempt in range(10):
            if subprocess.run(["umount", str(self.mount_dir)], capture_output=True).returncode == 0:
                return
            time.sleep(0.5 * (attempt + 1))
        subprocess.run(["umount", "-l", str(self.mount_dir)], capture_output=True)

    def detach(self) -> None:
        if self.loop:
            for _ in range(10):
                if subprocess.run(["losetup", "-d", self.loop], capture_output=True).returncode == 0:
                    return
                time.sleep(0.5)

    def unfuse(self) -> None:
        fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        for _ in range(10):
            if subprocess.run([fusermount, "-u", str(self.fuse_dir)], capture_output=True).returncode == 0:
                break
            if self.fuse is not None and self.fuse.poll() is not None:
                break
            time.sleep(0.5)
        if self.fuse is not None:
            try:
                self.fuse.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait()


@dataclasses.dataclass
class Rounds:
    tps: list[float] = dataclasses.field(default_factory=list)
    transactions: list[int] = dataclasses.field(default_factory=list)
    ios: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # process -> CPU seconds per round
    statuses: set[str] = dataclasses.field(default_factory=set)


def measured_run(db: Database, daemons: Daemons, args: argparse.Namespace, out: Rounds) -> None:
    db.start()
    try:
        pids = dict(daemons.pids)
        if db.fuse is not None:
            pids["nbdfuse"] = db.fuse.pid
        meter = CpuMeter(pids)
        before = loop_stats(db.loop)
        meter.start()
        tps = db.pgbench(args.clients, args.seconds)
        use = meter.stop()
        after = loop_stats(db.loop)
    finally:
        db.stop()
    out.tps.append(tps)
    out.transactions.append(round(tps * int(args.seconds)))
    out.ios.append(tuple(a - b for a, b in zip(after, before, strict=True)))  # type: ignore[arg-type]
    for name, u in use.items():
        out.cpu.setdefault(name, []).append(u.seconds)
    out.statuses.add(daemons.settle(db.kind))


def report(results: dict[str, Rounds], args: argparse.Namespace) -> None:
    print()
    print(f"{'kind':<8} {'tps median':>10} {'min':>8} {'max':>8} {'reads/tx':>9} {'writes/tx':>10} {'flush/tx':>9} "
          f"{'primaryd us/tx':>15} {'secondaryd us/tx':>17} {'nbdfuse us/tx':>14} {'primaryd us/io':>15}  pair")
    for kind in KINDS:
        r = results[kind.label]
        tx = sum(r.transactions) or 1
        reads, writes, flushes = (sum(io[i] for io in r.ios) for i in range(3))
        cpu = {name: sum(v) / tx * 1e6 for name, v in r.cpu.items()}
        per_io = sum(r.cpu.get("primaryd", [])) / max(1, reads + writes + flushes) * 1e6
        print(f"{kind.label:<8} {median(r.tps):>10.1f} {min(r.tps):>8.1f} {max(r.tps):>8.1f} {reads / tx:>9.2f} "
              f"{writes / tx:>10.2f} {flushes / tx:>9.2f} {cpu.get('primaryd', 0):>15.1f} "
              f"{cpu.get('secondaryd', 0):>17.1f} {cpu.get('nbdfuse', 0):>14.1f} {per_io:>15.1f}  "
              f"{','.join(sorted(r.statuses))}")
    simplex = median(results["SIMPLEX"].tps)
    print()
    print(f"{'figure':<16} {'value':>6}  target   verdict")
    for kind in KINDS[1:]:
        name = f"{kind.label}/SIMPLEX"
        value = median(results[kind.label].tps) / simplex
        print(f"{name:<16} {value:>6.2f}  >= {TARGETS[name]:.2f}  {verdict(value >= TARGETS[name])}")
    print(f"load average {load_average()}")


def bench(base: Path, args: argparse.Namespace) -> int:
    base.chmod(0o755)  # the postgres user reaches its data directory through here
    daemons = Daemons(base, args.size, grpc_stream=args.grpc_stream)
    with contextlib.ExitStack() as outer:
        outer.callback(daemons.stop)
        daemons.start()
        dbs = {kind.label: Database(kind, base) for kind in KINDS}
        with contextlib.ExitStack() as stack:  # postgres, mounts, loop devices, FUSE mounts
            started = time.perf_counter()
            for kind in KINDS:
                dbs[kind.label].setup(daemons.uri(kind), stack, args.scale)
                daemons.settle(kind)
            setup = time.perf_counter() - started
            print(f"pgbench -n -c {args.clients} -T {int(args.seconds)} (scale {args.scale}), {args.rounds} "
                  f"interleaved rounds, ext4 on loop on nbdfuse, {args.size >> 20} MiB volumes (set-up {setup:.0f} s);"
                  f" load average {load_average()}", flush=True)
            results = {kind.label: Rounds() for kind in KINDS}
            for r in range(args.rounds):
                for kind in rotated(KINDS, r):
                    measured_run(dbs[kind.label], daemons, args, results[kind.label])
                print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{k.label} {results[k.label].tps[-1]:.1f} tps" for k in KINDS) +
                    f"; load average {load_average()}", flush=True)
            report(results, args)
            if args.profile:
                profile(daemons, dbs, args)
        # Compared only once nothing writes any more: a mounted ext4 still
        # writes (journal commits), and the two checksums are not taken at
        # the same instant.
        same = daemons.checksums_match()
        print(f"PVOL and SPVOL hold the same bytes (after unmounting): {same}")
        if not all(same.values()):
            print("ERROR: a PVOL and its SPVOL differ after the run", file=sys.stderr)
            return 1
    return 0


def profile(daemons: Daemons, dbs: dict[str, Database], args: argparse.Namespace) -> None:
    costs: dict[str, dict[str, dict[str, float]]] = {}
    requests: dict[str, int] = {}
    for kind in KINDS:
        db = dbs[kind.label]
        db.start()
        try:
            tps, _, costs[kind.label] = profiled(args.profile, f"pgbench-{kind.label}", daemons.pids,
                                                 args.profile_rate, not args.no_native,
                                                 lambda db=db: db.pgbench(args.clients, args.profile_seconds))
        finally:
            db.stop()
        requests[kind.label] = max(1, round(tps * int(args.profile_seconds)))
        daemons.settle(kind)
    print()
    print(f"profiles (py-spy --rate {args.profile_rate}{'' if args.no_native else ' --native'}, "
          f"{args.profile_seconds:g} s pgbench per column; raw stacks in {args.profile}); "
          f"load average {load_average()}")
    print_profiles(costs, requests, "transaction")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the teardown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30, help="length of each pgbench run (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c (default 4)")
    parser.add_argument("--scale", type=int, default=1, help="pgbench -i -s (default 1)")
    parser.add_argument("--size", default="1G", help="size of each volume (default 1G)")
    add_profile_args(parser, seconds=30)
    args = parser.parse_args()
    args.size = parse_size(args.size)
    if args.size < (256 << 20) or args.size % (1 << 20):
        parser.error("--size must be a multiple of 1M, at least 256M")
    if os.geteuid() != 0:
        print("bench/pgbench.py needs root (FUSE, loop devices, mounts)", file=sys.stderr)
        return 2
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (Debian packages nbdfuse, fuse3, util-linux, e2fsprogs)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    ensure_postgres()
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-pg-", ignore_cleanup_errors=True) as tmp:
        return bench(Path(tmp), args)


if __name__ == "__main__":
    sys.exit(main())
