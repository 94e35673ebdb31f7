"""Restores end to end on loopback with real ext4, NBD and FUSE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client, ClientError
from client.agent import fuse_problem, mounted_filesystem
from client.agent.kernel import kernel_mount_problem
from splitmirror.testing import Site, wait_status

MiB = 1 << 20
TRACK = 8192
FS_SIZE = 64 * MiB

needs_fuse = pytest.mark.skipif(fuse_problem() is not None, reason=f"cannot mount: {fuse_problem()}")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.fixture
def restore_sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    primary = Site("primary", 1001, tmp_path, nbd=True)
    secondary = Site("secondary", 2001, tmp_path, nbd=True)
    hooks = tmp_path / "hooks.log"
    primary.extra_args = ["--pre-restore-hook", f"echo pre $SPLITMIRROR_PAIR $SPLITMIRROR_VOLUME >> {hooks}",
                          "--post-restore-hook", f"echo post $SPLITMIRROR_PAIR >> {hooks}"]
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    primary.kill()
    secondary.kill()


def nbd(site: Site, export: str) -> str:
    return f"nbd://127.0.0.1:{site.nbd_port}/{export}"


async def setup_fs_pair(primary: Site, secondary: Site, tmp: Path) -> dict[str, bytes]:
    """A PVOL with an ext4 filesystem in a DUPLEX sync pair, three generations."""
    tree = tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "data").mkdir()
    files = {"/etc/app.conf": b"setting = 1\n" * 100, "/data/table.db": os.urandom(3 * MiB),
             "/data/log.txt": b"line\n" * 5000}
    for path, content in files.items():
        (tree / path.lstrip("/")).write_bytes(content)
    os.chmod(tree / "etc/app.conf", 0o640)
    img = tmp / "fs.img"
    assert run("mke2fs", "-F", "-q", "-t", "ext4", "-d", str(tree), str(img), "64M").returncode == 0
    primary.cli("volume", "create", "db", "--size", "64M")
    assert run("nbdcopy", "--flush", str(img), nbd(primary, "db")).returncode == 0
    primary.cli("pair", "create", "p", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    for i in (1, 2, 3):
        secondary.cli("pair", "create", f"g{i}", "--pvol", "db-r", "--svol", f"db-s{i}", "--wait")
    return files


def fsck(site: Site, volume: str, tmp: Path) -> None:
    image = tmp / f"{volume}-check.img"
    assert run("nbdcopy", nbd(site, volume), str(image)).returncode == 0
    result = run("e2fsck", "-fn", str(image))
    assert result.returncode == 0, result.stdout + result.stderr
    image.unlink()


@needs_fuse
async def test_restore_files_copies_only_what_changed(restore_sites: tuple[Site, Site], tmp_path: Path) -> None:
    primary, secondary = restore_sites
    files = await setup_fs_pair(primary, secondary, tmp_path)
    async with Client(primary.address) as c, Client(secondary.address) as s:
        backup = (await c.backup("p", wait=True)).backups[0]
        assert backup.generation == "g1"
        # At the primary: modify one file, delete another, add a third.
        async with mounted_filesystem(nbd(primary, "db"), writable=True, workdir=tmp_path / "pmnt") as root:
            (root / "etc/app.conf").write_bytes(b"setting = 2 (broken)\n")
            (root / "data/table.db").unlink()
            (root / "data/new.txt").write_bytes(b"written after the backup\n")
        await c.flush("db")

        result = secondary.cli("--json", "restore", "files", "p", "--generation", "g1", "/etc/app.conf",
                               "/data/table.db", "--yes")
        report = json.loads(result.stdout)
        assert sorted(report["restored"]) == ["/data/table.db", "/etc/app.conf"]
        # Through the kernel (ext4 on a loop device over nbdfuse) where it may, fuse2fs otherwise.
        way = "kernel" if kernel_mount_problem() is None else "fuse2fs"
        assert report["mounted_by"] == {"backup": way, "target": way}, report
        restored_bytes = len(files["/etc/app.conf"]) + len(files["/data/table.db"])
        assert report["volume_size"] == FS_SIZE
        # Only what the copy wrote (plus filesystem metadata) crossed back.
        assert 0 < report["bytes_sent"] <= 2 * restored_bytes + 2 * MiB, report
        assert report["bytes_sent"] < FS_SIZE // 8

        assert (await c.display_pairs("p"))[0].status == "DUPLEX"
        wait_status(secondary, "p", ["DUPLEX"])
        assert await c.checksum("db") == await s.checksum("db-r")
        async with mounted_filesystem(nbd(primary, "db"), writable=False, workdir=tmp_path / "check") as root:
            assert (root / "etc/app.conf").read_bytes() == files["/etc/app.conf"]
            assert (root / "etc/app.conf").stat().st_mode & 0o777 == 0o640
            assert (root / "data/table.db").read_bytes() == files["/data/table.db"]
            assert (root / "data/new.txt").read_bytes() == b"written after the backup\n"  # untouched
            assert (root / "data/log.txt").read_bytes() == files["/data/log.txt"]
    fsck(primary, "db", tmp_path)
    fsck(secondary, "db-r", tmp_path)
    hooks = (tmp_path / "hooks.log").read_text().split("\n")
    assert hooks[:2] == ["pre p db", "post p"]


async def test_restore_volume_and_fencing(restore_sites: tuple[Site, Site], tmp_path: Path) -> None:
    primary, secondary = restore_sites
    async with Client(primary.address) as c, Client(secondary.address) as s:
        await c.create_volume("db", 16 * MiB)
        await c.write("db", 0, os.urandom(4 * MiB))
        await c.create_pair("p", "db", "db-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        for i in (1, 2):
            secondary.cli("pair", "create", f"g{i}", "--pvol", "db-r", "--svol", f"db-s{i}", "--wait")
        backup = (await c.backup("p", wait=True)).backups[0]
        image = await c.read("db", 0, 16 * MiB)
        await c.write("db", MiB, os.urandom(2 * MiB))
        await c.write("db", 10 * MiB, b"x" * TRACK)

        # Fencing: while a restore holds the PVOL, host I/O is refused.
        session = await s.begin_restore("p", backup.generation)
        assert session.spvol == "db-r" and session.svol == backup.svol
        with pytest.raises(ClientError) as err:
            await c.write("db", 0, b"nope")
        assert err.value.code == "FAILED_PRECONDITION" and "fenced for restore" in err.value.message
        nbd_write = run("qemu-io", "-f", "raw", "-c", "write 0 4k", nbd(primary, "db"))
        assert nbd_write.returncode != 0 or "fenced" in nbd_write.stdout + nbd_write.stderr
        row = (await c.display_pairs("p"))[0]
        assert row.status == "SPLIT" and "fenced" in row.reason
        # A second restore while one is pending: refused; abort undoes it.
        with pytest.raises(ClientError) as err:
            await s.begin_restore("p", "g2")
        assert err.value.code in ("FAILED_PRECONDITION", "NOT_FOUND")
        await s.abort_restore("p")
        await c.write("db", 12 * MiB, b"y" * TRACK)  # unfenced again
        wait_status(primary, "p", ["DUPLEX"])

        result = secondary.cli("--json", "restore", "volume", "p", "--generation", backup.generation, "--yes")
        report = json.loads(result.stdout)
        assert await c.read("db", 0, 16 * MiB) == image
        assert await c.checksum("db") == await s.checksum(backup.svol)
        assert await c.checksum("db") == await s.checksum("db-r")
        # Only the tracks changed since the backup moved, each way.
        changed = 2 * MiB // TRACK + 2
        assert report["tracks_sent"] <= changed + 8 and report["local_tracks"] <= changed + 8
        gens = {g.local_pair: g for g in await s.list_backups("p")}
        assert gens[backup.generation].status == "SPLIT"  # still holds its backup
        await c.write("db", 0, b"after")  # unfenced


async def test_restore_refusals_change_nothing(restore_sites: tuple[Site, Site], tmp_path: Path) -> None:
    primary, secondary = restore_sites
    async with Client(primary.address) as c, Client(secondary.address) as s:
        await c.create_volume("raw", 8 * MiB)
        await c.create_pair("p", "raw", "raw-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        secondary.cli("pair", "create", "g1", "--pvol", "raw-r", "--svol", "raw-s1", "--wait")
        secondary.cli("pair", "create", "g2", "--pvol", "raw-r", "--svol", "raw-s2", "--wait")
        for call, code, text in [
            (s.begin_restore("p", "nope"), "NOT_FOUND", "'nope'"),
            (s.begin_restore("p", "g2"), "FAILED_PRECONDITION", "holds no backup"),
            (c.begin_restore("p", "g1"), "FAILED_PRECONDITION", "secondary"),
        ]:
            with pytest.raises(ClientError) as err:
                await call
            assert err.value.code == code and text in err.value.message, err.value
        await c.backup("p", generation="g1", wait=True)
        if fuse_problem() is None:
            # No filesystem on the volume: a clear error, the PVOL not fenced.
            result = secondary.cli("restore", "files", "p", "--generation", "g1", "/etc/x", "--yes", check=False)
            assert result.returncode == 1 and "no ext2/3/4 filesystem" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
        await c.write("raw", 0, b"still writable")
        assert (await c.display_pairs("p"))[0].status == "DUPLEX"


@needs_fuse
async def test_restore_files_missing_path_is_refused(restore_sites: tuple[Site, Site], tmp_path: Path) -> None:
    primary, secondary = restore_sites
    await setup_fs_pair(primary, secondary, tmp_path)
    async with Client(primary.address) as c:
        await c.backup("p", wait=True)
        result = secondary.cli("restore", "files", "p", "--generation", "g1", "/etc/app.conf", "/no/such", "--yes",
                               check=False)
        assert result.returncode == 1 and "/no/such" in result.stderr and "nothing was changed" in result.stderr
        assert (await c.display_pairs("p"))[0].status == "DUPLEX"
        await c.write("db", 60 * MiB, b"not fenced")
    assert shutil.which("e2fsck")


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0x01]))


@needs_fuse
async def test_restore_files_checks_the_tracks_it_reads(restore_sites: tuple[Site, Site], tmp_path: Path) -> None:
    """A file restore checks each track it reads against the backup's receipt: a damaged track in a file
    it copies refuses the restore (one error naming generation, track and SVOL); one elsewhere does not."""
    primary, secondary = restore_sites
    files = await setup_fs_pair(primary, secondary, tmp_path)
    async with Client(primary.address) as c, Client(secondary.address) as s:
        await c.backup("p", generation="g1", wait=True)
        assert (await s.verify_backup("g1")).ok  # the receipt is taken
        async with mounted_filesystem(nbd(primary, "db"), writable=True, workdir=tmp_path / "pmnt") as root:
            (root / "etc/app.conf").write_bytes(b"setting = 2 (broken)\n")
            (root / "data/table.db").write_bytes(b"broken")
        await c.flush("db")
        before = await c.checksum("db")

        # One bit flipped at rest in the middle of /data/table.db in the backup.
        svol = secondary.data_dir / "volumes" / "db-s1.vol"
        flipped = 3 * MiB // 2 + 17  # offset in the file
        block = files["/data/table.db"][flipped - 17:flipped - 17 + 1024]
        damaged = svol.read_bytes().find(block) + 17
        assert damaged > 17
        flip_bit(svol, damaged)
        track = damaged // TRACK

        result = secondary.cli("restore", "files", "p", "--generation", "g1", "/data/table.db", "--yes",
                               check=False)
        assert result.returncode == 1, result.stderr
        assert (f"generation 'g1' (backup #1 of {(await s.list_backups('p'))[0].backup_time}) fails verification "
                f"against its receipt: track {track} of SVOL 'db-s1' differs") in result.stderr, result.stderr
        assert "the PVOL is unfenced and unchanged (--force restores it anyway)" in result.stderr
        assert "Traceback" not in result.stderr
        wait_status(primary, "p", ["DUPLEX"])
        assert await c.checksum("db") == before
        ops = [(e.op, e.generation) async for e in s.events() if e.kind == "backup"]
        assert ops[-1] == ("verify-failed", "g1")
        gen = (await s.list_backups("p"))[0]
        assert gen.read_refusals >= 1 and f"track {track} of SVOL 'db-s1'" in gen.read_refusal

        # The damaged track is not in /etc/app.conf: restoring that file works.
        secondary.cli("restore", "files", "p", "--generation", "g1", "/etc/app.conf", "--yes")
        wait_status(primary, "p", ["DUPLEX"])
        async with mounted_filesystem(nbd(primary, "db"), writable=False, workdir=tmp_path / "check") as root:
            assert (root / "etc/app.conf").read_bytes() == files["/etc/app.conf"]
            assert (root / "data/table.db").read_bytes() == b"broken"
        # The full check still finds the damaged track.
        full = await s.verify_backup("g1")
        assert not full.ok and list(full.tracks) == [track]

        # Forced, the damaged file is restored as the backup now holds it.
        secondary.cli("restore", "files", "p", "--generation", "g1", "/data/table.db", "--yes", "--force")
        wait_status(primary, "p", ["DUPLEX"])
        async with mounted_filesystem(nbd(primary, "db"), writable=False, workdir=tmp_path / "forced") as root:
            restored = (root / "data/table.db").read_bytes()
        original = files["/data/table.db"]
        assert restored[:flipped] == original[:flipped] and restored[flipped + 1:] == original[flipped + 1:]
        assert restored[flipped] == original[flipped] ^ 0x01
    fsck(primary, "db", tmp_path)
