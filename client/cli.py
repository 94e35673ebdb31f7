"""The ``splitmirror`` command line: volumes, host I/O, pairs and stats.

``splitmirror --server HOST:PORT [--json] COMMAND ...``; the server may also
come from ``SPLITMIRROR_SERVER``. Every failure is one line on stderr,
``splitmirror: error: <message>``, with exit code 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, NoReturn

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from splitmirror.errors import SplitmirrorError
from splitmirror.sizes import format_size, parse_size
from splitmirror.v1 import host_pb2

from .agent import AgentError
from .library import DEFAULT_CHUNK, Client, ClientError
from .render import (
    backup_json,
    format_eta,
    format_rate,
    generation_json,
    generations_table,
    pair_row_json,
    pairs_table,
    progress_json,
    stats_json,
    stats_tables,
    volume_detail_table,
    volume_json,
    volumes_table,
)

PROG = "splitmirror"
ENV_SERVER = "SPLITMIRROR_SERVER"
ENV_TLS_DIR = "SPLITMIRROR_TLS_DIR"
ENV_IDENTITY = "SPLITMIRROR_IDENTITY"
ENV_TOKEN = "SPLITMIRROR_TOKEN"
#: Host I/O of the CLI moves the file through the client in windows of this
#: many bytes, so memory stays bounded whatever the file size.
IO_WINDOW = 16 * DEFAULT_CHUNK
IO_DEPTH = 4


# ---------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors of every sub-command end in ``splitmirror: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Manage splitmirror volumes and pairs through a storage system's host API.",
    )
    parser.add_argument(
        "--server", metavar="HOST:PORT", default=os.environ.get(ENV_SERVER) or None,
        help=f"host API address of primaryd/secondaryd (default: ${ENV_SERVER})",
    )
    parser.add_argument(
        "--tls-dir", metavar="DIR", default=os.environ.get(ENV_TLS_DIR) or None,
        help=f"mutual TLS with the certificates of 'certs init' (default: ${ENV_TLS_DIR})",
    )
    parser.add_argument(
        "--identity", metavar="NAME", default=os.environ.get(ENV_IDENTITY) or "admin",
        help=f"with --tls-dir: use client-NAME.pem/.key (default: ${ENV_IDENTITY} or admin)",
    )
    parser.add_argument(
        "--token-file", metavar="FILE",
        help=f"send the bearer token read from FILE (default: ${ENV_TOKEN}, if set)",
    )
    parser.add_argument("--json", action="store_true", default=False, help="machine-readable output")
    # Also accept --json after the command ("splitmirror pair display --json").
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    volume = commands.add_parser("volume", help="create, list, show and delete volumes")
    vol_cmds = volume.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = vol_cmds.add_parser("create", parents=[common], help="create a volume")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", required=True, help="volume size, e.g. 16G")
    p.add_argument("--track-size", default="0", help="change-tracking unit, power of two >= 4K (default 8K)")
    vol_cmds.add_parser("list", parents=[common], help="list volumes")
    p = vol_cmds.add_parser("show", parents=[common], help="show one volume")
    p.add_argument("name", metavar="NAME")
    p = vol_cmds.add_parser("delete", parents=[common], help="delete a volume (not while it is in a pair)")
    p.add_argument("name", metavar="NAME")

    p = commands.add_parser("write", parents=[common], help="write a file into a volume")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--offset", default="0", help="byte offset in the volume (sizes like 1M accepted)")
    p.add_argument("--file", required=True, metavar="PATH", help="data to write ('-' for stdin)")
    p.add_argument("--fua", action="store_true", help="force unit access: durable when acknowledged")

    p = commands.add_parser("read", parents=[common], help="read a byte range of a volume")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--offset", default="0", help="byte offset in the volume (sizes like 1M accepted)")
    p.add_argument("--length", required=True, help="number of bytes (sizes like 1M accepted)")
    p.add_argument("--out", metavar="PATH", help="output file (default: stdout)")

    p = commands.add_parser("flush", parents=[common], help="make acknowledged writes durable")
    p.add_argument("name", metavar="NAME")

    p = commands.add_parser("checksum", parents=[common], help="checksum a volume or a byte range")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--offset", default="0", help="byte offset (default 0)")
    p.add_argument("--length", default="0", help="number of bytes (default: to the end)")

    pair = commands.add_parser("pair", help="create, display, split, resync and delete pairs")
    pair_cmds = pair.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = pair_cmds.add_parser("create", parents=[common], help="create a pair and start the initial copy")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--pvol", required=True, metavar="VOLUME", help="primary volume")
    p.add_argument("--svol", required=True, metavar="VOLUME", help="secondary volume")
    p.add_argument("--peer", type=_system_id, default=0, metavar="SYSTEM_ID",
                   help="system id of the remote storage system (omit for a local pair)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    p.add_argument("--group", default="", help="consistency group")
    _add_wait(p)
    p = pair_cmds.add_parser("display", parents=[common], help="show the copy management table")
    p.add_argument("name", metavar="NAME", nargs="?", default="")
    p = pair_cmds.add_parser("split", parents=[common], help="split a pair (writes are tracked)")
    p.add_argument("name", metavar="NAME")
    p = pair_cmds.add_parser("resync", parents=[common], help="resync a split or suspended pair by bitmap")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reverse", action="store_true", help="copy from the secondary end to the primary end")
    p.add_argument("--force", action="store_true", help="resync even where the server would refuse")
    _add_wait(p)
    p = pair_cmds.add_parser("delete", parents=[common], help="delete a pair")
    p.add_argument("name", metavar="NAME")
    p = pair_cmds.add_parser("set-mode", parents=[common], help="switch a live pair between sync and async")
    p.add_argument("name", metavar="NAME")
    p.add_argument("mode", choices=("sync", "async"))

    p = commands.add_parser("backup", parents=[common],
                            help="point-in-time backup of a remote pair into a generation at the secondary")
    p.add_argument("name", metavar="REMOTE_PAIR", nargs="?", default="")
    p.add_argument("--group", default="", help="back up every remote pair of this consistency group at one point")
    p.add_argument("--generation", default="", metavar="LOCAL_PAIR",
                   help="generation to use (default: the one whose backup is oldest)")
    p.add_argument("--wait", action="store_true",
                   help="return once the generation is split (default: once the backup point is fixed)")
    p = commands.add_parser("backups", parents=[common], help="list the backup generations of a remote pair")
    p.add_argument("name", metavar="REMOTE_PAIR")

    restore = commands.add_parser("restore", help="restore files or a whole volume from a backup generation "
                                                  "(issued at the secondary, on host B)")
    restore_cmds = restore.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = restore_cmds.add_parser("files", parents=[common], help="copy files back from a generation")
    p.add_argument("name", metavar="REMOTE_PAIR")
    p.add_argument("--generation", required=True, metavar="LOCAL_PAIR")
    p.add_argument("paths", nargs="+", metavar="PATH", help="absolute paths inside the filesystem ('/' = all)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = restore_cmds.add_parser("volume", parents=[common], help="bring the whole PVOL back to a generation")
    p.add_argument("name", metavar="REMOTE_PAIR")
    p.add_argument("--generation", required=True, metavar="LOCAL_PAIR")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = restore_cmds.add_parser("abort", parents=[common],
                                help="undo an interrupted restore: resync the mirror back and unfence")
    p.add_argument("name", metavar="REMOTE_PAIR")

    p = commands.add_parser("verify", parents=[common],
                            help="compare per-track digests of both ends of a pair (no data is sent)")
    p.add_argument("name", metavar="PAIR")
    p.add_argument("--repair", action="store_true", help="mark mismatching tracks pending and resync them")

    commands.add_parser("stats", parents=[common], help="replication and interconnect counters")

    certs = commands.add_parser("certs", help="make the certificates for mutual TLS (no server needed)")
    certs_cmds = certs.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = certs_cmds.add_parser("init", parents=[common], help="create a CA and certificates in DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--systems", required=True, metavar="ID[,ID...]", help="system ids, one daemon certificate each")
    p.add_argument("--clients", default="admin,host,viewer", metavar="NAME[:ROLE][,...]",
                   help="client certificates (role admin, host or viewer; default admin,host,viewer)")
    p.add_argument("--hosts", default="", metavar="NAME[,NAME...]",
                   help="extra DNS names or addresses for the daemon certificates")
    return parser


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="block until the pair is DUPLEX, showing progress")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait: give up after this many seconds")


def _system_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid system id {text!r}: expected a non-negative integer")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; usage errors exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.server and args.command != "certs":
        parser.error(f"no server: pass --server HOST:PORT or set {ENV_SERVER}")
    return args


# ---------------------------------------------------------------------- output


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

    def pairs(self, rows: Sequence[host_pb2.PairRow]) -> None:
        if self.as_json:
            self.json([pair_row_json(r) for r in rows])
        elif rows:
            self.show(pairs_table(rows))
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


# ---------------------------------------------------------------------- commands


#: Options that take a size string, checked before any connection is made.
SIZE_OPTIONS = ("size", "track_size", "offset", "length")


def resolve_sizes(args: argparse.Namespace) -> None:
    """Replace every size option of ``args`` by its value in bytes."""
    for attr in SIZE_OPTIONS:
        text = getattr(args, attr, None)
        if isinstance(text, str):
            try:
                setattr(args, attr, parse_size(text))
            except SplitmirrorError as err:
                flag = "--" + attr.replace("_", "-")
                raise SplitmirrorError(f"{flag}: {err.message}") from None


async def _wait_and_show(client: Client, out: Output, name: str, timeout: float | None) -> None:
    with WaitReporter(out, name) as reporter:
        await client.wait_pair(name, {"DUPLEX"}, timeout=timeout, on_progress=reporter)
    out.pairs(await client.display_pairs(name))


async def _volume(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.action == "create":
        vol = await client.create_volume(args.name, args.size, args.track_size)
        if out.as_json:
            out.json(volume_json(vol))
        else:
            out.text(f"volume {vol.name} created: {format_size(vol.size)}, "
                     f"{format_size(vol.track_size)} tracks")
    elif args.action == "list":
        volumes = await client.list_volumes()
        if out.as_json:
            out.json([volume_json(v) for v in volumes])
        elif volumes:
            out.show(volumes_table(volumes))
        else:
            out.text("no volumes")
    elif args.action == "show":
        vol = await client.get_volume(args.name)
        if out.as_json:
            out.json(volume_json(vol))
        else:
            out.show(volume_detail_table(vol))
    elif args.action == "delete":
        await client.delete_volume(args.name)
        if out.as_json:
            out.json({"volume": args.name, "deleted": True})
        else:
            out.text(f"volume {args.name} deleted")


def _open_input(path: str) -> tuple[BinaryIO, bool]:
    if path == "-":
        return sys.stdin.buffer, False
    return open(path, "rb"), True


def _open_output(path: str | None) -> BinaryIO:
    if path is None:
        return sys.stdout.buffer
    return open(path, "wb")


async def _write(client: Client, args: argparse.Namespace, out: Output) -> None:
    offset: int = args.offset
    source, owned = _open_input(args.file)
    total = 0
    try:
        while True:
            window = source.read(IO_WINDOW)
            if not window:
                break
            total += await client.write(args.name, offset + total, window, fua=args.fua, depth=IO_DEPTH)
    finally:
        if owned:
            source.close()
    if total == 0:
        raise SplitmirrorError(f"{args.file}: nothing to write (empty input)")
    if out.as_json:
        out.json({"volume": args.name, "offset": offset, "written": total})
    else:
        out.text(f"wrote {format_size(total)} ({total} bytes) to {args.name} at offset {offset}")


async def _read(client: Client, args: argparse.Namespace, out: Output) -> None:
    offset: int = args.offset
    length: int = args.length
    sink: BinaryIO | None = None
    owned = args.out is not None
    done = 0
    try:
        while done < length:
            n = min(IO_WINDOW, length - done)
            data = await client.read(args.name, offset + done, n, depth=IO_DEPTH)
            if sink is None:  # opened only once the volume answered
                sink = _open_output(args.out)
            sink.write(data)
            done += len(data)
        if sink is not None:
            sink.flush()
    finally:
        if owned and sink is not None:
            sink.close()
    if owned:
        if out.as_json:
            out.json({"volume": args.name, "offset": offset, "length": done, "out": args.out})
        else:
            out.text(f"read {format_size(done)} ({done} bytes) from {args.name} at offset {offset} "
                     f"into {args.out}")


async def _flush(client: Client, args: argparse.Namespace, out: Output) -> None:
    await client.flush(args.name)
    if out.as_json:
        out.json({"volume": args.name, "flushed": True})
    else:
        out.text(f"flushed {args.name}")


async def _checksum(client: Client, args: argparse.Namespace, out: Output) -> None:
    offset: int = args.offset
    length: int = args.length
    reply = await client.checksum_reply(args.name, offset, length)
    if out.as_json:
        out.json({"volume": args.name, "offset": offset, "length": length,
                  "algorithm": reply.algorithm, "digest": reply.digest})
    else:
        out.text(f"{reply.digest}  {args.name}  ({reply.algorithm})")


async def _pair(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.action == "create":
        rows = await client.create_pair(args.name, args.pvol, args.svol, peer=args.peer, mode=args.mode,
                                        group=args.group)
        if args.wait:
            await _wait_and_show(client, out, args.name, args.timeout)
        else:
            out.pairs(rows)
    elif args.action == "display":
        out.pairs(await client.display_pairs(args.name))
    elif args.action == "split":
        out.pairs(await client.split_pair(args.name))
    elif args.action == "resync":
        rows = await client.resync_pair(args.name, reverse=args.reverse, force=args.force)
        if args.wait:
            await _wait_and_show(client, out, args.name, args.timeout)
        else:
            out.pairs(rows)
    elif args.action == "set-mode":
        out.pairs(await client.set_pair_mode(args.name, args.mode))
    elif args.action == "delete":
        await client.delete_pair(args.name)
        if out.as_json:
            out.json({"pair": args.name, "deleted": True})
        else:
            out.text(f"pair {args.name} deleted")


async def _verify(client: Client, args: argparse.Namespace, out: Output) -> None:
    reply = await client.verify_pair(args.name, repair=args.repair)
    if out.as_json:
        out.json({"pair": reply.pair, "tracks_checked": int(reply.tracks_checked),
                  "mismatches": [int(t) for t in reply.mismatches], "repaired": bool(reply.repaired),
                  "algorithm": reply.algorithm})
        return
    out.text(f"pair {reply.pair}: {reply.tracks_checked} tracks checked ({reply.algorithm}), "
             f"{len(reply.mismatches)} mismatching")
    if reply.mismatches:
        shown = ", ".join(str(t) for t in reply.mismatches[:20])
        more = f" and {len(reply.mismatches) - 20} more" if len(reply.mismatches) > 20 else ""
        out.text(f"mismatching tracks: {shown}{more}")
        out.text("marked pending; resync started" if reply.repaired else "run with --repair to resync them")


async def _backup(client: Client, args: argparse.Namespace, out: Output) -> None:
    if not args.name and not args.group:
        raise SplitmirrorError("backup: name a remote pair or give --group")
    reply = await client.backup(args.name, group=args.group, generation=args.generation, wait=args.wait)
    if out.as_json:
        out.json({"latency_seconds": reply.latency_seconds, "prepare_seconds": reply.prepare_seconds,
                  "backups": [backup_json(b) for b in reply.backups]})
        return
    for b in reply.backups:
        out.text(f"pair {b.pair}: backup {b.state} in generation {b.generation} (SVOL {b.svol}) at {b.backup_time}"
                 f"{f', #{b.sequence}' if b.sequence else ''}; {b.resynced_tracks} tracks resynced first")
    out.text(f"latency {reply.latency_seconds * 1000:.0f} ms (bringing generations in sync: "
             f"{reply.prepare_seconds * 1000:.0f} ms)")


async def _backups(client: Client, args: argparse.Namespace, out: Output) -> None:
    gens = await client.list_backups(args.name)
    if out.as_json:
        out.json([generation_json(g) for g in gens])
    else:
        out.show(generations_table(gens))


async def _restore(client: Client, args: argparse.Namespace, out: Output) -> None:
    from . import restore_cmd

    if args.action == "abort":
        report = await client.abort_restore(args.name)
        result: dict[str, object] = {"pair": report.pair, "aborted": True, "warning": report.warning or None}
        lines = [f"restore of {args.name} aborted; the PVOL is unfenced and unchanged"]
    else:
        handler = restore_cmd.restore_files if args.action == "files" else restore_cmd.restore_volume
        result = await handler(client, args, out.as_json)
        lines = restore_cmd.render_report(result)
    if out.as_json:
        out.json(result)
    else:
        for line in lines:
            out.text(line)


async def _stats(client: Client, args: argparse.Namespace, out: Output) -> None:
    stats = await client.stats()
    if out.as_json:
        out.json(stats_json(stats))
    else:
        for table in stats_tables(stats):
            out.show(table)


_Handler = Callable[[Client, argparse.Namespace, Output], Any]

COMMANDS: dict[str, _Handler] = {
    "volume": _volume,
    "write": _write,
    "read": _read,
    "flush": _flush,
    "checksum": _checksum,
    "pair": _pair,
    "stats": _stats,
    "verify": _verify,
    "backup": _backup,
    "backups": _backups,
    "restore": _restore,
}


def _certs(args: argparse.Namespace, out: Output) -> None:
    from splitmirror import tls

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    written = tls.init_dir(Path(args.dir), tls.parse_systems(args.systems), tls.parse_clients(args.clients), hosts)
    if out.as_json:
        out.json([str(p) for p in written])
    else:
        for path in written:
            out.stdout.write(f"{path}\n")


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file) as fh:
            return fh.read().strip() or None
    return os.environ.get(ENV_TOKEN) or None


async def run(args: argparse.Namespace, out: Output) -> None:
    async with Client(args.server, tls_dir=args.tls_dir, identity=args.identity, token=_token(args)) as client:
        await COMMANDS[args.command](client, args, out)


# ---------------------------------------------------------------------- errors


def error_message(err: BaseException, server: str = "") -> str:
    """The one line shown for ``err`` (without the ``splitmirror: error:`` prefix)."""
    if isinstance(err, ClientError):
        message = err.message
        if err.code == "UNAVAILABLE":
            lowered = message.lower()
            if "handshake failed" in lowered:
                found = re.search(r"OPENSSL_internal:([A-Z0-9_]+)(?::\s*([^:]+))?", message)
                reason = f"{found[1]} ({found[2].strip()})" if found and found[2] else found[1] if found else ""
                reason = f": {reason}" if reason else ""
                message = (f"TLS handshake with splitmirror server at {server} failed{reason}; "
                           "check that --tls-dir holds the CA that signed the server's certificate "
                           "and a client certificate the server accepts")
            elif lowered.startswith("failed to connect to all addresses"):
                reason = message.rsplit(": ", 1)[-1]
                if reason == "Socket closed":
                    reason += " (a server that requires TLS closes plaintext connections: pass --tls-dir)"
                message = f"cannot reach splitmirror server at {server}: {reason}"
            elif "dns resolution failed" in lowered or "errors resolving" in lowered:
                reason = message.rsplit(": ", 1)[-1].strip(" ]")
                message = f"cannot resolve splitmirror server address {server}: {reason}"
    elif isinstance(err, SplitmirrorError):
        message = err.message
    elif isinstance(err, OSError) and err.strerror:
        message = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        message = str(err) or type(err).__name__
    return " ".join(message.split())


def _fail(message: str, stderr: IO[str] | None = None) -> None:
    stream = stderr if stderr is not None else sys.stderr
    stream.write(f"{PROG}: error: {message}\n")
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    out = Output(args.json)
    try:
        resolve_sizes(args)
        if args.command == "read" and args.length == 0:
            raise SplitmirrorError("--length: must be greater than 0")
        if args.command == "certs":
            _certs(args, out)
        else:
            asyncio.run(run(args, out))
    except (ClientError, SplitmirrorError, AgentError, OSError) as err:
        if isinstance(err, BrokenPipeError):
            # The reader of our stdout went away (e.g. "| head"): stop quietly.
            _silence_stdout()
            return 1
        _fail(error_message(err, args.server))
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    return 0


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
