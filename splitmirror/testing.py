"""Real ``primaryd``/``secondaryd`` processes on loopback, for tests, benchmarks and the demo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


#: Ports handed to daemons come from below the kernel's ephemeral range
#: (32768-60999 by default), so an outgoing connection of another test can
#: never take a port between the moment it is chosen and a daemon binding
#: it again after a restart.  Each pytest-xdist worker has its own slice.
_PORTS_LOW, _PORTS_HIGH = 10000, 32000
_next_port: int | None = None


def _port_slice() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    slices = 8
    width = (_PORTS_HIGH - _PORTS_LOW) // slices
    low = _PORTS_LOW + (index % slices) * width
    return low, low + width


def free_port() -> int:
    """A loopback port nothing listens on, outside the ephemeral range."""
    global _next_port
    low, high = _port_slice()
    if _next_port is None or not low <= _next_port < high:
        # Different processes of one worker (benches, the demo) start apart.
        _next_port = low + (os.getpid() * 7919) % (high - low)
    for _ in range(high - low):
        port = _next_port
        _next_port = low + (_next_port + 1 - low) % (high - low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


class Site:
    """One storage daemon process with its data directory and ports."""

    def __init__(self, role: str, system_id: int, base: Path, link_timeout: float = 2.0,
                 auto_resync: bool = True, nbd: bool = False, async_queue: str = "",
                 tls_dir: Path | None = None, identity: str = "admin", metrics: bool = False) -> None:
        self.role = role
        self.system_id = system_id
        self.data_dir = base / f"{role}-{system_id}"
        self.listen_port = free_port()
        self.peer_port = free_port()
        #: The replication data port (0: --data off, peers replicate over gRPC).
        self.data_port = free_port()
        self.nbd_port = free_port() if nbd else 0
        #: Prometheus metrics at http(s)://127.0.0.1:PORT/metrics (0: off).
        self.metrics_port = free_port() if metrics else 0
        self.link_timeout = link_timeout
        self.auto_resync = auto_resync
        self.async_queue = async_queue
        #: Mutual TLS (a directory made by ``splitmirror certs init``) and the
        #: client identity :meth:`cli` and the health check use.
        self.tls_dir = tls_dir
        self.identity = identity
        self.extra_args: list[str] = []
        self.peers: dict[int, int] = {}
        #: Where this site reaches each peer (a fault-injection proxy may sit between).
        self.peer_addresses: dict[int, str] = {}
        #: Where this site reaches each peer's data port (a proxy), when not at the peer's own.
        self.peer_data_addresses: dict[int, str] = {}
        self.log_path = base / f"{role}-{system_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    @property
    def interconnect(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    @property
    def data_address(self) -> str:
        return f"127.0.0.1:{self.data_port}"

    def peer_with(self, other: Site) -> None:
        self.peers[other.system_id] = other.peer_port
        other.peers[self.system_id] = self.peer_port

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", f"{self.role}d", "--system-id", str(self.system_id),
                "--data-dir", str(self.data_dir), "--listen", self.address,
                "--interconnect", self.interconnect, "--link-timeout", str(self.link_timeout),
                "--auto-resync", "on" if self.auto_resync else "off"]
        for sid, port in sorted(self.peers.items()):
            argv += ["--peer", f"{sid}={self.peer_addresses.get(sid, f'127.0.0.1:{port}')}"]
        for sid, address in sorted(self.peer_data_addresses.items()):
            argv += ["--peer-data", f"{sid}={address}"]
        argv += ["--data", self.data_address if self.data_port else "off"]
        if self.async_queue:
            argv += ["--async-queue", self.async_queue]
        if self.tls_dir is not None:
            argv += ["--tls-dir", str(self.tls_dir)]
        argv += self.extra_args
        if self.nbd_port:
            argv += ["--nbd", f"127.0.0.1:{self.nbd_port}"]
        if self.metrics_port:
            argv += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
        return argv

    def start(self, timeout: float = 30.0) -> float:
        """Start and wait until the health service says SERVING; returns seconds taken.

        The wait is generous: ``make test`` runs test files in parallel on a
        machine that may be loaded, and a slow start is not a failure."""
        started = time.monotonic()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        deadline = started + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.role}d exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{self.role}d did not become healthy:\n{self.log()}")

    def channel(self, identity: str | None = None) -> grpc.Channel:
        """A blocking channel to the host API (TLS with ``identity``'s certificate when configured)."""
        if self.tls_dir is None:
            return grpc.insecure_channel(self.address)
        who = identity or self.identity
        stem = who if who.isdecimal() else f"client-{who}"
        creds = grpc.ssl_channel_credentials((self.tls_dir / "ca.pem").read_bytes(),
                                             (self.tls_dir / f"{stem}.key").read_bytes(),
                                             (self.tls_dir / f"{stem}.pem").read_bytes())
        return grpc.secure_channel(self.address, creds, options=[("grpc.ssl_target_name_override", "splitmirror")])

    def stop(self) -> int:
        """SIGTERM and wait (a clean shutdown)."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SPLITMIRROR_SERVER=self.address)
        if self.tls_dir is not None:
            env.update(SPLITMIRROR_TLS_DIR=str(self.tls_dir), SPLITMIRROR_IDENTITY=self.identity)
        result = subprocess.run([sys.executable, "-m", "client", *args], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"splitmirror {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli("--json", *args).stdout)

    def pair_row(self, pair: str) -> dict[str, Any]:
        rows: list[dict[str, Any]] = self.cli_json("pair", "display", pair)
        return rows[0]


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_status(site: Site, pair: str, statuses: Sequence[str], timeout: float = 20.0) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: (row := site.pair_row(pair))["status"] in statuses and row, timeout, 0.2,
        f"pair {pair} on {site.role} to reach {'/'.join(statuses)}")
    return result
