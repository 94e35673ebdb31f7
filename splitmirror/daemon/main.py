"""What ``primaryd`` and ``secondaryd`` share: start, serve, stop cleanly.

The daemons are thin: they parse their settings and call :func:`main`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

import grpc

from ..datapath.system import StorageSystem
from ..errors import SplitmirrorError
from ..observe.events import EventLog
from ..observe.iometer import IoMeter
from ..pairs.manager import PairManager
from ..pairs.settings import Settings
from ..ports.access import AccessPolicy, load_tokens
from ..ports.hostapi import HostApiServicer
from ..ports.interconnect import InterconnectServicer
from ..ports.malformed import MalformedRequests
from ..procedures.backup import BackupManager
from ..procedures.check import GenerationChecker
from ..procedures.hooks import BackupHooks
from ..procedures.receipts import Receipts
from ..procedures.restore import RestoreManager
from ..procedures.schedule import BackupScheduler
from ..procedures.verified_reads import VerifiedReads
from ..replication.link import RECONNECT_OPTIONS, PeerLink, message_options
from ..storage.files import OPEN_FILES
from ..tls import TlsFiles
from ..v1 import host_pb2, host_pb2_grpc, interconnect_pb2, interconnect_pb2_grpc
from .config import DaemonConfig, load_config
from .discovery import PortServices
from .heap import fix_malloc_thresholds
from .limits import nbd_connection_cap, raise_nofile, volume_file_cap
from .startup import DataDirLock, check_addresses, check_tls
from .wrong_port import wrong_port_handlers

log = logging.getLogger("splitmirror.daemon")

def server_options(max_message: int) -> list[tuple[str, int]]:
    """Limits every server applies before it allocates a message."""
    return [*message_options(max_message), *RECONNECT_OPTIONS, ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 1024), ("grpc.max_metadata_size", 16 << 10)]


def peer_keepalive(link_timeout: float) -> list[tuple[str, int]]:
    """Server pings on the interconnect: the streams of a peer that vanished
    without closing its connection (power loss, black-holed network) end
    within about two link timeouts instead of staying open forever."""
    ms = max(1000, round(link_timeout * 1000))
    return [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.system = StorageSystem(config.system_id, config.role, config.data_dir)
        self.links: dict[int, PeerLink] = {}
        self.manager = PairManager(self.system, self.links,
                                   Settings(link_timeout=config.link_timeout, auto_resync=config.auto_resync,
                                            async_queue_bytes=config.async_queue_bytes))
        # The procedures sit above the pairs layer: built here, handed to the
        # servicers, and reached by the mirror end only through its marker handler.
        self.backups = BackupManager(self.manager)
        self.restores = RestoreManager(self.manager, self.backups, config.pre_restore_hook,
                                       config.post_restore_hook)
        self.manager.mirror_end.marker_handler = self.backups.apply_marker
        self.backups.hooks = BackupHooks(config.pre_backup_hook, config.post_backup_hook, config.backup_hook_timeout)
        self.schedules = BackupScheduler(self.backups)
        self.checker = GenerationChecker(self.backups)
        self.events = EventLog(self.system.table)
        self.system.events = self.events
        #: Host I/O is measured only when metrics are served.
        self.meter = IoMeter() if config.metrics else None
        self.metrics: object | None = None
        #: Health and reflection of the host API port and of the interconnect port.
        self.ports: list[PortServices] = []
        options = server_options(config.max_message_bytes)
        self.tls = TlsFiles.load(Path(config.tls_dir), str(config.system_id)) if config.tls_dir else None
        self.receipts = Receipts(self.backups, self.tls.key if self.tls else None,
                                 self.tls.cert if self.tls else None)
        self.backups.on_split = self.receipts.split
        self.backups.before_reuse = self.receipts.settled
        self.restores.receipts = self.receipts
        # Host reads of backup generations are checked against their receipts, track by track.
        self.restores.reads = self.system.read_check = VerifiedReads(self.receipts)
        tokens = load_tokens(Path(config.token_file)) if config.token_file else {}
        if tokens and self.tls is None:
            log.warning("bearer tokens configured without --tls-dir: they cross the network in clear text")
        self.policy = AccessPolicy(self.tls is not None, tokens, config.host_volumes, config.rate_limit,
                                   config.rate_burst, max_inflight=max(1, config.max_concurrent_rpcs // 4))
        self.host_server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs,
                                           interceptors=[MalformedRequests()])
        self.peer_server = grpc.aio.server(options=[*options, *peer_keepalive(config.link_timeout)],
                                           interceptors=[MalformedRequests()])
        self.nbd: object | None = None
        self.data: object | None = None
        self.interconnect: InterconnectServicer | None = None
        #: The soft open-file limit, raised to the hard one at start.
        self.nofile = raise_nofile()
        self.nbd_cap = nbd_connection_cap(config.nbd_max_connections, self.nofile) if config.nbd else 0
        OPEN_FILES.set_limit(volume_file_cap(self.nofile, self.nbd_cap))
        log.info("open-file limit %d: at most %d volume files open at once (the others opened on use)",
                 self.nofile, OPEN_FILES.limit)
        self.stopping = asyncio.Event()
        #: True once every port serves: a failure before that is a start-up failure (exit 2).
        self.started = False
        self._opened = False

    async def start(self) -> None:
        cfg = self.config
        await self.system.open()
        self._opened = True
        await self.events.open()
        await self.backups.load()
        await self.schedules.load()
        await self.checker.load()
        await self.receipts.load()
        for peer, address in cfg.peers.items():
            recovery = self.manager.recovery
            self.links[peer] = PeerLink(cfg.system_id, cfg.role, peer, address, cfg.link_timeout,
                                        recovery.on_peer_up, recovery.on_peer_down, tls=self.tls,
                                        max_message=cfg.max_message_bytes, data_address=cfg.peer_data.get(peer, ""))
            self.links[peer].on_hello = recovery.on_hello
        await self.manager.start()

        host_pb2_grpc.add_HostApiServicer_to_server(
            HostApiServicer(self.manager, self.backups, self.restores, self.policy, self.events, self.meter,
                            self.schedules, self.checker, self.receipts),
            self.host_server)
        self.interconnect = InterconnectServicer(self.manager, self.backups, self.restores, cfg.role,
                                                 tls=self.tls is not None, checker=self.checker)
        interconnect_pb2_grpc.add_InterconnectServicer_to_server(self.interconnect, self.peer_server)
        on_interconnect, on_host_api = wrong_port_handlers(cfg.system_id, cfg.role)
        self.peer_server.add_generic_rpc_handlers((on_interconnect,))
        self.host_server.add_generic_rpc_handlers((on_host_api,))
        self.ports = [PortServices(self.host_server, host_pb2.DESCRIPTOR.services_by_name["HostApi"].full_name),
                      PortServices(self.peer_server,
                                   interconnect_pb2.DESCRIPTOR.services_by_name["Interconnect"].full_name)]
        if self.tls is None:
            listen_port = self.host_server.add_insecure_port(cfg.listen)
            peer_port = self.peer_server.add_insecure_port(cfg.interconnect)
        else:
            pair = [(self.tls.key, self.tls.cert)]
            # Clients with a bearer token need no certificate; peers always do.
            host_creds = grpc.ssl_server_credentials(pair, root_certificates=self.tls.ca,
                                                     require_client_auth=not self.policy.tokens)
            peer_creds = grpc.ssl_server_credentials(pair, root_certificates=self.tls.ca, require_client_auth=True)
            listen_port = self.host_server.add_secure_port(cfg.listen, host_creds)
            peer_port = self.peer_server.add_secure_port(cfg.interconnect, peer_creds)
        await self.peer_server.start()
        data_text = await self._start_data() if cfg.data else ""
        await self.host_server.start()
        for port in self.ports:
            await port.set(serving=True)
        nbd_text = ""
        if cfg.nbd:
            nbd_text = await self._start_nbd()
        if cfg.metrics:
            nbd_text += await self._start_metrics()
        for link in self.links.values():
            link.start()
        self.schedules.start()
        log.info("%sd system %d ready: host API port %d, interconnect port %d%s%s, peers %s, %s", cfg.role,
                 cfg.system_id, listen_port, peer_port, data_text, nbd_text,
                 ", ".join(f"{p}={a}" for p, a in sorted(cfg.peers.items())) or "none",
                 f"mutual TLS from {cfg.tls_dir}" if self.tls else "no TLS")
        self.started = True

    async def abort(self) -> None:
        """Undo a start that failed part way: no port left open, the data closed as it was found."""
        with contextlib.suppress(Exception):
            await self.schedules.stop()
        for server in (self.metrics, self.nbd, self.data):
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.close()  # type: ignore[attr-defined]
        for grpc_server in (self.host_server, self.peer_server):
            with contextlib.suppress(Exception):
                await grpc_server.stop(None)
        for link in self.links.values():
            with contextlib.suppress(Exception):
                await link.close()
        if self._opened:
            with contextlib.suppress(Exception):
                await self.events.flush()
            # An unclean start stays unclean: its bitmaps have not been rebuilt.
            with contextlib.suppress(Exception):
                if self.system.clean_start:
                    await self.system.close()
                else:
                    await self.system.table.close()

    async def _start_nbd(self) -> str:
        from ..ports.nbdexport import NbdLimits, start_nbd

        cfg = self.config
        limits = NbdLimits(self.nbd_cap, cfg.nbd_max_per_client, cfg.nbd_handshake_timeout)
        server, port = await start_nbd(self.system, cfg.nbd, tls=self.tls, allow=cfg.nbd_allow, policy=self.policy,
                                       meter=self.meter, limits=limits)
        self.nbd = server
        self.system.nbd_port = port
        return f", NBD port {port}"

    async def _start_data(self) -> str:
        from ..ports.dataport import DataLimits, DataServer

        cfg = self.config
        assert self.interconnect is not None
        limits = DataLimits(cfg.data_max_connections, cfg.data_max_per_peer, cfg.data_handshake_timeout,
                            cfg.data_max_frame, cfg.data_inflight, cfg.data_pair_inflight)
        server = DataServer(self.interconnect, lambda: set(self.links), limits, self.tls, cfg.link_timeout)
        port = await server.start(cfg.data)
        self.data = server
        self.interconnect.data_port = port
        return f", data port {port}"

    async def _start_metrics(self) -> str:
        from prometheus_client import GCCollector, ProcessCollector
        from prometheus_client.registry import CollectorRegistry

        from ..observe.metrics import SystemCollector
        from ..ports.metrics_http import MetricsServer

        registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        nbd = self.nbd
        registry.register(SystemCollector(self.system, self.links, self.events, self.backups, self.meter,
                                          nbd.export_connections if nbd is not None else None))  # type: ignore[attr-defined]
        tls = self.tls.server_ssl_context() if self.tls is not None else None
        server = MetricsServer(registry, self.config.metrics, tls, self.policy.scrape_refusal if tls else None)
        port = await server.start()
        self.metrics = server
        self.system.metrics_port = port
        return f", metrics port {port}{' (HTTPS)' if tls else ''}"

    async def stop(self) -> None:
        log.info("%sd system %d stopping", self.config.role, self.config.system_id)
        for port in self.ports:
            await port.set(serving=False)
        self.events.close_followers()
        await self.schedules.stop()
        if self.metrics is not None:
            await self.metrics.close()  # type: ignore[attr-defined]
        if self.nbd is not None:
            await self.nbd.close()  # type: ignore[attr-defined]
        await self.host_server.stop(grace=5)
        if self.interconnect is not None:
            # Peers hear it from us (an INFO line there) instead of finding the link lost.
            self.interconnect.stopping = True
            await asyncio.gather(*(link.goodbye() for link in self.links.values()))
        await self.manager.stop()
        if self.data is not None:
            await self.data.close()  # type: ignore[attr-defined]
        await self.peer_server.stop(grace=2)
        for link in self.links.values():
            await link.close()
        await self.events.flush()
        await self.receipts.save_marks()
        await self.system.close()
        log.info("%sd system %d stopped cleanly", self.config.role, self.config.system_id)


class StartFailed(Exception):
    """The daemon could not start; its one-line reason."""


async def serve(config: DaemonConfig) -> None:
    try:
        daemon = Daemon(config)
    except SplitmirrorError as exc:
        raise StartFailed(exc.message) from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    started = time.monotonic()
    try:
        await daemon.start()
    except BaseException as exc:
        await daemon.abort()
        if isinstance(exc, SplitmirrorError):
            raise StartFailed(exc.message) from None
        if isinstance(exc, (OSError, RuntimeError)):
            raise StartFailed(f"cannot start: {exc}") from None
        raise
    log.debug("started in %.2fs", time.monotonic() - started)
    await daemon.stopping.wait()
    await daemon.stop()


def run_loop(coro_factory: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(coro_factory())  # type: ignore[operator]
    else:
        uvloop.run(coro_factory())  # type: ignore[operator]


def main(role: str, argv: list[str] | None = None) -> int:
    """Exit status 2 with one line on stderr for any start-up failure, 1 for a failure while serving."""
    lock: DataDirLock | None = None
    try:
        config = load_config(role, argv)
        lock = DataDirLock(config.data_dir)
        lock.acquire()
        check_addresses(config)
        check_tls(config)
    except SplitmirrorError as exc:
        if lock is not None:
            lock.release()
        print(f"{role}d: error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format=f"%(asctime)s {role}d[{config.system_id}] %(levelname)s %(name)s: %(message)s")
    fix_malloc_thresholds()
    try:
        run_loop(lambda: serve(config))
    except StartFailed as exc:
        print(f"{role}d: error: {exc}", file=sys.stderr)
        return 2
    except SplitmirrorError as exc:
        log.error("%s", exc.message)
        return 1
    except OSError as exc:
        log.error("stopped: %s", exc)
        return 1
    finally:
        lock.release()
    return 0
