"""End-to-end demo on loopback: two daemons, a sync remote pair, NBD, resync.

Each step prints the command it runs and what came back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splitmirror.testing import Site, wait_status


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(site: Site, *args: str) -> str:
    print(f"$ splitmirror --server {site.address} {' '.join(args)}", flush=True)
    out = site.cli(*args).stdout
    print(out.rstrip(), flush=True)
    return out


def tool(*argv: str) -> str:
    print(f"$ {' '.join(argv)}", flush=True)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    print((result.stdout + result.stderr).rstrip(), flush=True)
    if result.returncode:
        raise SystemExit(f"demo failed: {argv[0]} exited with {result.returncode}")
    return result.stdout


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="splitmirror-demo-"))
    primary = Site("primary", 1001, base, nbd=True)
    secondary = Site("secondary", 2001, base, nbd=True)
    primary.peer_with(secondary)
    try:
        step("start secondaryd (site B) and primaryd (site A) on loopback")
        print(f"secondaryd ready in {secondary.start():.2f}s, primaryd ready in {primary.start():.2f}s")

        step("create a 256 MiB production volume and put some data on it")
        run(primary, "volume", "create", "db", "--size", "256M")
        data = base / "seed.bin"
        data.write_bytes(os.urandom(8 << 20))
        run(primary, "write", "db", "--offset", "0", "--file", str(data))

        step("create a sync remote pair; the initial copy moves only allocated tracks")
        run(primary, "pair", "create", "db-mirror", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
        run(primary, "pair", "display")
        run(secondary, "pair", "display")

        if shutil.which("qemu-io"):
            step("a real tool writes through NBD; the write arrives on the secondary")
            url = f"nbd://127.0.0.1:{primary.nbd_port}/db"
            tool("qemu-io", "-f", "raw", "-c", "write -P 0xab 16M 4M", url)
            tool("qemu-io", "-r", "-f", "raw", "-c", "read -P 0xab 16M 4M", f"nbd://127.0.0.1:{secondary.nbd_port}/db-r")
        a = run(primary, "checksum", "db")
        b = run(secondary, "checksum", "db-r")
        print("PVOL and SPVOL identical:", a.split()[-1] == b.split()[-1])

        step("split: the SPVOL becomes writable at the secondary, both ends track writes")
        run(primary, "pair", "split", "db-mirror")
        run(primary, "write", "db", "--offset", "64M", "--file", str(data))
        small = base / "small.bin"
        small.write_bytes(os.urandom(64 << 10))
        run(secondary, "write", "db-r", "--offset", "128M", "--file", str(small))
        run(primary, "pair", "display", "db-mirror")
        run(secondary, "pair", "display", "db-mirror")

        step("resync: only the OR of both pending bitmaps crosses the interconnect")
        before = primary.cli_json("stats")["pairs"][0]["resync_bytes_sent"]
        run(primary, "pair", "resync", "db-mirror", "--wait")
        wait_status(secondary, "db-mirror", ["DUPLEX"])
        sent = primary.cli_json("stats")["pairs"][0]["resync_bytes_sent"] - before
        print(f"resync sent {sent / 2**20:.2f} MiB for a 256 MiB volume")
        a = run(primary, "checksum", "db")
        b = run(secondary, "checksum", "db-r")
        print("PVOL and SPVOL identical:", a.split()[-1] == b.split()[-1])

        step("restart both daemons: the pair comes back DUPLEX by itself")
        primary.stop()
        secondary.stop()
        secondary.start()
        primary.start()
        time.sleep(0.5)
        wait_status(primary, "db-mirror", ["DUPLEX"])
        run(primary, "pair", "display")
    finally:
        primary.stop()
        secondary.stop()
    step(f"done (logs and data in {base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
