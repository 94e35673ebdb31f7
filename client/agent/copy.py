"""Copy the planned paths from the backup (SVOL) into the mirror volume (SPVOL).

:func:`copy_plan` runs the copier in a worker thread. Only the paths named
are written. An existing destination file is rewritten in place and only the
chunks that differ are written, so the tracks that later cross the
interconnect (resync PVOL from SPVOL) are close to what really changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AgentError
from .paths import CopyPlan, child, relative, under
from .syncfs import sync_filesystem

__all__ = ["CopyReport", "copy_plan"]

_CHUNK = 1 << 20
_PROGRESS_INTERVAL = 0.1


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
    chunks. Ends with ``syncfs`` of the destination's filesystem.
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
    await asyncio.to_thread(sync_filesystem, Path(dst_root))
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
            created.extend(self._make_parents(relative(path)))
            self._copy_tree(relative(path))
            self.report.restored.append(path)
        for rel in sorted(created, key=lambda r: r.count("/"), reverse=True):
            self._apply_attrs(rel, os.lstat(under(self.src_root, rel)))
        self.report.created_parents = ["/" + rel for rel in created]
        self.on_progress(self.done)
        return self.report

    # -- destination checks and parents

    def _check_destination_parents(self) -> None:
        conflicts: list[str] = []
        for path in self.plan.paths:
            parts = relative(path).split("/") if path != "/" else []
            for i in range(1, len(parts)):
                prefix = "/".join(parts[:i])
                try:
                    st = os.lstat(under(self.dst_root, prefix))
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
            dst = under(self.dst_root, prefix)
            if not os.path.lexists(dst):
                os.mkdir(dst, 0o700)
                created.append(prefix)
        return created

    # -- tree

    def _copy_tree(self, rel: str) -> None:
        stack: list[tuple[str, os.stat_result, bool]] = [(rel, os.lstat(under(self.src_root, rel)), False)]
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
                entries = sorted(os.scandir(under(self.src_root, rel)), key=lambda e: e.name, reverse=True)
                stack.extend((child(rel, e.name), e.stat(follow_symlinks=False), False) for e in entries)
            elif stat.S_ISREG(mode):
                self._copy_file(rel, st)
            elif stat.S_ISLNK(mode):
                self._copy_symlink(rel, st)
            else:
                self.report.skipped.append("/" + rel)

    def _prepare_dir(self, rel: str) -> None:
        dst = under(self.dst_root, rel)
        existing = _lstat_or_none(dst)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            return
        if existing is not None:
            _remove(dst, existing)
        os.mkdir(dst, 0o700)

    def _apply_attrs(self, rel: str, st: os.stat_result) -> None:
        dst = under(self.dst_root, rel)
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    # -- leaves

    def _copy_symlink(self, rel: str, st: os.stat_result) -> None:
        src, dst = under(self.src_root, rel), under(self.dst_root, rel)
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
        src, dst = under(self.src_root, rel), under(self.dst_root, rel)
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
