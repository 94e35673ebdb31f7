#!/opt/splitmirror/bin/python
"""``splitmirror-fs``: ext4 filesystems on NBD exports, for the compose demo and tests.

    splitmirror-fs sample-tree DIR [--seed N]         a small tree of files (seeded contents)
    splitmirror-fs mkfs URL --tree DIR --size SIZE     mke2fs -d DIR into an image, nbdcopy it to URL
    splitmirror-fs run URL [--rw] -- COMMAND...        mount URL's filesystem, run COMMAND in its root

``run`` mounts with the restore agent's own code (``client.agent``:
``nbdfuse`` + ``fuse2fs``, no kernel module, ``/dev/fuse`` only) and always
unmounts again, also when COMMAND fails; its exit code is COMMAND's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from client.agent import AgentError, mounted_filesystem

SAMPLE = {
    "etc/app.conf": lambda rng: b"threads = 8\nlisten = 0.0.0.0:8080\n",
    "etc/users.db": lambda rng: b"".join(b"user%04d:%08x\n" % (i, rng.getrandbits(32)) for i in range(2000)),
    "data/blob.bin": lambda rng: rng.randbytes(3 << 20),
    "data/small.bin": lambda rng: rng.randbytes(12345),
    "docs/README.txt": lambda rng: b"splitmirror compose demo\n" * 40,
}


def sample_tree(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    for rel, make in SAMPLE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make(rng))
        print(f"{rel}: {path.stat().st_size} bytes")


def tool(*argv: str) -> None:
    print("+ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def mkfs(url: str, tree: Path, size: str) -> None:
    with tempfile.TemporaryDirectory(prefix="splitmirror-fs-") as tmp:
        image = Path(tmp) / "fs.img"
        tool("mke2fs", "-F", "-q", "-t", "ext4", "-d", str(tree), str(image), size)
        # The volume is new, hence all zeroes: only the filesystem's blocks cross.
        tool("nbdcopy", "--destination-is-zero", "--flush", str(image), url)


async def run_in(url: str, writable: bool, command: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="splitmirror-fs-") as tmp:
        async with mounted_filesystem(url, writable=writable, workdir=Path(tmp)) as root:
            proc = await asyncio.create_subprocess_exec(*command, cwd=root,
                                                        env=dict(os.environ, SPLITMIRROR_FS_ROOT=str(root)))
            return await proc.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="splitmirror-fs", description=__doc__.split("\n\n")[0])
    cmds = parser.add_subparsers(dest="cmd", required=True)
    p = cmds.add_parser("sample-tree")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=1)
    p = cmds.add_parser("mkfs")
    p.add_argument("url")
    p.add_argument("--tree", type=Path, required=True)
    p.add_argument("--size", required=True)
    p = cmds.add_parser("run")
    p.add_argument("url")
    p.add_argument("--rw", action="store_true", help="mount read-write (default read-only)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "sample-tree":
            sample_tree(args.dir, args.seed)
        elif args.cmd == "mkfs":
            mkfs(args.url, args.tree, args.size)
        else:
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                parser.error("run: no COMMAND given")
            if shutil.which(command[0]) is None:
                parser.error(f"run: {command[0]}: command not found")
            return asyncio.run(run_in(args.url, args.rw, command))
    except AgentError as exc:
        print(f"splitmirror-fs: error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"splitmirror-fs: error: {exc.cmd[0]} exited with {exc.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
