"""The argparse tree of ``splitmirror`` and the checks made before any connection."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from splitmirror.errors import OutOfRange, SplitmirrorError
from splitmirror.sizes import parse_size

__all__ = [
    "ENV_IDENTITY", "ENV_SERVER", "ENV_TLS_DIR", "ENV_TOKEN", "LOCAL_COMMANDS", "PROG", "SIZE_OPTIONS",
    "build_parser", "parse_args", "resolve_sizes",
]

PROG = "splitmirror"
ENV_SERVER = "SPLITMIRROR_SERVER"
ENV_TLS_DIR = "SPLITMIRROR_TLS_DIR"
ENV_IDENTITY = "SPLITMIRROR_IDENTITY"
ENV_TOKEN = "SPLITMIRROR_TOKEN"


#: Commands that need no server.
LOCAL_COMMANDS = ("certs", "completion")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("splitmirror")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """Usage errors of every sub-command end in ``splitmirror: error: ...``."""

    def error(self, message: str) -> NoReturn:
        for action in BACKUP_ACTIONS:  # the commands as users type them (see _backup_action)
            message = message.replace(f"'backup-{action}'", f"'backup {action}'")
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
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    # Also accept --json after the command ("splitmirror pair display --json").
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    volume = commands.add_parser("volume", help="create, list, show and delete volumes")
    vol_cmds = volume.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = vol_cmds.add_parser("create", parents=[common], help="create a volume")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", required=True, help="volume size, e.g. 16G")
    p.add_argument("--track-size", default="0", help="change-tracking unit, a power of two from 4K to 1M (default 8K)")
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
    p = pair_cmds.add_parser(
        "takeover", parents=[common],
        help="at the secondary, when the primary site is lost: make this end the primary (host-writable)")
    p.add_argument("name", metavar="NAME", nargs="?", default="")
    p.add_argument("--group", default="", help="every remote pair of this consistency group, at one point")
    p.add_argument("--force", action="store_true",
                   help="even while the primary answers or a copy is under way (the higher epoch wins)")
    p = pair_cmds.add_parser(
        "swap", parents=[common],
        help="planned switchover (both sites up, DUPLEX): the roles change at both ends, no data copied")
    p.add_argument("name", metavar="NAME", nargs="?", default="")
    p.add_argument("--group", default="", help="every remote pair of this consistency group, at one point")

    p = commands.add_parser("backup", parents=[common],
                            help="point-in-time backup of a remote pair into a generation at the secondary")
    p.add_argument("name", metavar="REMOTE_PAIR", nargs="?", default="")
    p.add_argument("--group", default="", help="back up every remote pair of this consistency group at one point")
    p.add_argument("--generation", default="", metavar="LOCAL_PAIR",
                   help="generation to use (default: the one whose backup is oldest)")
    p.add_argument("--wait", action="store_true",
                   help="return once the generation is split (default: once the backup point is fixed)")
    p = commands.add_parser("backups", parents=[common],
                            help="list the backup generations of a remote pair (or a consistency group), "
                                 "its schedules and checks")
    p.add_argument("name", metavar="REMOTE_PAIR", nargs="?", default="")
    p.add_argument("--group", default="", help="every remote pair of this consistency group")
    _backup_schedule(commands, common)

    restore = commands.add_parser("restore", help="restore files or a whole volume from a backup generation "
                                                  "(issued at the secondary, on host B)")
    restore_cmds = restore.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = restore_cmds.add_parser("files", parents=[common], help="copy files back from a generation")
    p.add_argument("name", metavar="REMOTE_PAIR")
    p.add_argument("--generation", required=True, metavar="LOCAL_PAIR")
    p.add_argument("paths", nargs="+", metavar="PATH", help="absolute paths inside the filesystem ('/' = all)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true", help="restore even if the generation fails verification")
    p = restore_cmds.add_parser("volume", parents=[common], help="bring the whole PVOL back to a generation")
    p.add_argument("name", metavar="REMOTE_PAIR")
    p.add_argument("--generation", required=True, metavar="LOCAL_PAIR")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true", help="restore even if the generation fails verification")
    p = restore_cmds.add_parser("abort", parents=[common],
                                help="undo an interrupted restore: resync the mirror back and unfence")
    p.add_argument("name", metavar="REMOTE_PAIR")

    p = commands.add_parser("verify", parents=[common],
                            help="compare per-track digests of both ends of a pair (no data is sent)")
    p.add_argument("name", metavar="PAIR")
    p.add_argument("--repair", action="store_true", help="mark mismatching tracks pending and resync them")

    commands.add_parser("stats", parents=[common], help="replication and interconnect counters")

    p = commands.add_parser("events", parents=[common],
                            help="pair status changes, copies, backups, restores, fences and link changes, in order")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events as they happen")
    p.add_argument("--since", type=_sequence, default=0, metavar="SEQ",
                   help="only events after sequence number SEQ (resume where a previous run stopped)")

    p = commands.add_parser("completion", parents=[common],
                            help="print a shell completion script (no server needed): "
                                 "eval \"$(splitmirror completion bash)\"")
    p.add_argument("shell", choices=("bash", "zsh"))

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


#: ``backup ACTION ...`` words that are commands, not a pair name (see :func:`parse_args`).
BACKUP_ACTIONS = ("schedule", "check", "verify")
_GLOBAL_VALUED = ("--server", "--tls-dir", "--identity", "--token-file")


def _backup_schedule(commands: Any, common: argparse.ArgumentParser) -> None:
    """``backup schedule set|list|delete`` (parsed as the command ``backup-schedule``)."""
    sched = _backup_parser(commands, "schedule", help="set|list|delete: backups that run themselves (kept and "
                                                      "run by the primary)")
    cmds = sched.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = cmds.add_parser("set", parents=[common], help="back up a remote pair or group on a schedule")
    p.add_argument("name", metavar="REMOTE_PAIR", nargs="?", default="")
    p.add_argument("--group", default="", help="back up every remote pair of this consistency group at one point")
    p.add_argument("--every", required=True, type=duration, metavar="DURATION", help="interval: 30s, 15m, 1h, 1d")
    p.add_argument("--at", default="", metavar="HH:MM", help="slots at this time of day (UTC) plus multiples of "
                                                              "--every (default: from now)")
    p.add_argument("--generations", default="", metavar="G1,G2,...",
                   help="ring of generations (local pairs at the secondary) this schedule uses, oldest first")
    p.add_argument("--check", action="store_true", help="check each new backup at the secondary (backup check)")
    p.add_argument("--probe", default="", metavar="COMMAND", help="with --check: the probe run on the mounted copy")
    p.add_argument("--name", dest="schedule", default="", metavar="NAME",
                   help="schedule name (default: PAIR-every-DURATION)")
    p.add_argument("--pre-backup-hook", default="", metavar="COMMAND",
                   help="run at the primary before the backup point (default: the daemon's)")
    p.add_argument("--post-backup-hook", default="", metavar="COMMAND",
                   help="run at the primary once the point is fixed, also after a failure (default: the daemon's)")
    p.add_argument("--hook-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="seconds a hook may run (default: the daemon's, 30)")
    p = cmds.add_parser("list", parents=[common], help="schedules with their next run and last result")
    p.add_argument("name", metavar="REMOTE_PAIR", nargs="?", default="")
    p.add_argument("--group", default="")
    p = cmds.add_parser("delete", parents=[common], help="delete a schedule (or every schedule of a pair or group)")
    p.add_argument("name", metavar="NAME|REMOTE_PAIR", nargs="?", default="")
    p.add_argument("--group", default="")
    p = _backup_parser(commands, "check", parents=[common],
                       help="GENERATION: prove a backup restorable (at the secondary)")
    p.add_argument("generation", metavar="GENERATION")
    p.add_argument("--probe", default="", metavar="COMMAND",
                   help="shell command run in the mounted copy ($SPLITMIRROR_MOUNT), e.g. start a database on it")
    p.add_argument("--probe-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="seconds the probe may run (default 600)")
    p = _backup_parser(commands, "verify", parents=[common],
                       help="GENERATION: re-read it and name every track that no longer matches its receipt "
                            "(at the secondary)")
    p.add_argument("generation", metavar="GENERATION")


def _backup_parser(commands: Any, action: str, **kw: Any) -> argparse.ArgumentParser:
    """The command ``backup-ACTION`` that ``backup ACTION`` is parsed as, shown to users
    (help, usage) as ``backup ACTION``."""
    parser: argparse.ArgumentParser = commands.add_parser(f"backup-{action}", prog=f"{PROG} backup {action}", **kw)
    commands._choices_actions[-1].metavar = f"backup {action}"  # the line of the command list in --help
    return parser


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """``90``, ``30s``, ``15m``, ``1h30m``, ``1d``, ``1w`` -> seconds."""
    value = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected e.g. 30s, 15m, 1h30m, 1d")
    return float(sum(float(n) * _UNITS[u] for n, u in parts))


def _backup_action(argv: list[str]) -> list[str]:
    """``backup schedule ...`` -> ``backup-schedule ...`` (a pair may not be named like an action)."""
    for i, word in enumerate(argv[:-1]):
        if word == "backup" and (i == 0 or argv[i - 1] not in _GLOBAL_VALUED):
            if argv[i + 1] in BACKUP_ACTIONS:
                return [*argv[:i], f"backup-{argv[i + 1]}", *argv[i + 2:]]
            break
    return argv


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="block until the pair is DUPLEX, showing progress")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait: give up after this many seconds")


def _sequence(text: str) -> int:
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"invalid sequence number {text!r}: expected a non-negative integer")
    if int(text) > UINT64_MAX:
        raise argparse.ArgumentTypeError(f"sequence number {text} is above the limit {UINT64_MAX}")
    return int(text)


def _system_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid system id {text!r}: expected a non-negative integer")
    if value > UINT64_MAX:
        raise argparse.ArgumentTypeError(f"system id {text} is above the limit {UINT64_MAX}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; usage errors exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(_backup_action(list(sys.argv[1:] if argv is None else argv)))
    if not args.server and args.command not in LOCAL_COMMANDS:
        parser.error(f"no server: pass --server HOST:PORT or set {ENV_SERVER}")
    return args


#: The largest number a host API field carries (uint64).
UINT64_MAX = (1 << 64) - 1

#: Options that take a size string, checked before any connection is made.
SIZE_OPTIONS = ("size", "track_size", "offset", "length")


def resolve_sizes(args: argparse.Namespace) -> None:
    """Replace every size option of ``args`` by its value in bytes."""
    for attr in SIZE_OPTIONS:
        text = getattr(args, attr, None)
        if isinstance(text, str):
            flag = "--" + attr.replace("_", "-")
            try:
                value = parse_size(text)
            except SplitmirrorError as err:
                raise SplitmirrorError(f"{flag}: {err.message}") from None
            if value > UINT64_MAX:
                raise OutOfRange(f"{flag} {text}: {value} bytes is above the limit of the host API, "
                                 f"{UINT64_MAX} bytes (16 EiB - 1)")
            setattr(args, attr, value)
