"""Restore agent (client/agent.py): plan and copy between directories, and over real FUSE mounts."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.agent import AgentError, copy_plan, fuse_problem, mounted_filesystem, plan_copy
from client.agent.kernel import kernel_mount_problem
from splitmirror.testing import free_port

MTIME = 1_600_000_000_000_000_000  # ns
ATIME = 1_650_000_000_000_000_000


def _write(path: Path, data: bytes, *, mode: int = 0o644, owner: tuple[int, int] = (0, 0), mtime: int = MTIME) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)
    os.utime(path, ns=(ATIME, mtime))


def _build_backup(root: Path) -> None:
    """The SVOL filesystem (as it was at the backup)."""
    _write(root / "etc/app.conf", b"setting = original\n", mode=0o640, owner=(1234, 5678))
    _write(root / "data/dir/a.txt", b"A" * 5000, mode=0o600, owner=(1234, 5678), mtime=MTIME + 1)
    _write(root / "data/dir/sub/b.bin", bytes(range(256)) * 4096, mode=0o755)  # 1 MiB
    _write(root / "data/dir/sub/empty", b"")
    os.symlink("a.txt", root / "data/dir/link")
    os.lchown(root / "data/dir/link", 1234, 5678)
    _write(root / "keep.txt", b"backup version of a file nobody asked for\n")
    os.chown(root / "data/dir/sub", 1234, 5678)
    os.chmod(root / "data/dir/sub", 0o2750)
    os.utime(root / "data/dir/sub", ns=(ATIME, MTIME + 2))
    os.chmod(root / "data/dir", 0o711)
    os.utime(root / "data/dir", ns=(ATIME, MTIME + 3))


def _damage(root: Path) -> None:
    """The SPVOL filesystem now: one file modified, one deleted, one added, one unrelated change."""
    (root / "etc/app.conf").write_bytes(b"setting = broken by an operator, and longer than before\n")
    (root / "data/dir/a.txt").unlink()
    (root / "data/dir/sub/new.txt").write_bytes(b"created after the backup\n")
    (root / "keep.txt").write_bytes(b"changed after the backup, must stay\n")


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "svol", tmp_path / "spvol"
    src.mkdir()
    _build_backup(src)
    shutil.copytree(src, dst, symlinks=True)
    _damage(dst)
    return src, dst


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _assert_same(src: Path, dst: Path) -> None:
    s, d = os.lstat(src), os.lstat(dst)
    assert stat.S_IFMT(s.st_mode) == stat.S_IFMT(d.st_mode), dst
    assert stat.S_IMODE(s.st_mode) == stat.S_IMODE(d.st_mode), dst
    assert (s.st_uid, s.st_gid) == (d.st_uid, d.st_gid), dst
    assert s.st_mtime_ns == d.st_mtime_ns, dst
    if stat.S_ISREG(s.st_mode):
        assert src.read_bytes() == dst.read_bytes(), dst
    elif stat.S_ISLNK(s.st_mode):
        assert os.readlink(src) == os.readlink(dst)


# ----------------------------------------------------------------------------- plan


def test_plan_sizes_and_normalises(trees: tuple[Path, Path]) -> None:
    src, _ = trees
    plan = plan_copy(src, ["/etc//./app.conf", "/data/dir", "/data/dir/sub/b.bin"])
    assert plan.paths == ["/etc/app.conf", "/data/dir"]  # b.bin is inside /data/dir
    assert plan.missing == []
    assert not plan.whole_volume
    assert plan.files == 4
    assert plan.dirs == 2
    assert plan.symlinks == 1
    assert plan.total_bytes == len(b"setting = original\n") + 5000 + 1024 * 1024


def test_plan_reports_missing(trees: tuple[Path, Path]) -> None:
    src, _ = trees
    plan = plan_copy(src, ["/etc/app.conf", "/etc/nope.conf", "/keep.txt/below"])
    assert plan.missing == ["/etc/nope.conf", "/keep.txt/below"]
    assert plan.paths == ["/etc/app.conf"]


@pytest.mark.parametrize("path", ["/", "//", "/.", "/./"])
def test_plan_whole_volume(trees: tuple[Path, Path], path: str) -> None:
    src, _ = trees
    plan = plan_copy(src, ["/etc/app.conf", path])
    assert plan.whole_volume
    assert plan.paths == ["/"]


@pytest.mark.parametrize("path", ["/../etc/passwd", "/data/../../x", "/data/dir/..", "etc/app.conf", ""])
def test_plan_rejects_escapes_and_relative(trees: tuple[Path, Path], path: str) -> None:
    src, _ = trees
    with pytest.raises(AgentError):
        plan_copy(src, [path])


def test_plan_rejects_path_through_symlink(trees: tuple[Path, Path]) -> None:
    src, _ = trees
    os.symlink("/etc", src / "hostetc")
    with pytest.raises(AgentError, match="symlink"):
        plan_copy(src, ["/hostetc/passwd"])


# ----------------------------------------------------------------------------- copy


async def test_copy_restores_requested_paths_only(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    keep_before = os.lstat(dst / "keep.txt")
    conf_inode = os.lstat(dst / "etc/app.conf").st_ino
    plan = plan_copy(src, ["/etc/app.conf", "/data/dir"])
    calls: list[tuple[int, int]] = []
    src_atime = os.lstat(src / "data/dir/a.txt").st_atime_ns

    report = await copy_plan(plan, src, dst, lambda done, total: calls.append((done, total)))

    assert os.lstat(dst / "data/dir/a.txt").st_atime_ns == src_atime  # deleted file is back, with its times

    assert report.restored == ["/etc/app.conf", "/data/dir"]
    assert (report.files, report.dirs, report.symlinks) == (4, 2, 1)
    assert report.bytes == plan.total_bytes
    for rel in ["etc/app.conf", "data/dir", "data/dir/a.txt", "data/dir/sub", "data/dir/sub/b.bin", "data/dir/link"]:
        _assert_same(src / rel, dst / rel)
    st = os.lstat(dst / "etc/app.conf")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert st.st_ino == conf_inode  # rewritten in place
    assert stat.S_IMODE(os.lstat(dst / "data/dir/sub").st_mode) == 0o2750
    # Not requested / not in the backup: untouched.
    assert (dst / "keep.txt").read_bytes() == b"changed after the backup, must stay\n"
    assert os.lstat(dst / "keep.txt").st_mtime_ns == keep_before.st_mtime_ns
    assert (dst / "data/dir/sub/new.txt").exists()
    # Progress: monotonic, ends at the total.
    assert calls
    assert calls[-1] == (plan.total_bytes, plan.total_bytes)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


async def test_copy_writes_only_what_differs(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    plan = plan_copy(src, ["/data/dir/sub/b.bin"])
    report = await copy_plan(plan, src, dst, None)
    assert report.bytes == 1024 * 1024
    assert report.bytes_written == 0  # identical already
    _overwrite(dst / "data/dir/sub/b.bin", 100, b"damage")
    report = await copy_plan(plan, src, dst, None)
    assert report.bytes_written == 1024 * 1024  # one chunk
    _assert_same(src / "data/dir/sub/b.bin", dst / "data/dir/sub/b.bin")


async def test_copy_creates_missing_parents_like_backup(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    shutil.rmtree(dst / "data")
    report = await copy_plan(plan_copy(src, ["/data/dir/sub/b.bin"]), src, dst, None)
    assert report.created_parents == ["/data", "/data/dir", "/data/dir/sub"]
    for rel in ["data", "data/dir", "data/dir/sub", "data/dir/sub/b.bin"]:
        _assert_same(src / rel, dst / rel)
    assert not (dst / "data/dir/a.txt").exists()


async def test_copy_replaces_symlink_in_the_way_without_following_it(trees: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = trees
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"host file\n")
    (dst / "etc/app.conf").unlink()
    os.symlink(outside, dst / "etc/app.conf")
    await copy_plan(plan_copy(src, ["/etc/app.conf"]), src, dst, None)
    assert outside.read_bytes() == b"host file\n"
    _assert_same(src / "etc/app.conf", dst / "etc/app.conf")


async def test_copy_refuses_symlinked_destination_parent(trees: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = trees
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(dst / "data")
    os.symlink(outside, dst / "data")
    with pytest.raises(AgentError, match="/data is a symlink"):
        await copy_plan(plan_copy(src, ["/etc/app.conf", "/data/dir"]), src, dst, None)
    assert list(outside.iterdir()) == []
    assert (dst / "etc/app.conf").read_bytes().startswith(b"setting = broken")  # nothing copied


async def test_copy_refuses_plan_with_missing(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    plan = plan_copy(src, ["/etc/app.conf", "/etc/nope"])
    with pytest.raises(AgentError, match="/etc/nope"):
        await copy_plan(plan, src, dst, None)
    assert (dst / "etc/app.conf").read_bytes().startswith(b"setting = broken")


async def test_copy_keeps_hard_links(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    os.link(src / "data/dir/a.txt", src / "data/dir/sub/a-again")
    plan = plan_copy(src, ["/data/dir"])
    assert plan.total_bytes == 5000 + 1024 * 1024
    await copy_plan(plan, src, dst, None)
    a, again = os.lstat(dst / "data/dir/a.txt"), os.lstat(dst / "data/dir/sub/a-again")
    assert (a.st_dev, a.st_ino) == (again.st_dev, again.st_ino)


async def test_whole_volume_copy(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    plan = plan_copy(src, ["/"])
    report = await copy_plan(plan, src, dst, None)
    assert report.restored == ["/"]
    _assert_same(src / "keep.txt", dst / "keep.txt")
    _assert_same(src / "data/dir", dst / "data/dir")


# ----------------------------------------------------------------------------- FUSE

needs_fuse = pytest.mark.skipif(fuse_problem() is not None, reason=f"FUSE mounting unavailable: {fuse_problem()}")


def _serve(image: Path, *, writable: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port)]
    argv += [] if writable else ["-r"]
    proc = subprocess.Popen([*argv, "file", str(image)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"nbd://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path.resolve()) in line]


def _mkfs(tree: Path, image: Path) -> None:
    subprocess.run(["mke2fs", "-F", "-q", "-t", "ext4", "-d", str(tree), str(image), "32M"], check=True)


def _zero_image(image: Path, size: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size)


def _assert_fsck_clean(image: Path) -> None:
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def _debugfs(image: Path, request: str) -> bytes:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, check=True).stdout


def _fstype(path: Path) -> str:
    """The filesystem type mounted at ``path`` (from mountinfo)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == str(path):
            return fields[fields.index("-") + 1]
    return ""


