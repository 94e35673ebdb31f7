"""Daemon settings from command-line flags and an optional TOML file.

Flags win over the file.  Every mistake is reported as one
:class:`~splitmirror.errors.InvalidArgument` naming the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from .errors import InvalidArgument
from .sizes import parse_size


@dataclasses.dataclass
class DaemonConfig:
    role: str
    system_id: int
    data_dir: Path
    listen: str
    interconnect: str
    peers: dict[int, str] = dataclasses.field(default_factory=dict)
    nbd: str = ""
    link_timeout: float = 5.0
    auto_resync: bool = True
    async_queue_bytes: int = 256 << 20
    pre_restore_hook: str = ""
    post_restore_hook: str = ""
    log_level: str = "INFO"


def parse_address(setting: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdecimal() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"{setting}: {value!r} is not HOST:PORT")
    return value


def parse_peer(value: str) -> tuple[int, str]:
    sid, sep, address = value.partition("=")
    if not sep or not sid.strip().isdecimal():
        raise InvalidArgument(f"--peer: {value!r} is not SYSTEM_ID=HOST:PORT")
    return int(sid), parse_address("--peer", address.strip())


def build_parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{role}d", description=f"splitmirror {role} storage daemon")
    parser.add_argument("--system-id", type=int, help="serial of this storage system")
    parser.add_argument("--data-dir", help="volumes and copy table live here")
    parser.add_argument("--listen", help="HOST:PORT of the host API (gRPC)")
    parser.add_argument("--interconnect", help="HOST:PORT of the peer-facing interconnect service")
    parser.add_argument("--peer", action="append", default=[], metavar="ID=HOST:PORT",
                        help="a peer system's interconnect address (repeatable)")
    parser.add_argument("--nbd", help="HOST:PORT of the NBD server (one export per volume)")
    parser.add_argument("--link-timeout", type=float, help="seconds before a silent peer counts as lost")
    parser.add_argument("--auto-resync", choices=["on", "off"], help="resync suspended pairs when the peer returns")
    parser.add_argument("--async-queue", metavar="SIZE",
                        help="bytes an async pair may queue before it suspends (default 256M)")
    parser.add_argument("--pre-restore-hook", metavar="COMMAND",
                        help="shell command run before a restore fences a PVOL (e.g. stop the application)")
    parser.add_argument("--post-restore-hook", metavar="COMMAND",
                        help="shell command run after a restore unfences a PVOL (e.g. restart, recover)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--config", help="TOML file with the same settings (flags win)")
    return parser


def _from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise InvalidArgument(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {path}: {exc}") from None
    known = ({f.name for f in dataclasses.fields(DaemonConfig)} | {"async_queue"}) - {"role", "async_queue_bytes"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgument(f"config file {path}: unknown setting {unknown[0]!r}")
    return data


def load_config(role: str, argv: list[str] | None = None) -> DaemonConfig:
    args = build_parser(role).parse_args(argv)
    file = _from_file(args.config) if args.config else {}
    src = args.config or "config"

    def pick(name: str, flag: Any, kind: type, default: Any = None) -> Any:
        value = flag if flag is not None else file.get(name, default)
        if value is None:
            raise InvalidArgument(f"missing setting {name!r} (flag --{name.replace('_', '-')} or {src})")
        if kind is bool and isinstance(value, str):
            value = value == "on"
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            if kind is float and isinstance(value, int):
                return float(value)
            raise InvalidArgument(f"setting {name!r}: expected {kind.__name__}, got {value!r}")
        return value

    peers: dict[int, str] = {}
    raw_peers = file.get("peers", {})
    if isinstance(raw_peers, dict):
        for sid, address in raw_peers.items():
            peers.update([parse_peer(f"{sid}={address}")])
    elif isinstance(raw_peers, list):
        peers.update(parse_peer(str(p)) for p in raw_peers)
    else:
        raise InvalidArgument(f"setting 'peers': expected a table of ID = \"HOST:PORT\", got {raw_peers!r}")
    peers.update(parse_peer(p) for p in args.peer)

    system_id = pick("system_id", args.system_id, int)
    if system_id <= 0:
        raise InvalidArgument(f"setting 'system_id': must be a positive integer, got {system_id}")
    timeout = pick("link_timeout", args.link_timeout, float, 5.0)
    if timeout <= 0:
        raise InvalidArgument(f"setting 'link_timeout': must be positive, got {timeout}")
    nbd = pick("nbd", args.nbd, str, "")
    queue = pick("async_queue", args.async_queue, str, "256M")
    queue_bytes = parse_size(queue)
    if queue_bytes <= 0:
        raise InvalidArgument(f"setting 'async_queue': must be positive, got {queue!r}")
    return DaemonConfig(
        role=role,
        system_id=system_id,
        data_dir=Path(pick("data_dir", args.data_dir, str)),
        listen=parse_address("listen", pick("listen", args.listen, str)),
        interconnect=parse_address("interconnect", pick("interconnect", args.interconnect, str)),
        peers=peers,
        nbd=parse_address("nbd", nbd) if nbd else "",
        link_timeout=timeout,
        auto_resync=pick("auto_resync", args.auto_resync, bool, True),
        async_queue_bytes=queue_bytes,
        pre_restore_hook=pick("pre_restore_hook", args.pre_restore_hook, str, ""),
        post_restore_hook=pick("post_restore_hook", args.post_restore_hook, str, ""),
        log_level=pick("log_level", args.log_level, str, "INFO"),
    )
