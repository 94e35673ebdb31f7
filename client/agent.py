"""Restore agent, local part (host B): mount NBD exports and copy files between them.

``splitmirror restore files`` attaches the SVOL (the backup generation,
read-only) and the SPVOL (read-write while its remote pair is split) over NBD,
mounts the ext2/3/4 filesystem of each with ``nbdfuse`` + ``fuse2fs`` (no
kernel module needed, only ``/dev/fuse``; with TLS, ``qemu-nbd`` presents the
client certificate), then copies the named paths from one to the other:

* :func:`fuse_problem` says why FUSE mounting cannot work on this host.
* :func:`mounted_filesystem` mounts one export and always unmounts it again.
* :func:`plan_copy` validates the requested paths against the backup before
  anything is written, and sizes the copy for progress reporting.
* :func:`copy_plan` performs the copy.

Only the paths named are written. An existing destination file is rewritten in
place and only the chunks that differ are written, so the tracks that later
cross the interconnect (resync PVOL from SPVOL) are close to what really changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "AgentError",
    "CopyPlan",
    "CopyReport",
    "copy_plan",
    "fuse_problem",
    "mounted_filesystem",
    "plan_copy",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Tools needed for FUSE mounting and the Debian package that ships each.
_TOOLS: tuple[tuple[str, str], ...] = (
    ("nbdfuse", "libnbd-bin (Debian 12) or nbdfuse (Debian 13+)"),
    ("fuse2fs", "fuse2fs"),
    ("fusermount3", "fuse3"),
)

_MOUNT_TIMEOUT = 30.0  # seconds for a FUSE daemon to mount
_EXIT_TIMEOUT = 30.0  # seconds for a FUSE daemon to exit after its unmount
_KILL_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05
_CHUNK = 1 << 20
_PROGRESS_INTERVAL = 0.1
_EXT_MAGIC_OFFSET = 1024 + 0x38  # s_magic in the primary superblock
_EXT_MAGIC = b"\x53\xef"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class AgentError(Exception):
    """A restore-agent failure, with a one-line message for the operator."""


# --------------------------------------------------------------------------- FUSE


def fuse_problem() -> str | None:
    """Why FUSE mounting cannot work on this host, or None when it can."""
    problems: list[str] = []
    if not os.path.exists("/dev/fuse"):
        problems.append("no /dev/fuse (load the fuse module, or give the container the device)")
    elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
        problems.append("/dev/fuse is not accessible (permission denied)")
    for tool, package in _TOOLS:
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (install the Debian package {package})")
    return "; ".join(problems) if problems else None


@contextlib.asynccontextmanager
async def mounted_filesystem(nbd_url: str, *, writable: bool, workdir: Path) -> AsyncIterator[Path]:
    """Mount the ext2/3/4 filesystem of the NBD export ``nbd_url``; yield its root.

    ``nbdfuse`` exposes the export as a file, ``fuse2fs`` mounts the filesystem
    in it. Both run as child processes in their own session (a Ctrl-C at the
    terminal must not kill them out of order). On exit, also on error or
    cancellation: sync, unmount fuse2fs, wait for it to exit (it writes back its
    cache as it exits), flush and unmount nbdfuse, wait for it too.

    A read-only mount of a filesystem whose journal needs recovery (a
    crash-consistent snapshot of a mounted volume) is retried without journal
    replay, with a warning logged.
    """
    problem = fuse_problem()
    if problem is not None:
        raise AgentError(f"cannot mount filesystems with FUSE here: {problem}")
    base = await asyncio.to_thread(_make_mount_dirs, workdir)
    mount = _Mount(nbd_url, writable, base)
    try:
        await mount.start()
        yield mount.fs_dir
    except BaseException:
        with contextlib.suppress(Exception):
            await _uncancelled(mount.stop(strict=False))
        raise
    await _uncancelled(mount.stop(strict=True))


def _make_mount_dirs(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="mount-", dir=workdir)).resolve()
    (base / "nbd").mkdir()
    (base / "fs").mkdir()
    return base


class _Mount:
    """The two FUSE daemons behind one mounted filesystem."""

    def __init__(self, url: str, writable: bool, base: Path) -> None:
        self.url = url
        self.writable = writable
        self.base = base
        self.nbd_dir = base / "nbd"
        self.fs_dir = base / "fs"
        self.device = self.nbd_dir / "nbd"
        self.nbdfuse: asyncio.subprocess.Process | None = None
        self.fuse2fs: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        argv = _nbdfuse_argv(self.url, self.writable, self.nbd_dir)
        self.nbdfuse = await _spawn(argv, self.base / "nbdfuse")
        if not await _wait_mounted(self.nbdfuse, self.nbd_dir, "nbdfuse"):
            raise AgentError(f"cannot attach {self.url}: {_first_line(self.base / 'nbdfuse', self.nbdfuse)}")

        options = "fakeroot,rw" if self.writable else "fakeroot,ro"
        if await self._start_fuse2fs(options):
            return
        why = _first_line(self.base / "fuse2fs", self.fuse2fs)
        if not await asyncio.to_thread(_has_ext_magic, self.device):
            raise AgentError(f"no ext2/3/4 filesystem on {self.url}: {why}")
        if not self.writable and "journal needs recovery" in why.lower():
            log.warning("%s: journal needs recovery; mounting read-only without replaying it", self.url)
            if await self._start_fuse2fs(options + ",norecovery"):
                return
            why = _first_line(self.base / "fuse2fs", self.fuse2fs)
        raise AgentError(f"cannot mount the filesystem on {self.url}: {why}")

    async def _start_fuse2fs(self, options: str) -> bool:
        argv = ["fuse2fs", str(self.device), str(self.fs_dir), "-f", "-o", options]
        self.fuse2fs = await _spawn(argv, self.base / "fuse2fs")
        return await _wait_mounted(self.fuse2fs, self.fs_dir, "fuse2fs")

    async def stop(self, *, strict: bool) -> None:
        """Unmount both layers, wait for both daemons; with ``strict``, raise if a mount is left."""
        if _is_mounted(self.fs_dir):
            if self.writable:
                await asyncio.to_thread(os.sync)
            await _unmount(self.fs_dir)
        if self.fuse2fs is not None:
            await _reap(self.fuse2fs)
        if _is_mounted(self.fs_dir):  # daemon killed: clear the dead mount
            await _unmount(self.fs_dir)

        if _is_mounted(self.nbd_dir):
            if self.writable:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(_fsync_path, self.device)
            await _unmount(self.nbd_dir)
        if self.nbdfuse is not None:
            await _reap(self.nbdfuse)
        if _is_mounted(self.nbd_dir):
            await _unmount(self.nbd_dir)

        left = [str(p) for p in (self.fs_dir, self.nbd_dir) if _is_mounted(p)]
        if not left:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shutil.rmtree, self.base)
        if left and strict:
            raise AgentError(f"could not unmount {', '.join(left)}")


def _nbdfuse_argv(url: str, writable: bool, nbd_dir: Path) -> list[str]:
    """The ``nbdfuse`` command that exposes ``url`` as the file ``nbd_dir``/nbd.

    nbdfuse refuses the ``tls-certificates`` parameter of an ``nbds://`` URI
    (libnbd's "local file access ... is not allowed"), and for root libnbd's
    only default certificate directory is /etc/pki/libnbd. So an ``nbds://``
    URI naming a certificate directory is attached through ``qemu-nbd`` as a
    socket-activated TLS client (the same ca-cert.pem / client-cert.pem /
    client-key.pem layout); nbdfuse starts it and ends it as it unmounts.
    """
    mode = [] if writable else ["--readonly"]
    parsed = urllib.parse.urlsplit(url)
    certs = urllib.parse.parse_qs(parsed.query).get("tls-certificates")
    if parsed.scheme != "nbds" or not certs:
        return ["nbdfuse", *mode, f"{nbd_dir}/", url]
    if shutil.which("qemu-nbd") is None:
        raise AgentError(f"cannot attach {url}: qemu-nbd not found (install the Debian package qemu-utils); "
                         "it carries the client certificate for nbdfuse")

    def opt(value: str) -> str:  # QEMU's option syntax doubles a literal comma
        return value.replace(",", ",,")

    export = urllib.parse.unquote(parsed.path[1:] if parsed.path.startswith("/") else parsed.path)
    image = (f"driver=nbd,host={opt(parsed.hostname or 'localhost')},port={parsed.port or 10809},"
             f"export={opt(export)},tls-creds=tls0")
    qemu_nbd = ["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={opt(certs[-1])}",
                "--image-opts", image, "--shared=16", *(["--discard=unmap"] if writable else ["--read-only"])]
    return ["nbdfuse", *mode, f"{nbd_dir}/", "[", *qemu_nbd, "]"]


async def _uncancelled(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion even if the caller is cancelled meanwhile; then re-raise."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def _spawn(argv: list[str], log_prefix: Path) -> asyncio.subprocess.Process:
    """Start a FUSE daemon in the foreground of its own session, output to ``log_prefix``.{out,err}."""
    out, err = await asyncio.to_thread(_open_logs, log_prefix)
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
    except OSError as exc:
        raise AgentError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    finally:
        os.close(out)
        os.close(err)


def _open_logs(log_prefix: Path) -> tuple[int, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    out = os.open(f"{log_prefix}.out", flags, 0o600)
    try:
        return out, os.open(f"{log_prefix}.err", flags, 0o600)
    except OSError:
        os.close(out)
        raise


async def _wait_mounted(proc: asyncio.subprocess.Process, path: Path, name: str) -> bool:
    """True once ``path`` is a mount point; False if ``proc`` exited first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _MOUNT_TIMEOUT
    while True:
        if _is_mounted(path):
            return True
        if proc.returncode is not None:
            return False
        if loop.time() > deadline:
            raise AgentError(f"{name} did not mount {path} within {_MOUNT_TIMEOUT:.0f} s")
        await asyncio.sleep(_POLL_INTERVAL)


def _first_line(log_prefix: Path, proc: asyncio.subprocess.Process | None) -> str:
    """First non-blank line of a daemon's stderr (else stdout), or its exit status."""
    for suffix in (".err", ".out"):
        with contextlib.suppress(OSError):
            for line in Path(f"{log_prefix}{suffix}").read_text(errors="replace").splitlines():
                if line.strip():
                    return line.strip()
    rc = proc.returncode if proc is not None else None
    return f"exited with status {rc}" if rc is not None else "no output"


def _has_ext_magic(device: Path) -> bool:
    try:
        with open(device, "rb") as f:
            f.seek(_EXT_MAGIC_OFFSET)
            return f.read(2) == _EXT_MAGIC
    except OSError:
        return False


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unescape_mountinfo(text: str) -> str:
    """Undo the octal escapes (``\\040`` for a space...) of /proc/self/mountinfo."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def _is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point. Reads mountinfo: never stats a (maybe hung) FUSE mount."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return os.path.ismount(path)
    target = str(path)
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
            return True
    return False


async def _run(argv: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        return await asyncio.wait_for(proc.wait(), _EXIT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1


async def _unmount(path: Path) -> None:
    """``fusermount3 -u``; if that fails (busy), lazily with ``-uz``."""
    if await _run(["fusermount3", "-u", str(path)]) != 0 or _is_mounted(path):
        await _run(["fusermount3", "-uz", str(path)])


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for a daemon to exit after its unmount; terminate, then kill it if it hangs."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), _EXIT_TIMEOUT)
        return
    for sig in (proc.terminate, proc.kill):
        with contextlib.suppress(ProcessLookupError):
            sig()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), _KILL_TIMEOUT)
            return


# --------------------------------------------------------------------------- plan


@dataclass
class CopyPlan:
    """What :func:`copy_plan` will copy; built and validated by :func:`plan_copy`.

    ``paths`` are normalised ("/etc/app.conf"), in request order, without those
    already covered by a requested ancestor. ``missing`` lists the requested
    paths that are not in the backup: the caller reports them and refuses.
    """

    requested: list[str]
    paths: list[str]
    missing: list[str]
    whole_volume: bool
    total_bytes: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0


@dataclass
class CopyReport:
    """What :func:`copy_plan` restored."""

    restored: list[str]
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0  # size of the regular files restored
    bytes_written: int = 0  # of those, what differed from the destination and was written
    created_parents: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # devices, fifos, sockets: not restored


def _normalize(path: str) -> str:
    """Normalise "/etc//./app.conf" to "/etc/app.conf"; refuse relative paths and any ".."."""
    if "\0" in path:
        raise AgentError(f"invalid path {path!r}: contains a NUL byte")
    if not path.startswith("/"):
        raise AgentError(f"invalid path {path!r}: name it absolutely, from the root of the filesystem")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AgentError(f"invalid path {path!r}: '..' is not allowed")
    return "/" + "/".join(parts)


def _rel(path: str) -> str:
    return path.lstrip("/")


def _join(root: Path | str, rel: str) -> str:
    return os.path.join(root, rel) if rel else str(root)


def _covered(path: str, ancestors: set[str]) -> bool:
    if "/" in ancestors:
        return path != "/"
    parts = path.split("/")
    return any("/".join(parts[:i]) in ancestors for i in range(2, len(parts)))


def plan_copy(src_root: Path, paths: list[str]) -> CopyPlan:
    """Validate ``paths`` against the backup mounted at ``src_root`` and size the copy.

    Raises :class:`AgentError` for a malformed path (relative, "..") or one that
    goes through a symlink in the backup (it would be resolved outside the
    filesystem). Nothing is copied here.
    """
    if not paths:
        raise AgentError("no paths to restore")
    normalized: list[str] = []
    for path in paths:
        norm = _normalize(path)
        if norm not in normalized:
            normalized.append(norm)

    missing: list[str] = []
    present: list[str] = []
    for norm in normalized:
        parts = _rel(norm).split("/") if norm != "/" else []
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            try:
                st = os.lstat(_join(src_root, prefix))
            except OSError:
                break  # missing: reported below
            if stat.S_ISLNK(st.st_mode):
                raise AgentError(f"{norm}: /{prefix} is a symlink in the backup; name the path it points to")
        try:
            os.lstat(_join(src_root, _rel(norm)))
        except (FileNotFoundError, NotADirectoryError):
            missing.append(norm)
            continue
        present.append(norm)

    whole_volume = "/" in present
    ancestors = set(present)
    plan = CopyPlan(
        requested=list(paths),
        paths=[p for p in present if not _covered(p, ancestors)],
        missing=missing,
        whole_volume=whole_volume,
    )
    seen: set[tuple[int, int]] = set()
    for path in plan.paths:
        for _rel_path, st in _walk(src_root, _rel(path)):
            if stat.S_ISDIR(st.st_mode):
                plan.dirs += 1
            elif stat.S_ISLNK(st.st_mode):
                plan.symlinks += 1
            elif stat.S_ISREG(st.st_mode):
                plan.files += 1
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    continue
                seen.add(key)
                plan.total_bytes += st.st_size
    return plan


def _walk(root: Path, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """Pre-order walk of ``root``/``rel`` without following symlinks."""
    stack = [(rel, os.lstat(_join(root, rel)))]
    while stack:
        rel, st = stack.pop()
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            for entry in sorted(os.scandir(_join(root, rel)), key=lambda e: e.name, reverse=True):
                stack.append((_child(rel, entry.name), entry.stat(follow_symlinks=False)))


def _child(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


# --------------------------------------------------------------------------- copy


async def copy_plan(
    plan: CopyPlan,
    src_root: Path,
    dst_root: Path,
    progress: Callable[[int, int], None] | None,
) -> CopyReport:
    """Copy the planned paths from ``src_root`` (SVOL) to the same paths under ``dst_root`` (SPVOL).

    Regular files (content, mode, owner, times), directories recursively
    (their mode, owner and times applied after their contents), symlinks as
    symlinks, hard links within the copy as hard links. Entries on the
    destination that are not in the backup are left alone. Destination
    parents that are missing are created like in the backup; a destination
    parent that is a symlink or a non-directory is refused before anything is
    written. ``progress(bytes_done, bytes_total)`` is called on the event loop.
    The file I/O runs in a worker thread; on cancellation it stops between
    chunks. Ends with ``sync``.
    """
    if plan.missing:
        raise AgentError(f"not in the backup: {', '.join(plan.missing)}")
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def on_progress(done: int) -> None:
        if progress is not None:
            loop.call_soon_threadsafe(progress, done, plan.total_bytes)

    copier = _Copier(plan, Path(src_root), Path(dst_root), on_progress, stop)
    work = asyncio.ensure_future(asyncio.to_thread(copier.run))
    try:
        report = await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await work
        raise
    await asyncio.to_thread(os.sync)
    return report


class _Stopped(Exception):
    pass


class _Copier:
    """The copy itself; runs in one worker thread."""

    def __init__(
        self,
        plan: CopyPlan,
        src_root: Path,
        dst_root: Path,
        on_progress: Callable[[int], None],
        stop: threading.Event,
    ) -> None:
        self.plan = plan
        self.src_root = src_root
        self.dst_root = dst_root
        self.on_progress = on_progress
        self.stop = stop
        self.report = CopyReport(restored=[])
        self.done = 0
        self.last_report = 0.0
        self.links: dict[tuple[int, int], str] = {}

    def run(self) -> CopyReport:
        if not self.dst_root.is_dir():
            raise AgentError(f"destination {self.dst_root} is not a directory")
        self._check_destination_parents()
        created: list[str] = []
        for path in self.plan.paths:
            created.extend(self._make_parents(_rel(path)))
            self._copy_tree(_rel(path))
            self.report.restored.append(path)
        for rel in sorted(created, key=lambda r: r.count("/"), reverse=True):
            self._apply_attrs(rel, os.lstat(_join(self.src_root, rel)))
        self.report.created_parents = ["/" + rel for rel in created]
        self.on_progress(self.done)
        return self.report

    # -- destination checks and parents

    def _check_destination_parents(self) -> None:
        conflicts: list[str] = []
        for path in self.plan.paths:
            parts = _rel(path).split("/") if path != "/" else []
            for i in range(1, len(parts)):
                prefix = "/".join(parts[:i])
                try:
                    st = os.lstat(_join(self.dst_root, prefix))
                except FileNotFoundError:
                    break
                if not stat.S_ISDIR(st.st_mode):
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    conflicts.append(f"/{prefix} is {kind}")
                    break
        if conflicts:
            raise AgentError(f"on the destination, {'; '.join(sorted(set(conflicts)))}: nothing restored")

    def _make_parents(self, rel: str) -> list[str]:
        created: list[str] = []
        parts = rel.split("/") if rel else []
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            dst = _join(self.dst_root, prefix)
            if not os.path.lexists(dst):
                os.mkdir(dst, 0o700)
                created.append(prefix)
        return created

    # -- tree

    def _copy_tree(self, rel: str) -> None:
        stack: list[tuple[str, os.stat_result, bool]] = [(rel, os.lstat(_join(self.src_root, rel)), False)]
        while stack:
            self._check_stop()
            rel, st, finished = stack.pop()
            mode = st.st_mode
            if finished:
                self._apply_attrs(rel, st)
                self.report.dirs += 1
            elif stat.S_ISDIR(mode):
                self._prepare_dir(rel)
                stack.append((rel, st, True))
                entries = sorted(os.scandir(_join(self.src_root, rel)), key=lambda e: e.name, reverse=True)
                stack.extend((_child(rel, e.name), e.stat(follow_symlinks=False), False) for e in entries)
            elif stat.S_ISREG(mode):
                self._copy_file(rel, st)
            elif stat.S_ISLNK(mode):
                self._copy_symlink(rel, st)
            else:
                self.report.skipped.append("/" + rel)

    def _prepare_dir(self, rel: str) -> None:
        dst = _join(self.dst_root, rel)
        existing = _lstat_or_none(dst)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            return
        if existing is not None:
            _remove(dst, existing)
        os.mkdir(dst, 0o700)

    def _apply_attrs(self, rel: str, st: os.stat_result) -> None:
        dst = _join(self.dst_root, rel)
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    # -- leaves

    def _copy_symlink(self, rel: str, st: os.stat_result) -> None:
        src, dst = _join(self.src_root, rel), _join(self.dst_root, rel)
        target = os.readlink(src)
        existing = _lstat_or_none(dst)
        if existing is not None and not (stat.S_ISLNK(existing.st_mode) and os.readlink(dst) == target):
            _remove(dst, existing)
            existing = None
        if existing is None:
            os.symlink(target, dst)
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        with contextlib.suppress(NotImplementedError):
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        self.report.symlinks += 1

    def _copy_file(self, rel: str, st: os.stat_result) -> None:
        src, dst = _join(self.src_root, rel), _join(self.dst_root, rel)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            first = self.links.get(key)
            if first is not None:
                self._link(first, dst)
                return
            self.links[key] = dst

        existing = _lstat_or_none(dst)
        # Rewrite in place only a plain file with no other names (those are not ours to change).
        if existing is not None and (not stat.S_ISREG(existing.st_mode) or existing.st_nlink > 1):
            _remove(dst, existing)
            existing = None
        sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if existing is not None:
                dfd = os.open(dst, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                old_size = existing.st_size
            else:
                dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                old_size = 0
            try:
                size = self._copy_data(sfd, dfd, old_size)
                os.ftruncate(dfd, size)
                os.fchown(dfd, st.st_uid, st.st_gid)
                os.fchmod(dfd, stat.S_IMODE(st.st_mode))
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        self.report.files += 1
        self.report.bytes += size

    def _copy_data(self, sfd: int, dfd: int, old_size: int) -> int:
        """Copy by chunks; write only chunks that differ, leave new all-zero chunks as holes."""
        offset = 0
        while True:
            self._check_stop()
            chunk = os.read(sfd, _CHUNK)
            if not chunk:
                return offset
            n = len(chunk)
            # Existing region: write what differs. Beyond it: skip zeros (holes, made by ftruncate).
            write = os.pread(dfd, n, offset) != chunk if offset < old_size else chunk.count(0) != n
            if write:
                _pwrite_all(dfd, chunk, offset)
                self.report.bytes_written += n
            offset += n
            self.done += n
            now = time.monotonic()
            if now - self.last_report >= _PROGRESS_INTERVAL:
                self.last_report = now
                self.on_progress(self.done)

    def _link(self, first: str, dst: str) -> None:
        existing = _lstat_or_none(dst)
        if existing is not None:
            if os.path.samestat(existing, os.lstat(first)):
                self.report.files += 1
                return
            _remove(dst, existing)
        os.link(first, dst, follow_symlinks=False)
        self.report.files += 1

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped


def _lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: str, st: os.stat_result) -> None:
    """Remove what is in the way of a restored entry (never following a symlink)."""
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n
