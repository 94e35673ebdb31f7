"""Resync after changing 1% of a 4 GiB volume: splitmirror vs rsync, in one run.

Starts a primaryd and a secondaryd on loopback (with a counting TCP proxy on
the interconnect), creates a sparse 4 GiB volume, writes 1 GiB of random
data spread over it, mirrors it in a sync pair until DUPLEX, splits the
pair and keeps a copy of the (identical) SPVOL image as the stale rsync
target.  Then it rewrites 1% of the tracks on the PVOL (random tracks,
seeded) and brings the mirror up to date twice:

- ``splitmirror pair resync NAME --wait`` (the CLI, wall time), bytes from
  the daemon's ``resync_bytes_sent`` counter and from the proxy (wire);
- ``rsync --inplace --no-whole-file --stats`` of the changed PVOL image to
  the stale copy through an ``rsync --daemon`` on 127.0.0.1, bytes from
  rsync's "Total bytes sent".

Both results are checked (daemon checksums; file digests).  Targets (issue
4): resync >= 10x faster than rsync, bytes sent <= 1.05 x the changed
tracks.  Always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client
from splitmirror.sizes import format_size, parse_size
from splitmirror.testing import Site, free_port
from tests.faultproxy import ProxyPair

MiB = 1 << 20
TRACK = 8192
SPEED_TARGET = 10.0
BYTES_TARGET = 1.05
PAIR, PVOL, SVOL = "bpair", "big", "big-r"


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


async def bounded(jobs: list[tuple[int, bytes]], c: Client, volume: str, depth: int) -> None:
    """Write ``(offset, data)`` jobs with up to ``depth`` in flight."""
    queue = iter(jobs)

    async def worker() -> None:
        for offset, data in queue:
            await c.write(volume, offset, data)

    await asyncio.gather(*(worker() for _ in range(depth)))


async def resync_stats(site: Site) -> tuple[int, int]:
    async with Client(site.address) as c:
        stats = await c.stats()
    pair = next(p for p in stats.pairs if p.pair == PAIR)
    return int(pair.resync_bytes_sent), int(pair.resync_tracks_sent)


def start_rsyncd(base: Path, target_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = base / "rsyncd.conf"
    conf.write_text(
        f"pid file = {base / 'rsyncd.pid'}\n"
        "use chroot = false\n"
        f"uid = {os.getuid()}\n"
        f"gid = {os.getgid()}\n"
        "[vol]\n"
        f"    path = {target_dir}\n"
        "    read only = false\n")
    log = open(base / "rsyncd.log", "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                             "--address=127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"rsync --daemon did not start: {(base / 'rsyncd.log').read_text()}") from None
            time.sleep(0.05)


def copy_seconds_from_log(log: str) -> float | None:
    """Seconds between the last 'forward resync' and the next 'COPY -> DUPLEX' of the pair, per the daemon log."""
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
    begins = re.findall(stamp + rf".*pair {PAIR}: forward resync of", log, re.MULTILINE)
    ends = re.findall(stamp + rf".*pair {PAIR}: COPY -> DUPLEX", log, re.MULTILINE)
    if not begins or not ends or ends[-1] < begins[-1]:
        return None

    def seconds(text: str) -> float:
        t = time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")
        return time.mktime(t) + int(text[20:]) / 1000

    return seconds(ends[-1]) - seconds(begins[-1])


def stat_number(text: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}: ([\d,.]+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"rsync --stats output has no {label!r}:\n{text}")
    return int(match.group(1).replace(",", "").replace(".", ""))


async def bench(args: argparse.Namespace, base: Path) -> int:
    size = parse_size(args.size)
    fill = parse_size(args.fill)
    tracks = size // TRACK
    changed = max(1, round(tracks * args.changed / 100))
    rng = random.Random(args.seed)
    primary = Site("primary", 1001, base)
    secondary = Site("secondary", 2001, base)
    primary.peer_with(secondary)
    proxies = ProxyPair(primary, secondary) if args.proxy else None
    rsyncd: subprocess.Popen[bytes] | None = None
    try:
        secondary.start()
        primary.start()
        print(f"volume {format_size(size)} ({tracks} tracks of {TRACK // 1024} KiB), "
              f"{format_size(fill)} of random data spread over it", flush=True)
        started = time.monotonic()
        async with Client(primary.address) as c:
            await c.create_volume(PVOL, size, TRACK)
            pieces = fill // MiB
            stride = size // pieces // TRACK * TRACK
            await bounded([(i * stride, rng.randbytes(MiB)) for i in range(pieces)], c, PVOL, 4)
            await c.create_pair(PAIR, PVOL, SVOL, peer=secondary.system_id, mode="sync")
            await c.wait_pair(PAIR, timeout=1800, interval=0.1)
            print(f"filled and mirrored (initial copy) in {time.monotonic() - started:.1f}s", flush=True)
            await c.split_pair(PAIR)
        spvol = secondary.data_dir / "volumes" / f"{SVOL}.vol"
        pvol = primary.data_dir / "volumes" / f"{PVOL}.vol"
        target_dir = base / "rsync-target"
        target_dir.mkdir()
        target = target_dir / f"{PVOL}.img"
        await asyncio.to_thread(subprocess.run, ["cp", "--sparse=always", str(spvol), str(target)], check=True)

        chosen = sorted(rng.sample(range(tracks), changed))
        async with Client(primary.address) as c:
            await bounded([(t * TRACK, rng.randbytes(TRACK)) for t in chosen], c, PVOL, 16)
            await c.flush(PVOL)
            pending = (await c.display_pairs(PAIR))[0].pending_tracks
        changed_bytes = changed * TRACK
        print(f"changed {changed} tracks ({args.changed:g}%, {format_size(changed_bytes)}) on the PVOL; "
              f"{pending} tracks pending", flush=True)

        # splitmirror: the CLI, as an operator runs it.
        bytes0, tracks0 = await resync_stats(primary)
        wire0 = sum(p.bytes_forwarded for p in proxies) if proxies else 0
        cli_start = time.monotonic()
        await asyncio.to_thread(primary.cli, "pair", "resync", PAIR, "--wait", "--timeout", "1800")
        resync_seconds = time.monotonic() - cli_start
        bytes1, tracks1 = await resync_stats(primary)
        wire = sum(p.bytes_forwarded for p in proxies) - wire0 if proxies else 0
        resync_bytes, resync_tracks = bytes1 - bytes0, tracks1 - tracks0
        copy_seconds = copy_seconds_from_log(primary.log())
        cli_start = time.monotonic()
        await asyncio.to_thread(primary.cli, "pair", "display", PAIR)
        cli_overhead = time.monotonic() - cli_start
        async with Client(primary.address) as pc, Client(secondary.address) as sc:
            identical = await pc.checksum(PVOL) == await sc.checksum(SVOL)

        # rsync: delta transfer of the changed image onto the stale copy.
        rsyncd, port = start_rsyncd(base, target_dir)
        rsync_start = time.monotonic()
        result = await asyncio.to_thread(
            subprocess.run, ["rsync", "--inplace", "--no-whole-file", "--stats", str(pvol),
                             f"rsync://127.0.0.1:{port}/vol/{target.name}"],
            capture_output=True, text=True, check=True)
        rsync_seconds = time.monotonic() - rsync_start
        rsync_sent = stat_number(result.stdout, "Total bytes sent")
        rsync_received = stat_number(result.stdout, "Total bytes received")
        rsync_literal = stat_number(result.stdout, "Literal data")
        rsync_ok = await asyncio.to_thread(file_digest, target) == await asyncio.to_thread(file_digest, pvol)
    finally:
        if rsyncd is not None:
            rsyncd.terminate()
            rsyncd.wait()
        primary.kill()
        secondary.kill()
        if proxies:
            proxies.close()

    print()
    print(f"{'':<22} {'seconds':>9} {'bytes sent':>14} {'x changed':>10}  result")
    verdict = "identical" if identical else "DIFFERENT"
    print(f"{'splitmirror resync':<22} {resync_seconds:>9.2f} {resync_bytes:>14,} "
          f"{resync_bytes / changed_bytes:>10.3f}  {verdict} ({resync_tracks} tracks)")
    if proxies:
        print(f"{'  on the wire':<22} {'':>9} {wire:>14,} {wire / changed_bytes:>10.3f}  (both directions, via proxy)")
    print(f"{'rsync --inplace':<22} {rsync_seconds:>9.2f} {rsync_sent:>14,} {rsync_sent / changed_bytes:>10.3f}  "
          f"{'identical' if rsync_ok else 'DIFFERENT'} (received {rsync_received:,}, literal {rsync_literal:,})")
    daemon = f"; the daemon's log shows {copy_seconds:.2f}s from resync start to DUPLEX" if copy_seconds else ""
    print(f"(the resync time includes ~{cli_overhead:.2f}s of CLI start-up and up to 0.2s of --wait polling{daemon})")
    speed = rsync_seconds / resync_seconds
    ratio = resync_bytes / changed_bytes
    print(f"speed: resync {speed:.1f}x faster than rsync (target >= {SPEED_TARGET:g}x): "
          f"{'PASS' if speed >= SPEED_TARGET else 'MISS'}")
    print(f"bytes sent / changed bytes = {ratio:.3f} (target <= {BYTES_TARGET}): "
          f"{'PASS' if ratio <= BYTES_TARGET and identical else 'MISS'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", default="4G", help="volume size (default 4G)")
    parser.add_argument("--fill", default="1G", help="random data written before the pair is created (default 1G)")
    parser.add_argument("--changed", type=float, default=1.0, help="percent of tracks changed (default 1)")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--no-proxy", dest="proxy", action="store_false",
                        help="connect the daemons directly (no wire byte count)")
    parser.add_argument("--dir", help="work directory (default: a temporary directory, removed after)")
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        print("rsync is not installed; nothing to compare with", file=sys.stderr)
        return 0
    if args.dir:
        return asyncio.run(bench(args, Path(args.dir)))
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-resync-") as tmp:
        return asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
