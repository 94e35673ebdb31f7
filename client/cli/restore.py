"""``splitmirror restore files|volume|abort``: the restore agent on host B.

Talks to the secondary's daemon.  For files it first checks every path
against the backup (the SVOL mounted read-only, nothing fenced yet), then
has the daemons fence the PVOL and split the remote pair, copies the files
into the SPVOL through NBD + FUSE mounts, and has the PVOL resynced from the
SPVOL by bitmap.  Any failure after the fence aborts the restore, which
resyncs the mirror back and unfences: the PVOL is never left half restored
without ``pair display`` saying it is fenced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from splitmirror.errors import FailedPrecondition, SplitmirrorError
from splitmirror.v1 import host_pb2

from ..agent import AgentError, copy_plan, fuse_problem, mount_type, mounted_filesystem, plan_copy
from ..library import Client
from ..render import format_eta, format_rate, percent_text, size_text
from .output import LineTicker, Output

__all__ = ["render_report", "restore", "restore_files", "restore_volume"]

T = TypeVar("T")


async def restore(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.action == "abort":
        report = await client.abort_restore(args.name)
        result: dict[str, object] = {"pair": report.pair, "aborted": True, "warning": report.warning or None}
        lines = [f"restore of {args.name} aborted; the PVOL is unfenced and unchanged"]
    else:
        handler = restore_files if args.action == "files" else restore_volume
        result = await handler(client, args, out.as_json)
        lines = render_report(result)
    if out.as_json:
        out.json(result)
    else:
        for line in lines:
            out.text(line)


class Reporter:
    """Progress of one step: a bar on a terminal, JSON lines on stderr with --json."""

    def __init__(self, as_json: bool, tty: bool) -> None:
        self.as_json = as_json
        self.tty = tty and not as_json
        self._progress: Progress | None = None
        self._last = -1.0
        #: Neither a terminal nor --json: a line every few seconds.
        self._lines = LineTicker(sys.stderr) if not self.tty and not as_json else None

    @contextlib.contextmanager
    def step(self, title: str, total: float, percent: bool = False) -> Iterator[Reporter]:
        """A step of ``total`` bytes, or (``percent``) one whose rate and ETA the server reports."""
        started = time.monotonic()
        if self.tty:
            columns = ((TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}")) if percent
                       else (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()))
            self._progress = Progress(TextColumn(f"[bold]{title}"), BarColumn(), TextColumn("{task.fields[percent]}"),
                                      *columns,
                                      transient=False)
            self._progress.start()
            self._task = self._progress.add_task(title, total=max(total, 1), rate="-", eta="-", percent="-")
        self._title, self._total, self._started = title, total, started
        try:
            yield self
        finally:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None

    def update(self, done: float, total: float | None = None, rate: float | None = None,
               eta: float | None = None) -> None:
        """``done`` of ``total`` (bytes, or percent with ``rate`` and ``eta`` given by the server)."""
        total = self._total if total is None else total
        elapsed = time.monotonic() - self._started
        percent = rate is not None  # the server's view: done and total are percentages
        if rate is None:
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else None
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=max(total, 1), rate=format_rate(rate),
                                  eta=format_eta(eta or 0.0), percent=percent_text(done, total))
        elif self._lines is not None:
            whole = done >= total
            amount = (percent_text(done, total) if percent
                      else f"{size_text(done)} of {size_text(total)} ({percent_text(done, total)})")
            self._lines(whole, f"{self._title}: {amount} {format_rate(rate)} ETA {format_eta(eta or 0.0)}")
        elif self.as_json and (done - self._last >= total / 20 or done >= total):
            self._last = done
            print(json.dumps({"step": self._title, "done": done, "total": total,
                              "progress": round(100.0 * done / total, 1) if total else 100.0,
                              "rate": round(rate, 1), "eta_seconds": None if eta is None else round(eta, 1)}),
                  file=sys.stderr, flush=True)


async def _watch_resync(client: Client, pair: str, work: Awaitable[T], reporter: Reporter) -> T:
    """Run ``work`` while showing the remote pair's resync progress."""
    task = asyncio.ensure_future(work)
    with reporter.step(f"resync PVOL from SPVOL ({pair})", 100.0, percent=True):
        while not task.done():
            rows = await client.display_pairs(pair)
            row = rows[0] if rows else None
            if row is not None and row.has_progress:
                reporter.update(row.progress, 100.0, row.rate_bytes_per_s, row.eta_seconds)
            await asyncio.wait({task}, timeout=0.25)
        reporter.update(100.0, 100.0)
    return task.result()