@needs_fuse
@pytest.mark.parametrize("mode", ["kernel", "fuse"])
async def test_restore_between_ext4_images(
    tmp_path: Path, trees: tuple[Path, Path], servers: list[subprocess.Popen[bytes]], mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the kernel (a loop device over nbdfuse) where it may, else fuse2fs: the same result."""
    if mode == "fuse":
        monkeypatch.setenv("SPLITMIRROR_AGENT_MOUNT", "fuse")
    elif kernel_mount_problem() is not None:
        pytest.skip(f"no kernel mount here: {kernel_mount_problem()}")
    src_tree, dst_tree = trees
    img1, img2 = tmp_path / "svol.img", tmp_path / "spvol.img"
    _mkfs(src_tree, img1)
    _mkfs(dst_tree, img2)
    p1, url1 = _serve(img1, writable=False)
    p2, url2 = _serve(img2, writable=True)
    servers += [p1, p2]
    work = tmp_path / "work"
    work.mkdir()

    async with (
        mounted_filesystem(url1, writable=False, workdir=work) as svol,
        mounted_filesystem(url2, writable=True, workdir=work) as spvol,
    ):
        assert (svol / "etc/app.conf").read_bytes() == b"setting = original\n"
        expected = "ext4" if mode == "kernel" else "fuse"
        assert _fstype(svol).startswith(expected) and _fstype(spvol).startswith(expected), _fstype(svol)
        with pytest.raises(OSError):
            (svol / "etc/app.conf").write_bytes(b"x")  # read-only
        plan = plan_copy(svol, ["/etc/app.conf", "/data/dir", "/nope"])
        assert plan.missing == ["/nope"]
        plan = plan_copy(svol, ["/etc/app.conf", "/data/dir"])
        report = await copy_plan(plan, svol, spvol, None)
        assert report.files == 4
        for rel in ["etc/app.conf", "data/dir", "data/dir/a.txt", "data/dir/sub/b.bin", "data/dir/link"]:
            _assert_same(svol / rel, spvol / rel)
    assert _mounts_under(work) == []
    assert list(work.iterdir()) == []

    _assert_fsck_clean(img2)
    assert _debugfs(img2, "cat /etc/app.conf") == b"setting = original\n"
    assert _debugfs(img2, "cat /data/dir/a.txt") == b"A" * 5000
    assert _debugfs(img2, "cat /data/dir/sub/b.bin") == bytes(range(256)) * 4096
    assert _debugfs(img2, "cat /keep.txt") == b"changed after the backup, must stay\n"
    assert _debugfs(img2, "cat /data/dir/sub/new.txt") == b"created after the backup\n"
    conf = _debugfs(img2, "stat /etc/app.conf").decode()
    assert "User:  1234   Group:  5678" in conf
    assert "Mode:  0640" in conf

    # Leaving by an exception unmounts too.
    with pytest.raises(RuntimeError):
        async with mounted_filesystem(url2, writable=True, workdir=work) as spvol:
            assert (spvol / "etc/app.conf").exists()
            raise RuntimeError("boom")
    assert _mounts_under(work) == []


@needs_fuse
async def test_no_filesystem_raises_and_leaves_no_mount(tmp_path: Path, servers: list[subprocess.Popen[bytes]]) -> None:
    img = tmp_path / "zero.img"
    _zero_image(img, 8 << 20)
    proc, url = _serve(img, writable=False)
    servers.append(proc)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(AgentError, match=r"^no ext2/3/4 filesystem on nbd://127\.0\.0\.1:\d+: \S") as info:
        async with mounted_filesystem(url, writable=False, workdir=work):
            pytest.fail("mounted a volume with no filesystem")
    assert "\n" not in str(info.value)
    assert _mounts_under(work) == []
    assert list(work.iterdir()) == []


@needs_fuse
async def test_cancel_while_mounted_unmounts(
    tmp_path: Path, trees: tuple[Path, Path], servers: list[subprocess.Popen[bytes]]
) -> None:
    img = tmp_path / "svol.img"
    _mkfs(trees[0], img)
    proc, url = _serve(img, writable=False)
    servers.append(proc)
    work = tmp_path / "work"
    work.mkdir()
    mounted = asyncio.Event()

    async def hold() -> None:
        async with mounted_filesystem(url, writable=False, workdir=work):
            mounted.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await asyncio.wait_for(mounted.wait(), 30)
    assert _mounts_under(work)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _mounts_under(work) == []
