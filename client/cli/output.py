"""Where the CLI's results (stdout) and progress (stderr) go."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from splitmirror.v1 import host_pb2

from ..render import format_age, format_eta, format_rate, group_backup_json, pair_row_json, pairs_table, progress_json

__all__ = ["Output", "WaitReporter"]


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


class WaitReporter:
    """Progress of ``--wait``: a rich bar on a terminal, JSON lines on stderr
    with ``--json``, nothing otherwise."""

    def __init__(self, out: Output, name: str) -> None:
        self.out = out
        self.name = name
        self._last: tuple[str, float | None] | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if not out.as_json and _isatty(out.stderr):
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("{task.fields[status]}"),
                console=Console(file=out.stderr),
            )

    def __enter__(self) -> WaitReporter:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=100.0, rate="-", eta="-", status="")
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
        if self._progress is not None and self._task is not None:
            done = 100.0 if row.status == "DUPLEX" else (row.progress if row.has_progress else None)
            self._progress.update(
                self._task,
                completed=done if done is not None else 0.0,
                rate=format_rate(row.rate_bytes_per_s),
                eta=format_eta(row.eta_seconds),
                status=row.status,
            )
        elif self.out.as_json:
            key = (row.status, round(row.progress, 1) if row.has_progress else None)
            if key != self._last:
                self._last = key
                self.out.stderr.write(json.dumps(progress_json(row)) + "\n")
                self.out.stderr.flush()
