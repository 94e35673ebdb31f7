"""Daemon settings from command-line flags and an optional TOML file.

Flags win over the file.  Every mistake is reported as one
:class:`~splitmirror.errors.InvalidArgument` naming the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import tomllib
from pathlib import Path
from typing import Any

from ..addresses import is_loopback, parse_address
from ..errors import InvalidArgument
from ..sizes import parse_size


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
    #: Shell commands run at the primary around each backup point (see procedures/hooks.py).
    pre_backup_hook: str = ""
    post_backup_hook: str = ""
    backup_hook_timeout: float = 30.0
    log_level: str = "INFO"
    #: Directory made by ``splitmirror certs init``; "" runs without TLS.
    tls_dir: str = ""
    #: ``NAME ROLE TOKEN`` lines: bearer tokens for clients without certificates.
    token_file: str = ""
    #: Largest gRPC message received or sent (checked on the length prefix, before allocation).
    max_message_bytes: int = 64 << 20
    #: Host API requests per second per client (0: unlimited), and the burst allowed.
    rate_limit: float = 10_000.0
    rate_burst: float = 20_000.0
    #: Host API calls served at once (more are refused with RESOURCE_EXHAUSTED).
    max_concurrent_rpcs: int = 1024
    #: Export name (or "*") -> client networks allowed to attach it over NBD.
    nbd_allow: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: Host identity -> volume name patterns it may do I/O on (absent: any).
    host_volumes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: NBD connections served at once, in all and per client address; seconds a handshake may take.
    nbd_max_connections: int = 512
    nbd_max_per_client: int = 64
    nbd_handshake_timeout: float = 10.0
    #: HOST:PORT of the Prometheus metrics (HTTP; HTTPS with --tls-dir); "" serves none.
    metrics: str = ""
    #: HOST:PORT of the replication data port (peers' write streams); "" serves none.
    data: str = ""
    #: Where a peer's data port is reached when not at its interconnect host and advertised port (NAT, proxies).
    peer_data: dict[int, str] = dataclasses.field(default_factory=dict)
    #: Data port limits: connections in all and per peer, seconds to finish the handshake,
    #: largest frame, bytes received and not yet applied per connection and per pair.
    data_max_connections: int = 64
    data_max_per_peer: int = 4
    data_handshake_timeout: float = 10.0
    data_max_frame: int = 64 << 20
    data_inflight: int = 256 << 20
    data_pair_inflight: int = 128 << 20


def parse_nbd_address(value: str) -> str:
    """``PORT`` alone means loopback: NBD is not exposed unless asked."""
    if value.isdecimal():
        value = f"127.0.0.1:{value}"
    return parse_address("nbd", value)


def parse_metrics_address(value: str) -> str:
    """``PORT`` alone means loopback: metrics are not exposed unless asked."""
    if value.isdecimal():
        value = f"127.0.0.1:{value}"
    return parse_address("metrics", value)


def parse_data_address(value: str, interconnect: str) -> str:
    """``off``: no data port; ``auto`` (the default): the interconnect's host, a
    port the system picks (peers learn it from the keepalive); ``PORT`` or
    ``HOST:PORT``: that one (what a firewall or a container must open)."""
    host = interconnect.rpartition(":")[0]
    if value == "off":
        return ""
    if value == "auto":
        return f"{host}:0"
    if value.isdecimal():
        value = f"{host}:{value}"
    return parse_address("data", value)


def _named_list(setting: str, value: str, item: str) -> tuple[str, list[str]]:
    """``NAME=ITEM[,ITEM...]`` -> (name, items)."""
    name, sep, items = value.partition("=")
    if not sep or not name.strip():
        raise InvalidArgument(f"{setting}: {value!r} is not NAME={item}[,{item}...]")
    return name.strip(), [i.strip() for i in items.split(",") if i.strip()]


def parse_networks(setting: str, value: str) -> tuple[str, list[str]]:
    """``NAME=CIDR[,CIDR...]`` -> (name, networks), each network checked."""
    name, out = _named_list(setting, value, "ADDRESS")
    for net in out:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise InvalidArgument(f"{setting}: {net!r} is not an address or network") from None
    return name, out


def _patterns(setting: str, value: str) -> tuple[str, list[str]]:
    return _named_list(setting, value, "PATTERN")


def _table(name: str, raw: Any, parse: Any) -> dict[str, list[str]]:
    """A TOML table of NAME = [values] (or "a,b"), through ``parse``."""
    if not isinstance(raw, dict):
        raise InvalidArgument(f"setting {name!r}: expected a table of NAME = [...], got {raw!r}")
    out: dict[str, list[str]] = {}
    for key, values in raw.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"setting {name!r}: {key!r} must be a list of strings")
        k, v = parse(name, f"{key}={','.join(values)}")
        out[k] = v
    return out


def parse_peer(value: str) -> tuple[int, str]:
    sid, sep, address = value.partition("=")
    if not sep or not sid.strip().isdecimal():
        raise InvalidArgument(f"--peer: {value!r} is not SYSTEM_ID=HOST:PORT")
    return int(sid), parse_address("--peer", address.strip())


def refuse_open_ports_in_token_mode(interconnect: str, nbd: str, peers: dict[int, str], data: str = "") -> None:
    """Token mode (a token file, no TLS) authenticates host API callers only:
    NBD clients and peers prove nothing.  So NBD, the interconnect and the
    peers it talks to must stay on this host (loopback), where only local
    users reach them; anything wider needs --tls-dir (mutual TLS)."""
    why = ("with --token-file and no --tls-dir, NBD and the interconnect authenticate nobody; "
           "listen on loopback (127.0.0.1) or add --tls-dir")
    for setting, address in (("interconnect", interconnect), ("nbd", nbd), ("data", data),
                             *((f"peer {sid}", a) for sid, a in sorted(peers.items()))):
        if address and not is_loopback(address):
            raise InvalidArgument(f"setting {setting!r}: {address} is not a loopback address: {why}")


def build_parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{role}d", description=f"splitmirror {role} storage daemon")
    parser.add_argument("--system-id", type=int, help="serial of this storage system")
    parser.add_argument("--data-dir", help="volumes and copy table live here")
    parser.add_argument("--listen", help="HOST:PORT of the host API (gRPC)")
    parser.add_argument("--interconnect", help="HOST:PORT of the peer-facing interconnect service")
    parser.add_argument("--peer", action="append", default=[], metavar="ID=HOST:PORT",
                        help="a peer system's interconnect address (repeatable)")
    parser.add_argument("--nbd", help="HOST:PORT of the NBD server (one export per volume)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http(s)://HOST:PORT/metrics (PORT alone: loopback; "
                             "HTTPS with a viewer client certificate when --tls-dir is given)")
    parser.add_argument("--link-timeout", type=float, help="seconds before a silent peer counts as lost")
    parser.add_argument("--auto-resync", choices=["on", "off"], help="resync suspended pairs when the peer returns")
    parser.add_argument("--async-queue", metavar="SIZE",
                        help="bytes an async pair may queue before it suspends (default 256M)")
    parser.add_argument("--pre-restore-hook", metavar="COMMAND",
                        help="shell command run before a restore fences a PVOL (e.g. stop the application)")
    parser.add_argument("--post-restore-hook", metavar="COMMAND",
                        help="shell command run after a restore unfences a PVOL (e.g. restart, recover)")
    parser.add_argument("--pre-backup-hook", metavar="COMMAND",
                        help="shell command run before each backup point (e.g. fsfreeze -f, a database "
                             "checkpoint); failing or timing out cancels that backup")
    parser.add_argument("--post-backup-hook", metavar="COMMAND",
                        help="shell command run once the backup point is fixed, also after a failure "
                             "(e.g. fsfreeze -u)")
    parser.add_argument("--backup-hook-timeout", type=float, metavar="SECONDS",
                        help="seconds a backup hook may run (default 30)")
    parser.add_argument("--tls-dir", metavar="DIR",
                        help="mutual TLS on the interconnect, host API and NBD with the certificates "
                             "made by 'splitmirror certs init DIR'")
    parser.add_argument("--token-file", metavar="FILE",
                        help="bearer tokens for host API clients without certificates (NAME ROLE TOKEN lines)")
    parser.add_argument("--max-message", metavar="SIZE", help="largest gRPC message accepted (default 64M)")
    parser.add_argument("--rate-limit", type=float, metavar="N",
                        help="host API requests per second per client, 0 for no limit (default 10000)")
    parser.add_argument("--rate-burst", type=float, metavar="N", help="requests a client may burst (default 2x rate)")
    parser.add_argument("--max-concurrent-rpcs", type=int, metavar="N",
                        help="host API calls served at once (default 1024)")
    parser.add_argument("--nbd-allow", action="append", default=[], metavar="EXPORT=NET[,NET]",
                        help="client addresses allowed to attach an NBD export ('*' for every export; repeatable)")
    parser.add_argument("--nbd-max-connections", type=int, metavar="N",
                        help="NBD connections served at once (default 512; lowered to fit the open-file limit)")
    parser.add_argument("--nbd-max-per-client", type=int, metavar="N",
                        help="NBD connections served at once per client address (default 64)")
    parser.add_argument("--nbd-handshake-timeout", type=float, metavar="SECONDS",
                        help="seconds an NBD client has to finish its handshake, TLS included (default 10)")
    parser.add_argument("--data", metavar="HOST:PORT|PORT|auto|off",
                        help="replication data port: peers' write streams on one TCP (TLS) connection per peer "
                             "(default auto: the interconnect's host, a free port advertised to peers; off: "
                             "peers replicate over the gRPC interconnect)")
    parser.add_argument("--peer-data", action="append", default=[], metavar="ID=HOST:PORT",
                        help="where a peer's data port is reached, when not at its interconnect host and "
                             "advertised port (NAT, a proxy; repeatable)")
    parser.add_argument("--data-max-connections", type=int, metavar="N",
                        help="data connections served at once (default 64)")
    parser.add_argument("--data-max-per-peer", type=int, metavar="N",
                        help="data connections one peer system may hold at once (default 4)")
    parser.add_argument("--data-handshake-timeout", type=float, metavar="SECONDS",
                        help="seconds a data connection has to finish TLS and HELLO (default 10)")
    parser.add_argument("--data-max-frame", metavar="SIZE", help="largest data frame accepted (default 64M)")
    parser.add_argument("--data-inflight", metavar="SIZE",
                        help="bytes received and not yet applied per data connection before it stops being "
                             "read (default 256M)")
    parser.add_argument("--data-pair-inflight", metavar="SIZE",
                        help="bytes received and not yet applied per pair (default 128M)")
    parser.add_argument("--host-volumes", action="append", default=[], metavar="NAME=PATTERN[,PATTERN]",
                        help="volumes a host identity may do I/O on (repeatable)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--config", help="TOML file with the same settings (flags win)")
    return parser


def _from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise InvalidArgument(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"--config {path}: not valid TOML: {exc}") from None
    known = ({f.name for f in dataclasses.fields(DaemonConfig)} | {"async_queue", "max_message"}) - {
        "role", "async_queue_bytes", "max_message_bytes"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgument(f"--config {path}: unknown setting {unknown[0]!r}")
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
    raw_data = file.get("peer_data", {})
    if not isinstance(raw_data, dict):
        raise InvalidArgument(f"setting 'peer_data': expected a table of ID = \"HOST:PORT\", got {raw_data!r}")
    peer_data = dict(parse_peer(f"{sid}={address}") for sid, address in raw_data.items())
    peer_data.update(parse_peer(p) for p in args.peer_data)

    system_id = pick("system_id", args.system_id, int)
    if system_id <= 0:
        raise InvalidArgument(f"setting 'system_id': must be a positive integer, got {system_id}")
    timeout = pick("link_timeout", args.link_timeout, float, 5.0)
    if timeout <= 0:
        raise InvalidArgument(f"setting 'link_timeout': must be positive, got {timeout}")
    nbd = pick("nbd", args.nbd, str, "")
    metrics = pick("metrics", args.metrics, str, "")
    queue = pick("async_queue", args.async_queue, str, "256M")
    queue_bytes = parse_size(queue)
    if queue_bytes <= 0:
        raise InvalidArgument(f"setting 'async_queue': must be positive, got {queue!r}")
    max_message = parse_size(pick("max_message", args.max_message, str, "64M"))
    if not 4096 <= max_message <= (1 << 31) - 1:
        raise InvalidArgument(f"setting 'max_message': must be between 4K and 2G-1, got {max_message}")
    rate = pick("rate_limit", args.rate_limit, float, 10_000.0)
    burst = pick("rate_burst", args.rate_burst, float, max(rate * 2, 1.0))
    if rate < 0 or burst < 1:
        raise InvalidArgument(f"settings 'rate_limit'/'rate_burst': must be >= 0 and >= 1, got {rate}/{burst}")
    concurrent = pick("max_concurrent_rpcs", args.max_concurrent_rpcs, int, 1024)
    if concurrent < 1:
        raise InvalidArgument(f"setting 'max_concurrent_rpcs': must be positive, got {concurrent}")
    hook_timeout = pick("backup_hook_timeout", args.backup_hook_timeout, float, 30.0)
    if not 0 < hook_timeout <= 3600:
        raise InvalidArgument(f"setting 'backup_hook_timeout': must be between 0 and 3600 seconds, got {hook_timeout}")
    tls_dir = pick("tls_dir", args.tls_dir, str, "")
    if tls_dir:
        from ..tls import TlsFiles

        try:  # a missing file is a setting mistake: say so now
            TlsFiles.load(Path(tls_dir), str(system_id))
        except InvalidArgument as exc:
            raise InvalidArgument(f"--tls-dir {tls_dir}: {exc.message}") from None
    token_file = pick("token_file", args.token_file, str, "")
    if token_file:
        from ..ports.access import load_tokens

        try:  # an open or doubled token refuses the start, in one line
            load_tokens(Path(token_file))
        except InvalidArgument as exc:
            raise InvalidArgument(f"--token-file {token_file}: {exc.message}") from None
    nbd = parse_nbd_address(nbd) if nbd else ""
    interconnect = parse_address("interconnect", pick("interconnect", args.interconnect, str))
    data = parse_data_address(pick("data", args.data, str, "auto"), interconnect)
    if token_file and not tls_dir:
        refuse_open_ports_in_token_mode(interconnect, nbd, peers, data)
    data_limits = _data_limits(args, pick)
    nbd_allow = _table("nbd_allow", file.get("nbd_allow", {}), parse_networks)
    nbd_allow.update(parse_networks("--nbd-allow", v) for v in args.nbd_allow)
    nbd_limits = (pick("nbd_max_connections", args.nbd_max_connections, int, 512),
                  pick("nbd_max_per_client", args.nbd_max_per_client, int, 64),
                  pick("nbd_handshake_timeout", args.nbd_handshake_timeout, float, 10.0))
    if min(nbd_limits) <= 0:
        raise InvalidArgument(f"settings 'nbd_max_connections'/'nbd_max_per_client'/'nbd_handshake_timeout': "
                              f"must be positive, got {'/'.join(f'{v:g}' for v in nbd_limits)}")
    host_volumes = _table("host_volumes", file.get("host_volumes", {}), _patterns)
    host_volumes.update(_patterns("--host-volumes", v) for v in args.host_volumes)
    return DaemonConfig(
        role=role,
        system_id=system_id,
        data_dir=Path(pick("data_dir", args.data_dir, str)),
        listen=parse_address("listen", pick("listen", args.listen, str)),
        interconnect=interconnect,
        peers=peers,
        nbd=nbd,
        link_timeout=timeout,
        auto_resync=pick("auto_resync", args.auto_resync, bool, True),
        async_queue_bytes=queue_bytes,
        pre_restore_hook=pick("pre_restore_hook", args.pre_restore_hook, str, ""),
        post_restore_hook=pick("post_restore_hook", args.post_restore_hook, str, ""),
        pre_backup_hook=pick("pre_backup_hook", args.pre_backup_hook, str, ""),
        post_backup_hook=pick("post_backup_hook", args.post_backup_hook, str, ""),
        backup_hook_timeout=hook_timeout,
        log_level=pick("log_level", args.log_level, str, "INFO"),
        tls_dir=tls_dir,
        token_file=token_file,
        max_message_bytes=max_message,
        rate_limit=rate,
        rate_burst=burst,
        max_concurrent_rpcs=concurrent,
        nbd_allow=nbd_allow,
        host_volumes=host_volumes,
        metrics=parse_metrics_address(metrics) if metrics else "",
        nbd_max_connections=nbd_limits[0],
        nbd_max_per_client=nbd_limits[1],
        nbd_handshake_timeout=nbd_limits[2],
        data=data,
        peer_data=peer_data,
        **data_limits,
    )


def _data_limits(args: argparse.Namespace, pick: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "data_max_connections": pick("data_max_connections", args.data_max_connections, int, 64),
        "data_max_per_peer": pick("data_max_per_peer", args.data_max_per_peer, int, 4),
        "data_handshake_timeout": pick("data_handshake_timeout", args.data_handshake_timeout, float, 10.0),
    }
    for name, flag, default in (("data_max_frame", args.data_max_frame, "64M"),
                                ("data_inflight", args.data_inflight, "256M"),
                                ("data_pair_inflight", args.data_pair_inflight, "128M")):
        out[name] = parse_size(pick(name, flag, str, default))
    if min(out.values()) <= 0:
        raise InvalidArgument("settings 'data_*': limits must be positive, got "
                              + ", ".join(f"{k}={v:g}" for k, v in out.items()))
    if not 4096 <= out["data_max_frame"] <= (1 << 32) - 1:
        raise InvalidArgument(f"setting 'data_max_frame': must be between 4K and 4G-1, got {out['data_max_frame']}")
    if out["data_pair_inflight"] < out["data_max_frame"]:
        raise InvalidArgument("setting 'data_pair_inflight': must hold at least one frame of 'data_max_frame' "
                              f"({out['data_max_frame']} bytes), got {out['data_pair_inflight']}")
    return out
