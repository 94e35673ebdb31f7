"""Restore 10 MiB of files from a 4 GiB volume vs copying the whole volume back.

One run: a 4 GiB PVOL with an ext4 filesystem (10 MiB of files to restore
plus other data) in a sync DUPLEX pair, a backup generation at the
secondary; the files are damaged on the primary, then restored with
``splitmirror restore files``.  Side by side, the whole generation is copied
back with ``nbdcopy --no-extents`` (every byte of the volume, as a tool
without bitmaps must), and the generation's full receipt verification
(``backup verify``, what a restore began with before issue 14) is timed.
Targets (issues 6, 14): bytes across the interconnect <= 2x the restored
files plus filesystem metadata tracks, and full nbdcopy time / ours >= 20.
``--rounds`` restores (files damaged again before each) and full copies
alternate; the medians count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client
from client.agent import fuse_problem, mounted_filesystem
from splitmirror.testing import Site

MiB = 1 << 20
GiB = 1 << 30


def _read_all(root: Path) -> int:
    """Read every regular file under ``root``; bytes read."""
    total = 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                while chunk := fh.read(MiB):
                    total += len(chunk)
    return total


def _warm_copy_seconds(url: str) -> float:
    """nbdcopy of ``url`` to null:, the faster of two runs after one that warms the page cache."""
    sh("nbdcopy", "--request-size=1048576", url, "null:")
    times = []
    for _ in range(2):
        started = time.monotonic()
        sh("nbdcopy", "--request-size=1048576", url, "null:")
        times.append(time.monotonic() - started)
    return min(times)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=1800)


async def bench(base: Path, size_gib: int, rounds: int) -> int:
    problem = fuse_problem()
    if problem:
        print(f"cannot run: {problem}")
        return 1
    tree = base / "tree"
    (tree / "app").mkdir(parents=True)
    (tree / "other").mkdir()
    restore_paths = []
    for i in range(10):
        (tree / "app" / f"file{i}.dat").write_bytes(os.urandom(MiB))
        restore_paths.append(f"/app/file{i}.dat")
    for i in range(20):
        (tree / "other" / f"blob{i}.dat").write_bytes(os.urandom(8 * MiB))
    image = base / "fs.img"
    sh("mke2fs", "-F", "-q", "-t", "ext4", "-d", str(tree), str(image), f"{size_gib}G")

    primary = Site("primary", 1001, base, link_timeout=10.0, nbd=True)
    secondary = Site("secondary", 2001, base, link_timeout=10.0, nbd=True)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    try:
        size = size_gib * GiB
        async with Client(primary.address) as c, Client(secondary.address) as s:
            await c.create_volume("db", size)
            sh("nbdcopy", "--flush", str(image), f"nbd://127.0.0.1:{primary.nbd_port}/db")
            await c.create_pair("db-p", "db", "db-r", peer=2001)
            await c.wait_pair("db-p", timeout=600)
            secondary.cli("pair", "create", "db-g1", "--pvol", "db-r", "--svol", "db-s1", "--wait", "--timeout", "600")
            await c.backup("db-p", wait=True)
            await c.create_volume("scratch", size)
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            restore_times, full_times, reports = [], [], []
            for r in range(rounds):  # interleaved: background load hits both alike
                async with mounted_filesystem(f"nbd://127.0.0.1:{primary.nbd_port}/db", writable=True,
                                              workdir=base / f"damage{r}") as root:
                    for path in restore_paths:
                        (root / path.lstrip("/")).write_bytes(os.urandom(MiB))
                await c.flush("db")
                started = time.monotonic()
                out = secondary.cli("--json", "restore", "files", "db-p", "--generation", "db-g1",
                                    *restore_paths, "--yes").stdout
                restore_times.append(time.monotonic() - started)
                reports.append(json.loads(out))
                started = time.monotonic()
                sh("nbdcopy", "--no-extents", "--request-size=1048576",
                   f"nbd://127.0.0.1:{secondary.nbd_port}/db-s1", f"nbd://127.0.0.1:{primary.nbd_port}/scratch")
                full_times.append(time.monotonic() - started)
                print(f"  round {r + 1}/{rounds}: restore {restore_times[-1]:.2f} s, full copy "
                      f"{full_times[-1]:.2f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
            identical = await c.checksum("db") == await s.checksum("db-r")
            # The floor of any CLI command: a process that starts, connects, asks one question and prints.
            floor = []
            for _ in range(rounds):
                started = time.monotonic()
                secondary.cli("--json", "backups", "db-p")
                floor.append(time.monotonic() - started)
            floor_s = statistics.median(floor)
            restore_s, full_s = statistics.median(restore_times), statistics.median(full_times)
            report = reports[restore_times.index(sorted(restore_times)[len(restore_times) // 2])]
            # What a restore began with before issue 14's change: the whole generation re-read and checked
            # against its receipt (a file restore now checks only the tracks it reads).
            started = time.monotonic()
            verified = await s.verify_backup("db-g1")
            verify_s = time.monotonic() - started
            # Does the restore's mount read at the NBD server's speed? Every file of the backup read through
            # the agent's mount (kernel ext4 on a loop device over nbdfuse, as a restore mounts it) against
            # nbdcopy of the same export to null: (it reads only the allocated extents).
            svol_url = f"nbd://127.0.0.1:{secondary.nbd_port}/db-s1"
            spvol_url = f"nbd://127.0.0.1:{secondary.nbd_port}/db-r"
            server_s, unchecked_s = _warm_copy_seconds(svol_url), _warm_copy_seconds(spvol_url)
            allocated = os.stat(secondary.data_dir / "volumes" / "db-s1.vol").st_blocks * 512
            # Nearly the same bytes unchecked: the SPVOL (what the generation holds, plus the restores).
            unchecked = os.stat(secondary.data_dir / "volumes" / "db-r.vol").st_blocks * 512
            async with mounted_filesystem(svol_url, writable=False, workdir=base / "read") as root:
                started = time.monotonic()
                mount_bytes = await asyncio.to_thread(_read_all, root)
                mount_s = time.monotonic() - started
    finally:
        primary.stop()
        secondary.stop()

    restored = 10 * MiB
    sent = report["bytes_sent"]
    phases = report.get("phase_seconds", {})
    print(f"volume {size_gib} GiB, restored {restored // MiB} MiB of files; load average {load}")
    print(f"{'method':<44} {'seconds':>8} {'bytes across':>14}")
    print(f"{'restore files (by bitmap, the whole command)':<44} {restore_s:>8.2f} {sent:>14,}  (median of {rounds})")
    print(f"{'nbdcopy of the whole volume':<44} {full_s:>8.2f} {size:>14,}  (median of {rounds})")
    print(f"{'a CLI command (backups --json), the floor':<44} {floor_s:>8.2f} {'-':>14}  (median of {rounds})")
    print(f"{'full receipt verification (backup verify)':<44} {verify_s:>8.2f} {'-':>14}  "
          f"(ok: {verified.ok}; what restore start did before)")
    print(f"{'read all files through the restore mount':<44} {mount_s:>8.2f} {mount_bytes:>14,}  "
          f"{mount_bytes / MiB / mount_s:.0f} MiB/s")
    print(f"{'nbdcopy of the backup export to null:':<44} {server_s:>8.2f} {allocated:>14,}  "
          f"{allocated / MiB / server_s:.0f} MiB/s (allocated extents, warm)")
    print(f"{'nbdcopy of the SPVOL (unchecked) to null:':<44} {unchecked_s:>8.2f} {unchecked:>14,}  "
          f"{unchecked / MiB / unchecked_s:.0f} MiB/s (allocated extents, warm)")
    print(f"restore mount read / NBD server read (MiB/s): {mount_bytes / mount_s / (allocated / server_s):.2f}; "
          f"reads checked against the receipt / unchecked: {allocated / server_s / (unchecked / unchecked_s):.2f}")
    print(f"PVOL and SPVOL identical after the restore: {identical}; mounted by: {report.get('mounted_by')}")
    print("restore phases (s):", ", ".join(f"{k} {v:.2f}" for k, v in phases.items()),
          f"; outside them (CLI start, listing, backup unmount, report) {restore_s - sum(phases.values()):.2f}")
    print(f"bytes / restored bytes: {sent / restored:.2f} (target <= 2 plus metadata tracks: "
          f"{'PASS' if sent <= 2 * restored + 2 * MiB else 'MISS'})")
    print("per round, full nbdcopy time / ours:", ", ".join(f"{f / t:.1f}" for f, t in zip(full_times, restore_times,
                                                                                           strict=True)))
    print(f"full nbdcopy time / ours (medians): {full_s / restore_s:.1f} (target >= 20: "
          f"{'PASS' if full_s / restore_s >= 20 else 'MISS'})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved restore / full copy rounds (medians)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-") as tmp:
        return asyncio.run(bench(Path(tmp), args.size_gib, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
