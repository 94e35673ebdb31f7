"""backup check: fsck and a probe on a copy-on-write overlay of a real ext4 generation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client
from splitmirror.testing import Site, wait_for

MiB = 1 << 20
SIZE = 32 * MiB
CHUNK = 1 * MiB

TOOLS = ("nbdkit", "nbdfuse", "mkfs.ext4", "e2fsck", "losetup", "debugfs")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS) or not Path("/dev/fuse").exists(),
                                reason="needs nbdkit, nbdfuse, e2fsprogs, loop devices and FUSE")


def ext4_image(tmp: Path) -> Path:
    """A 32 MiB ext4 with a few files, made without mounting anything."""
    root = tmp / "root"
    (root / "data").mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    for i in range(20):
        (root / "data" / f"f{i}").write_bytes(bytes([i]) * 20000)
    image = tmp / "fs.img"
    subprocess.run(["truncate", "-s", str(SIZE), str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    "-d", str(root), str(image)], check=True)
    return image


async def write_image(c: Client, volume: str, data: bytes) -> None:
    for off in range(0, len(data), CHUNK):
        chunk = data[off:off + CHUNK]
        if chunk.count(0) != len(chunk):
            await c.write(volume, off, chunk)
    await c.flush(volume)


def svol_file(site: Site, svol: str) -> Path:
    return site.data_dir / "volumes" / f"{svol}.vol"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def check_sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path, metrics=True)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    primary.kill()
    secondary.kill()


async def take_backups(primary: Site, secondary: Site, image: bytes) -> list[str]:
    async with Client(primary.address) as c:
        await c.create_volume("fs", SIZE)
        await c.create_pair("p", "fs", "fs-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        for i in (1, 2, 3):
            secondary.cli("pair", "create", f"g{i}", "--pvol", "fs-r", "--svol", f"s{i}", "--wait")
        await write_image(c, "fs", image)
        return [(await c.backup("p", generation=g, wait=True)).backups[0].svol for g in ("g1", "g2")]


async def check_events(secondary: Site) -> list[tuple[str, str]]:
    async with Client(secondary.address) as s:
        return [(e.generation, e.op) async for e in s.events() if e.kind == "backup" and e.op.startswith("check")]


def test_check_passes_fails_on_corruption_and_never_writes(check_sites: tuple[Site, Site], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    primary, secondary = check_sites
    image = ext4_image(tmp_path)
    svol1, svol2 = asyncio.run(take_backups(primary, secondary, image.read_bytes()))

    # A sound generation passes: fsck clean, the probe reads a file and writes one (into the overlay).
    before = sha(svol_file(secondary, svol1))
    probe = 'test "$(cat hello.txt)" = hello && ls data | wc -l && touch written-by-probe && echo probe-ok'
    report = secondary.cli_json("backup", "check", "g1", "--probe", probe)
    assert report["verdict"] == "passed", report
    assert "probe-ok" in report["output"] and "20" in report["output"]
    assert sha(svol_file(secondary, svol1)) == before
    listing = {g["local_pair"]: g for g in secondary.cli_json("backups", "p")}
    assert listing["g1"]["check"]["verdict"] == "passed" and listing["g2"]["check"] is None
    # The primary shows it too.
    assert {g["local_pair"]: g for g in primary.cli_json("backups", "p")}["g1"]["check"]["verdict"] == "passed"

    # Progress: the check's steps as lines on stderr (not a terminal), as objects with --json.
    monkeypatch.setenv("SPLITMIRROR_PROGRESS_INTERVAL", "0")
    lines = secondary.cli("backup", "check", "g1", "--probe", "sleep 1").stderr.splitlines()
    assert "pair g1: check: running the probe -" in lines, lines
    objects = [json.loads(line) for line in
               secondary.cli("--json", "backup", "check", "g1", "--probe", "sleep 1").stderr.splitlines()]
    assert {"pair": "g1", "progress": None, "rate_bytes_per_s": 0.0, "eta_seconds": 0.0,
            "activity": "check: running the probe"} in objects, objects

    # A probe that fails fails the check.
    bad_probe = secondary.cli("backup", "check", "g1", "--probe", "test -e no-such-file", check=False)
    assert bad_probe.returncode == 1
    assert "generation g1 failed its check: probe exited with 1" in bad_probe.stderr

    # Flip bytes of g2's SVOL at rest, in the root directory's inode: fsck fails and says so.
    secondary.stop()
    svol = svol_file(secondary, svol2)
    stats = subprocess.run(["debugfs", "-R", "imap <2>", str(svol)], capture_output=True, text=True, check=True)
    found = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", stats.stdout)
    assert found is not None, stats.stdout
    block, offset = int(found[1]), int(found[2], 16)
    with open(svol, "r+b") as fh:
        fh.seek(block * 4096 + offset)
        fh.write(b"\xa5" * 128)
    secondary.start()
    corrupted = sha(svol)
    failed = secondary.cli("backup", "check", "g2", check=False)
    assert failed.returncode == 1, failed.stdout
    assert ("generation g2 failed its check: e2fsck found errors in the file system (exit status 12): SVOL s2: "
            "********** WARNING: Filesystem still has errors **********") in failed.stderr
    assert sha(svol) == corrupted  # byte-identical before and after
    listing = {g["local_pair"]: g for g in secondary.cli_json("backups", "p")}
    assert listing["g2"]["check"]["verdict"] == "failed" and "e2fsck" in listing["g2"]["check"]["reason"]
    ops = asyncio.run(check_events(secondary))
    assert ops[-1] == ("g2", "check-failed")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{secondary.metrics_port}/metrics", timeout=10).read().decode()
    assert 'splitmirror_backup_check_passed{generation="g2",pair="p"} 0.0' in metrics
    assert 'splitmirror_backup_check_passed{generation="g1",pair="p"} 1.0' not in metrics  # g1's newest failed
    assert "splitmirror_backup_check_failures_total 1.0" in metrics

    # A schedule with --check checks each new backup (at the secondary, asked by the primary).
    primary.cli("backup", "schedule", "set", "p", "--every", "3s", "--generations", "g3", "--check", "--probe",
                "test -s hello.txt")
    def checked() -> bool:
        return "passed" in primary.cli_json("backup", "schedule", "list")[0]["last_check"]

    wait_for(checked, 60, 0.5, "a scheduled check")
    sched = primary.cli_json("backup", "schedule", "list")[0]
    assert sched["last_check"].startswith("g3 passed"), sched
    primary.cli("backup", "schedule", "delete", "p")
    started = time.monotonic()
    listing = {g["local_pair"]: g for g in secondary.cli_json("backups", "p")}
    assert listing["g3"]["check"]["verdict"] == "passed"
    assert time.monotonic() - started < 30
