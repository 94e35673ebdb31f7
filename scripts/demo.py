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


WRITER = """
import asyncio, os, random, sys
from client import Client
async def main():
    async with Client(sys.argv[1]) as c:
        rng = random.Random(1)
        while True:
            await c.write("db", rng.randrange(2048) * 8192, os.urandom(8192))
asyncio.run(main())
"""


def restore_demo(primary: Site, secondary: Site, base: Path) -> None:
    step("an ext4 filesystem on a new mirrored volume, and a backup of it")
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "app.conf").write_text("threads = 8\n")
    (tree / "data.bin").write_bytes(os.urandom(4 << 20))
    image = base / "fs.img"
    tool("mke2fs", "-F", "-q", "-t", "ext4", "-d", str(tree), str(image), "128M")
    run(primary, "volume", "create", "fs", "--size", "128M")
    tool("nbdcopy", "--flush", str(image), f"nbd://127.0.0.1:{primary.nbd_port}/fs")
    run(primary, "pair", "create", "fs-mirror", "--pvol", "fs", "--svol", "fs-r", "--peer", "2001", "--wait")
    for i in (1, 2):
        run(secondary, "pair", "create", f"fs-gen{i}", "--pvol", "fs-r", "--svol", f"fs-svol{i}", "--wait")
    run(primary, "backup", "fs-mirror", "--wait")

    step("damage a file on the primary (through an NBD + FUSE mount)")
    import asyncio

    from client.agent import mounted_filesystem

    async def damage() -> None:
        async with mounted_filesystem(f"nbd://127.0.0.1:{primary.nbd_port}/fs", writable=True,
                                      workdir=base / "damage") as root:
            (root / "etc" / "app.conf").write_text("threads = oops\n")
            print("etc/app.conf now reads:", (root / "etc" / "app.conf").read_text().strip())

    asyncio.run(damage())

    step("restore it from the generation, at the secondary (host B)")
    run(secondary, "restore", "files", "fs-mirror", "--generation", "fs-gen1", "/etc/app.conf", "--yes")

    async def check() -> None:
        async with mounted_filesystem(f"nbd://127.0.0.1:{primary.nbd_port}/fs", writable=False,
                                      workdir=base / "check") as root:
            print("etc/app.conf reads again:", (root / "etc" / "app.conf").read_text().strip())

    asyncio.run(check())


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

        step("backup generations at the secondary: local pairs from the SPVOL")
        for i in (1, 2, 3):
            run(secondary, "pair", "create", f"db-gen{i}", "--pvol", "db-r", "--svol", f"db-svol{i}", "--wait")

        step("a backup taken while a writer runs: the remote pair stays DUPLEX")
        writer = subprocess.Popen([sys.executable, "-c", WRITER, primary.address], stdout=subprocess.DEVNULL)
        try:
            time.sleep(1)
            for _ in range(2):
                run(primary, "backup", "db-mirror", "--wait")
        finally:
            writer.terminate()
            writer.wait()
        run(primary, "pair", "display", "db-mirror")
        run(primary, "backups", "db-mirror")

        if shutil.which("mke2fs") and Path("/dev/fuse").exists() and shutil.which("nbdfuse"):
            restore_demo(primary, secondary, base)

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
