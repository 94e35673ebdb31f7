"""The paths of a restore: normalise what the operator names, check it against the backup, plan the copy.

:func:`plan_copy` validates the requested paths against the backup before
anything is written, and sizes the copy for progress reporting. The helpers
:func:`relative`, :func:`under` and :func:`child` spell paths inside a
mounted filesystem, for the copier too.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import AgentError

__all__ = ["CopyPlan", "child", "plan_copy", "relative", "under"]


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


def relative(path: str) -> str:
    """"/etc/app.conf" -> "etc/app.conf" (and "/" -> "")."""
    return path.lstrip("/")


def under(root: Path | str, rel: str) -> str:
    """The path of ``rel`` (from :func:`relative`) under the mount point ``root``."""
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
        parts = relative(norm).split("/") if norm != "/" else []
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            try:
                st = os.lstat(under(src_root, prefix))
            except OSError:
                break  # missing: reported below
            if stat.S_ISLNK(st.st_mode):
                raise AgentError(f"{norm}: /{prefix} is a symlink in the backup; name the path it points to")
        try:
            os.lstat(under(src_root, relative(norm)))
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
        for _rel_path, st in _walk(src_root, relative(path)):
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
    stack = [(rel, os.lstat(under(root, rel)))]
    while stack:
        rel, st = stack.pop()
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            for entry in sorted(os.scandir(under(root, rel)), key=lambda e: e.name, reverse=True):
                stack.append((child(rel, entry.name), entry.stat(follow_symlinks=False)))


def child(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name
