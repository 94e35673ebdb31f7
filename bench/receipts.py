"""Backup receipts: the cost of an incremental receipt vs a full read, one run.

A 16 GiB volume (8 KiB tracks: 2 Mi tracks) gets a first, full receipt; then
0.1 % of its tracks (random, each written with random bytes through
``Volume.pwrite``, which marks them) change and the next receipt digests
only those.  Both go through ``splitmirror.procedures.receipts.update_digests``,
the function a secondaryd runs when a generation is split.  Then the same
volume is fully re-read (``backup verify``'s read) for comparison.

Each measurement starts with the volume's pages dropped from the page cache.
By default the volume is sparse apart from the changed tracks: its full
read reads holes (zero-filled, no disk I/O), the cheapest full read there
is, so the ratio printed is a lower bound.  ``--fill`` writes the whole
volume first (16 GiB of disk) for a full read of real data.

    .venv/bin/python bench/receipts.py [--size 16G] [--changed 0.001] [--fill]
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

from splitmirror.procedures.receipts import update_digests
from splitmirror.sizes import parse_size
from splitmirror.storage.bitmap import TrackBitmap
from splitmirror.storage.volume import Volume

TRACK = 8192


def drop_cache(vol: Volume) -> None:
    """Every measurement starts cold: the volume's pages leave the page cache."""
    fd = os.open(vol.path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def run(size: int, changed_fraction: float, fill: bool, workdir: Path) -> None:
    vol = Volume.create("bench-svol", workdir / "svol.vol", size, TRACK)
    digests = workdir / "svol.digests"
    rng = random.Random(19)
    try:
        if fill:
            started = time.monotonic()
            chunk = os.urandom(4 << 20)
            for off in range(0, size, len(chunk)):
                vol.pwrite(off, chunk)
            vol.fdatasync()
            print(f"filled {size >> 30} GiB in {time.monotonic() - started:.1f}s")

        drop_cache(vol)
        t0 = time.monotonic()
        full_tracks, root0 = await update_digests(vol, digests, None)
        first = time.monotonic() - t0
        vol.written = TrackBitmap(vol.tracks)

        n = max(1, round(vol.tracks * changed_fraction))
        picked = rng.sample(range(vol.tracks), n)
        for track in picked:
            vol.pwrite(track * TRACK, os.urandom(TRACK))
        vol.fdatasync()
        dirty = vol.written
        assert dirty is not None and len(dirty) == n

        drop_cache(vol)
        t0 = time.monotonic()
        changed, root1 = await update_digests(vol, digests, dirty)
        incremental = time.monotonic() - t0
        assert changed == n and root1 != root0

        drop_cache(vol)
        t0 = time.monotonic()
        await vol.verify_digests(0, vol.tracks)
        reread = time.monotonic() - t0

        print(f"volume {size / (1 << 30):g} GiB, {vol.tracks} tracks of {TRACK // 1024} KiB"
              f"{' (filled)' if fill else ' (sparse)'}; receipt file {digests.stat().st_size >> 20} MiB")
        print(f"first receipt (full read):       {full_tracks:>8} tracks  {first * 1000:9.1f} ms")
        print(f"next receipt ({changed_fraction:.1%} changed):    {changed:>8} tracks  {incremental * 1000:9.1f} ms")
        print(f"full re-read (backup verify):    {vol.tracks:>8} tracks  {reread * 1000:9.1f} ms")
        print(f"incremental / full read: {incremental / reread:.4f} ({reread / incremental:.0f}x cheaper)")
    finally:
        vol.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="16G")
    parser.add_argument("--changed", type=float, default=0.001, help="fraction of tracks changed (0.001 = 0.1 %%)")
    parser.add_argument("--fill", action="store_true", help="write the whole volume first (real data to read)")
    parser.add_argument("--dir", default=None, help="where the volume goes (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-receipts-") as tmp:
        asyncio.run(run(parse_size(args.size), args.changed, args.fill, Path(tmp)))


if __name__ == "__main__":
    main()