def _confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise FailedPrecondition(f"{what}; confirm with --yes")
    answer = input(f"{what}. Continue? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise FailedPrecondition("restore cancelled")


def _nbd_url(server: str, port: int, export: str, tls_dir: str | None = None, identity: str = "admin") -> str:
    """With TLS: ``nbds://`` and the identity's client certificates (made by ``certs init``)."""
    host = server.rpartition(":")[0] or "127.0.0.1"
    if tls_dir:
        return f"nbds://{host}:{port}/{export}?tls-certificates={Path(tls_dir).resolve() / f'nbd-{identity}'}"
    return f"nbd://{host}:{port}/{export}"


@contextlib.asynccontextmanager
async def _workdir() -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix="splitmirror-restore-") as tmp:
        yield Path(tmp)


def _is_root(path: str) -> bool:
    """Does ``path`` name the whole filesystem (``/``, ``//``, ``/.``)? (pure string work)"""
    return os.path.normpath("/" + path.strip()) == "/"


async def restore_files(client: Client, args: argparse.Namespace, as_json: bool) -> dict[str, object]:
    if any(_is_root(p) for p in args.paths):
        # The whole filesystem: the whole-volume path is exact and cheaper.
        return await restore_volume(client, args, as_json)
    problem = fuse_problem()
    if problem:
        raise FailedPrecondition(f"cannot mount volumes on this host: {problem}")
    stats, listed = await asyncio.gather(client.stats(), client.list_backups(args.name))
    if not stats.nbd_port:
        raise FailedPrecondition(f"the daemon at {args.server} serves no NBD exports (start it with --nbd)")
    generations = {g.local_pair: g for g in listed}
    gen = generations.get(args.generation)
    if gen is None:
        raise SplitmirrorError(f"generation {args.generation!r} is not a backup generation of pair {args.name!r} "
                               f"(generations: {', '.join(generations) or 'none'})")
    reporter = Reporter(as_json, sys.stderr.isatty())
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 3)
        mark = now

    confirm = (f"restore {len(args.paths)} path(s) of pair {args.name} from {args.generation} "
               f"({gen.backup_time}): the PVOL is fenced meanwhile")
    session: host_pb2.RestoreSession | None = None
    if args.force:
        # The daemon checks every track read from the backup against its receipt, unless the
        # restore began with --force: so a forced restore begins before the backup is mounted.
        _confirm(args, confirm)
        session = await client.begin_restore(args.name, args.generation, force=True)
        lap("fence_and_split")
    # The backup stays mounted until the copy is done, and is unmounted while the PVOL resyncs.
    backup = contextlib.AsyncExitStack()
    try:
        work = await backup.enter_async_context(_workdir())
        tls = (getattr(args, "tls_dir", None), getattr(args, "identity", "admin"))
        svol_url = _nbd_url(args.server, stats.nbd_port, gen.svol, *tls)
        backup_root = await backup.enter_async_context(
            mounted_filesystem(svol_url, writable=False, workdir=work / "svol"))
        lap("mount_backup")
        mounted_by = {"backup": _mounted_by(backup_root)}
        plan = plan_copy(backup_root, list(args.paths))
        if plan.missing:
            raise FailedPrecondition(
                f"not in the backup of generation {args.generation!r} ({gen.backup_time}): "
                f"{', '.join(plan.missing)}; nothing was changed")
        if session is None:
            _confirm(args, confirm)
            session = await client.begin_restore(args.name, args.generation, force=args.force)
            lap("fence_and_split")
        spvol_url = _nbd_url(args.server, stats.nbd_port, session.spvol, *tls)
        async with mounted_filesystem(spvol_url, writable=True, workdir=work / "spvol") as target:
            lap("mount_target")
            mounted_by["target"] = _mounted_by(target)
            with reporter.step("copy files", float(plan.total_bytes)):
                copied = await copy_plan(plan, backup_root, target,
                                         lambda done, total: reporter.update(done, total))
            lap("copy")
        lap("sync_and_unmount")
    except BaseException as exc:
        await backup.__aexit__(type(exc), exc, exc.__traceback__)  # unmounts; the error stays the one raised
        refusal = await _read_refusal(client, args, gen.read_refusals) if isinstance(exc, Exception) else ""
        if session is not None:
            await _abort(client, args.name, exc, refusal)
        if refusal:
            raise FailedPrecondition(f"{refusal}; the restore stopped before it began: nothing was changed "
                                     "(--force restores it anyway)") from None
        raise
    unmounting = asyncio.ensure_future(backup.aclose())
    try:
        report = await _watch_resync(client, args.name, client.finish_restore(args.name), reporter)
    finally:
        await asyncio.shield(unmounting)
    lap("resync_and_unfence")
    result = _report_json(report, restored=[str(p) for p in copied.restored], kind="files")
    result["phase_seconds"] = phases
    result["mounted_by"] = mounted_by
    return result


