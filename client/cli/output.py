"""Where the CLI's results (stdout) and progress (stderr) go."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Sequence
from types import TracebackType
from typing import IO, Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from splitmirror.v1 import host_pb2

from ..library import Client, ClientError
from ..render import (
    format_age,
    format_eta,
    format_rate,
    group_backup_json,
    pair_row_json,
    pairs_table,
    percent_text,
    progress_json,
)

__all__ = ["ENV_PROGRESS_INTERVAL", "LineTicker", "Output", "WaitReporter", "progress_text", "watch_activity"]

_T = TypeVar("_T")

#: Seconds between looks at a running verify's or check's progress.
ACTIVITY_POLL = 0.5


class Output:
    """Where results (stdout) and progress (stderr) go."""

    def __init__(self, as_json: bool, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
        self.as_json = as_json
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        is_tty = _isatty(self.stdout)
        self.console = Console(file=self.stdout, width=None if is_tty else 200, soft_wrap=False,
                               highlight=False)

    def json(self, obj: object) -> None:
        self.stdout.write(json.dumps(obj, indent=2) + "\n")
        self.stdout.flush()

    def text(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False)

    def show(self, renderable: Any) -> None:
        """Print a table at its natural width: a narrow terminal wraps lines
        rather than truncating cells such as a status."""
        wide = self.console.options.update_width(4096)
        natural = self.console.measure(renderable, options=wide).maximum
        width = self.console.width
        if natural > width:
            self.console.width = natural
            try:
                self.console.print(renderable)
            finally:
                self.console.width = width
        else:
            self.console.print(renderable)

    def pairs(self, rows: Sequence[host_pb2.PairRow], groups: Sequence[host_pb2.GroupBackup] = ()) -> None:
        """The rows; the newest backup of each consistency group shown (JSON:
        as objects with ``"group"`` after the rows)."""
        if self.as_json:
            self.json([pair_row_json(r) for r in rows] + [group_backup_json(g) for g in groups])
        elif rows:
            self.show(pairs_table(rows))
            for g in groups:
                self.text(f"group {g.group}: newest backup {g.backup_time} ({format_age(g.backup_age_seconds)} ago)")
        else:
            self.text("no pairs")


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


#: Seconds between progress lines when stderr is not a terminal (tests set it lower).
ENV_PROGRESS_INTERVAL = "SPLITMIRROR_PROGRESS_INTERVAL"


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_PROGRESS_INTERVAL, "5")))
    except ValueError:
        return 5.0


class LineTicker:
    """Progress as plain lines on a stream that is not a terminal (a log, a pipe):
    the first at once, then one every :func:`progress_interval` seconds, and one
    whenever the state (``key``) changes."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.interval = progress_interval()
        self._key: object = None
        self._next = 0.0

    def __call__(self, key: object, text: str) -> None:
        now = time.monotonic()
        if key == self._key and now < self._next:
            return
        self._key, self._next = key, now + self.interval
        self.stream.write(text + "\n")
        self.stream.flush()


def progress_text(row: host_pb2.PairRow) -> str:
    """``pair p: COPY 37.5% 12.0 MiB/s ETA 0:00:05`` (a verify: ``pair p: verify 37.5% ...``,
    a backup's generation brought up to date: ``pair GEN: backup 37.5% ...``)."""
    what = row.activity or row.status
    if not row.has_progress:
        done = "100.0%" if row.status == "DUPLEX" else "-"
        return f"pair {row.pair}: {what} {done}"
    return (f"pair {row.pair}: {what} {percent_text(row.progress)} {format_rate(row.rate_bytes_per_s)} "
            f"ETA {format_eta(row.eta_seconds)}")


class WaitReporter:
    """Progress of a pair's copy, resync or verify: a rich bar on a terminal,
    JSON lines on stderr with ``--json``, a line every few seconds otherwise."""

    def __init__(self, out: Output, name: str) -> None:
        self.out = out
        self.name = name
        self._last: tuple[str, str, float | None] | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._lines: LineTicker | None = None
        if not out.as_json and _isatty(out.stderr):
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[percent]}"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("{task.fields[status]}"),
                console=Console(file=out.stderr),
            )
        elif not out.as_json:
            self._lines = LineTicker(out.stderr)

    def __enter__(self) -> WaitReporter:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=100.0, rate="-", eta="-", status="", percent="-")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, row: host_pb2.PairRow) -> None:
        done = row.progress if row.has_progress else (100.0 if row.status == "DUPLEX" else None)
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task,
                completed=done if done is not None else 0.0,
                percent=percent_text(done) if done is not None else "-",
                rate=format_rate(row.rate_bytes_per_s),
                eta=format_eta(row.eta_seconds),
                status=row.activity or row.status,
            )
        elif self._lines is not None:
            self._lines((row.status, row.activity), progress_text(row))
        elif self.out.as_json:
            key = (row.status, row.activity, round(row.progress, 1) if row.has_progress else None)
            if key != self._last:
                self._last = key
                self.out.stderr.write(json.dumps(progress_json(row)) + "\n")
                self.out.stderr.flush()


async def watch_activity(client: Client, name: str, what: str, out: Output, work: Awaitable[_T]) -> _T:
    """Run ``work`` while showing the activity of pair ``name`` as ``pair display`` reports it
    (a verify, or a backup check's step): a bar on a terminal, a line every few seconds
    otherwise, progress objects with --json."""
    task = asyncio.ensure_future(work)
    with WaitReporter(out, f"{what} {name}") as reporter:
        while not task.done():
            await asyncio.wait({task}, timeout=ACTIVITY_POLL)
            if task.done():
                break
            with contextlib.suppress(ClientError):  # progress is a courtesy: the command's answer decides
                for row in await client.display_pairs(name):
                    if row.activity:
                        reporter(row)
    return task.result()
