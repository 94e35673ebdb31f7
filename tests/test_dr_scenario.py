"""The disaster-recovery scenario of issue 18, end to end on loopback with real tools.

ext4 on the PVOL; ``kill -9`` of primaryd (site A lost); takeover at site B;
the filesystem changed at B over NBD (nbdfuse + debugfs); A restarted:
fenced, NBD writes refused; resync B->A copies only the changed tracks and
keeps A's divergent ones in a readable volume; swap back; verify finds no
mismatch and ``e2fsck -fn`` is clean on both ends.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.testing import Site, wait_for, wait_status
from tests.test_nbd_integration import _make_tree, _unmount, _wait_mounted, assert_ok, qemu_io, run, uri

MiB = 1 << 20
TRACK = 8192
SIZE = 64 * MiB
TOOLS = ("nbdfuse", "nbdcopy", "qemu-io", "mke2fs", "e2fsck", "debugfs", "fusermount3")

pytestmark = [
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason=f"tools missing: {[t for t in TOOLS if shutil.which(t) is None]}"),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="/dev/fuse is missing: cannot run nbdfuse"),
]


@pytest.fixture
def nbd_sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    a = Site("primary", 1001, tmp_path, link_timeout=1.0, nbd=True)
    b = Site("secondary", 2001, tmp_path, link_timeout=1.0, nbd=True)
    a.peer_with(b)
    b.start()
    a.start()
    yield a, b
    for site in (a, b):
        site.kill()
    for site in (a, b):
        assert "Traceback" not in site.log(), f"{site.role}d logged a traceback:\n{site.log()}"


def debugfs_on_export(site: Site, export: str, mnt: Path, *requests: str) -> None:
    """Change the filesystem of ``export`` in place over NBD (nbdfuse exposes it as a file)."""
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(["nbdfuse", f"{mnt}/", uri(site, export)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_mounted(mnt, proc, "nbdfuse")
        for request in requests:
            result = run("debugfs", "-w", "-R", request, str(mnt / "nbd"))
            assert result.returncode == 0 and "rror" not in result.stderr, result.stderr
    finally:
        _unmount(mnt, proc)


def fsck_export(site: Site, export: str, tmp_path: Path) -> Path:
    image = tmp_path / f"{site.role}-{export}.img"
    assert_ok(run("nbdcopy", uri(site, export), str(image)))
    fsck = run("e2fsck", "-fn", str(image))
    assert fsck.returncode == 0, f"e2fsck of {export} at {site.role}: {fsck.stdout}{fsck.stderr}"
    return image


def test_takeover_resync_and_swap_back_with_ext4(nbd_sites: tuple[Site, Site], tmp_path: Path) -> None:
    a, b = nbd_sites
    tree, image = tmp_path / "tree", tmp_path / "fs.img"
    tree.mkdir()
    _make_tree(tree)
    assert_ok(run("mke2fs", "-F", "-q", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                  "-d", str(tree), str(image), "64M"))
    a.cli("volume", "create", "fs", "--size", "64M")
    a.cli("pair", "create", "fs-p", "--pvol", "fs", "--svol", "fs-r", "--peer", "2001", "--wait")
    assert_ok(run("nbdcopy", "--flush", str(image), uri(a, "fs")))

    # Site A is lost.
    a.kill()
    wait_status(b, "fs-p", ["SUSPENDED"])
    # A link drop alone never makes the SPVOL writable.
    still = qemu_io(uri(b, "fs-r"), "write -P 0x11 0 4k")
    assert still.returncode != 0 or "failed" in still.stdout + still.stderr, still.stdout
    b.cli("pair", "takeover", "fs-p")
    assert b.pair_row("fs-p")["primary"] is True

    # Hosts at B change the filesystem over NBD.
    note = tmp_path / "note.txt"
    note.write_text("written at site B after the takeover\n" * 100)
    debugfs_on_export(b, "fs-r", tmp_path / "mnt-b", "mkdir /site-b", f"write {note} /site-b/note.txt")
    changed_b = b.pair_row("fs-p")["pending_tracks"]
    assert 0 < changed_b < 64, changed_b

    # A comes back: fenced before serving a write; NBD writes refused, reads allowed.
    a.start()
    row = wait_for(lambda: (r := a.pair_row("fs-p")).get("fenced_by") == 2001 and r, 20, 0.2, "A to fence itself")
    assert row["primary"] is False and row["status"] == "SUSPENDED", row
    refused = qemu_io(uri(a, "fs"), "write -P 0x22 0 4k")
    assert refused.returncode != 0 or "failed" in refused.stdout + refused.stderr, refused.stdout
    assert_ok(qemu_io(uri(a, "fs"), "read 0 64k", read_only=True))
    divergent_a = row["pending_tracks"]  # write-intent extents hot at the kill: maybe divergent

    # Coming home: resync from B copies only the tracks changed on either side.
    b.cli("pair", "resync", "fs-p", "--wait")
    sent = b.cli_json("stats")["pairs"][0]["resync_tracks_sent"]
    assert changed_b <= sent <= changed_b + divergent_a, (sent, changed_b, divergent_a)
    assert sent < SIZE // TRACK // 2, f"{sent} tracks copied: close to a full copy"
    row = wait_status(a, "fs-p", ["DUPLEX"])
    if divergent_a:
        saved = row["divergent_volume"]
        assert saved in {v["name"] for v in a.cli_json("volume", "list")}, saved
        assert_ok(run("nbdcopy", uri(a, saved), str(tmp_path / "divergent.img")))

    # Swap back: A is primary again, no data copied.
    a.cli("pair", "swap", "fs-p")
    assert a.pair_row("fs-p")["primary"] is True and b.pair_row("fs-p")["primary"] is False
    assert b.cli_json("stats")["pairs"][0]["resync_tracks_sent"] == sent
    report = a.cli_json("verify", "fs-p")
    assert report["mismatches"] == [], report

    for site, export in ((a, "fs"), (b, "fs-r")):
        img = fsck_export(site, export, tmp_path)
        cat = run("debugfs", "-R", "cat /site-b/note.txt", str(img))
        assert cat.stdout == note.read_text(), f"{site.role}: {cat.stderr}"
    print(f"tracks changed at B {changed_b}, pending at A {divergent_a}, copied {sent} of {SIZE // TRACK}")