def _mounted_by(root: Path) -> str:
    """``kernel`` (ext4 over a loop device) or ``fuse2fs``: how the restore mounted a filesystem."""
    try:
        kind = mount_type(root) or "?"
    except OSError:
        return "?"
    return "fuse2fs" if "fuse" in kind else "kernel" if kind.startswith("ext") else kind


async def _read_refusal(client: Client, args: argparse.Namespace, before: int) -> str:
    """Why the daemon refused reads of the backup during this restore (a track that no longer
    matches the backup's receipt), or "" (the failure was something else)."""
    try:
        gens = {g.local_pair: g for g in await client.list_backups(args.name)}
    except SplitmirrorError:
        return ""
    gen = gens.get(args.generation)
    return gen.read_refusal if gen is not None and gen.read_refusals > before else ""


async def _abort(client: Client, pair: str, cause: BaseException, refusal: str = "") -> None:
    try:
        await asyncio.shield(client.abort_restore(pair))
    except Exception as exc:  # the original error is what the user must see
        print(f"splitmirror: warning: aborting the restore of {pair} failed ({exc}); "
              f"the PVOL stays fenced: run 'splitmirror restore abort {pair}'", file=sys.stderr)
        if refusal:
            raise FailedPrecondition(f"{refusal}; aborting the restore failed: the PVOL stays fenced") from None
    if refusal:
        raise FailedPrecondition(f"{refusal}; the restore was aborted: the PVOL is unfenced and unchanged "
                                 "(--force restores it anyway)") from None
    if isinstance(cause, AgentError):
        raise FailedPrecondition(f"{cause}; the restore was aborted and the PVOL unfenced") from None


async def restore_volume(client: Client, args: argparse.Namespace, as_json: bool) -> dict[str, object]:
    _confirm(args, f"replace the whole PVOL of pair {args.name} with generation {args.generation}")
    reporter = Reporter(as_json, sys.stderr.isatty())
    report = await _watch_resync(client, args.name, client.restore_volume(args.name, args.generation, force=args.force),
                                  reporter)
    return _report_json(report, restored=["/"], kind="volume")


def _report_json(report: host_pb2.RestoreReport, restored: list[str], kind: str) -> dict[str, object]:
    return {"pair": report.pair, "generation": report.generation, "kind": kind, "restored": restored,
            "tracks_sent": int(report.tracks_sent), "bytes_sent": int(report.bytes_sent),
            "volume_size": int(report.volume_size), "track_size": int(report.track_size),
            "local_tracks": int(report.local_tracks), "seconds": round(report.seconds, 3),
            "warning": report.warning or None}


def render_report(obj: dict[str, object]) -> list[str]:
    restored = obj["restored"]
    assert isinstance(restored, list)
    sent, size = int(str(obj["bytes_sent"])), int(str(obj["volume_size"]))
    tracks, track_size = int(str(obj["tracks_sent"])), int(str(obj["track_size"]))
    covered = min(size, tracks * track_size)
    lines = [f"restored from {obj['generation']} into pair {obj['pair']}: {', '.join(restored)}",
             f"crossed the interconnect: {tracks} tracks ({size_text(covered)}, {percent_text(covered, size)} "
             f"of the {size_text(size)} volume) in {size_text(sent)} of data"]
    if obj.get("warning"):
        lines.append(f"warning: {obj['warning']}")
    return lines
