#!/usr/bin/env python3
"""Container healthcheck: ask a daemon's gRPC health service (grpc.health.v1).

    splitmirror-healthcheck [HOST:]PORT [SERVICE] [--timeout SECONDS]
                            [--tls-dir DIR [--identity NAME]] [--grpc]

Exit 0 when the service answers SERVING, 1 otherwise, with one line saying
why.  Docker runs this every few seconds in every daemon container, so it
speaks the few HTTP/2 frames of one unary gRPC call with the standard
library alone: it starts in ~20 ms where importing grpcio costs ~300 ms of
CPU per probe.  ``--grpc`` makes the same call through grpcio +
grpc_health instead (for comparison; tests/containers checks that both agree).

With ``--tls-dir`` (a directory made by ``splitmirror certs init``) the
probe speaks mutual TLS like the CLI: it trusts ``ca.pem``, presents
``client-NAME.pem``/``.key`` (``--identity``, default ``viewer``: the health
service needs no more) and verifies the daemon's certificate against the
name every daemon certificate carries, ``splitmirror``.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
METHOD = "/grpc.health.v1.Health/Check"
#: The DNS name in every daemon certificate (splitmirror.tls.SERVER_NAME).
SERVER_NAME = "splitmirror"


class ProbeError(Exception):
    pass


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name_index: int, value: str, prefix_bits: int = 4) -> bytes:
    """A header 'literal without indexing' whose name is a static-table entry."""
    limit = (1 << prefix_bits) - 1
    head = bytes([name_index]) if name_index < limit else bytes([limit, name_index - limit])
    raw = value.encode()
    if len(raw) >= 127:
        raise ProbeError("header value too long")
    return head + bytes([len(raw)]) + raw


def _request_headers(authority: str, tls: bool = False) -> bytes:
    return b"".join([
        b"\x83",                                   # :method POST (static 3)
        b"\x87" if tls else b"\x86",               # :scheme https (static 7) / http (static 6)
        _hpack_literal(4, METHOD),                 # :path
        _hpack_literal(1, authority),              # :authority
        _hpack_literal(31, "application/grpc"),    # content-type
        b"\x00\x02te\x08trailers",                 # te: trailers (new name)
    ])


def _message(service: str) -> bytes:
    body = b"" if not service else b"\x0a" + _varint(len(service.encode())) + service.encode()
    return b"\x00" + struct.pack(">I", len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _status_of(message: bytes) -> int:
    """The ``status`` field (1, varint) of a HealthCheckResponse."""
    i, status = 0, 0
    while i < len(message):
        key, i = _read_varint(message, i)
        if key == 0x08:
            status, i = _read_varint(message, i)
        elif key & 7 == 0:
            _, i = _read_varint(message, i)
        elif key & 7 == 2:
            length, i = _read_varint(message, i)
            i += length
        else:
            raise ProbeError(f"unexpected protobuf field {key}")
    return status


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data):
            raise ProbeError("truncated protobuf")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("connection closed by the server")
        buf += chunk
    return buf


class Tls:
    """The files of one identity in a ``certs init`` directory."""

    def __init__(self, directory: str, identity: str) -> None:
        self.ca = os.path.join(directory, "ca.pem")
        self.cert = os.path.join(directory, f"client-{identity}.pem")
        self.key = os.path.join(directory, f"client-{identity}.key")

    def context(self) -> ssl.SSLContext:
        for path in (self.ca, self.cert, self.key):
            if not os.path.isfile(path):
                raise ProbeError(f"TLS file {path} is missing")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.set_alpn_protocols(["h2"])
        return ctx


def probe(address: str, service: str = "", timeout: float = 3.0, tls: Tls | None = None) -> int:
    """One ``Health.Check`` call; returns the serving status number."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    deadline = time.monotonic() + timeout
    context = tls.context() if tls is not None else None
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    if context is not None:
        try:
            sock = context.wrap_socket(sock, server_hostname=SERVER_NAME)
        except BaseException:
            sock.close()
            raise
    with sock:
        sock.sendall(PREFACE + _frame(SETTINGS, 0, 0)
                     + _frame(HEADERS, END_HEADERS, 1, _request_headers(f"{host}:{port}", tls is not None))
                     + _frame(DATA, END_STREAM, 1, _message(service)))
        body = b""
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            head = _recv_exact(sock, 9)
            length = int.from_bytes(head[:3], "big")
            kind, flags, stream = head[3], head[4], struct.unpack(">I", head[5:])[0] & 0x7FFFFFFF
            payload = _recv_exact(sock, length)
            if kind == SETTINGS and not flags & ACK:
                sock.sendall(_frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                sock.sendall(_frame(PING, ACK, 0, payload))
            elif kind == GOAWAY:
                raise ProbeError("server sent GOAWAY")
            elif kind == RST_STREAM and stream == 1:
                raise ProbeError("server reset the call")
            elif kind == DATA and stream == 1:
                body += payload
                if len(body) >= 5:
                    size = struct.unpack(">I", body[1:5])[0]
                    if len(body) >= 5 + size:
                        return _status_of(body[5:5 + size])
            elif kind == HEADERS and stream == 1 and flags & END_STREAM:
                # Trailers with no message: the call failed (e.g. unknown service).
                raise ProbeError("the call ended without a reply (service unknown to the health server?)")


def probe_grpc(address: str, service: str = "", timeout: float = 3.0, tls: Tls | None = None) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        with open(tls.ca, "rb") as ca, open(tls.key, "rb") as key, open(tls.cert, "rb") as cert:
            creds = grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())
        channel = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise ProbeError(f"{exc.code().name}: {exc.details()}") from None  # type: ignore[attr-defined]
        return int(reply.status)


USAGE = ("usage: splitmirror-healthcheck [HOST:]PORT [SERVICE] [--timeout S] "
         "[--tls-dir DIR [--identity NAME]] [--grpc]")


def main(argv: list[str]) -> int:
    # No argparse: it alone would double the probe's start-up time.
    args: list[str] = []
    options = {"--timeout": "3", "--tls-dir": "", "--identity": "viewer"}
    use_grpc = False
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name in options:
            if not eq:
                if not rest:
                    print(f"{USAGE}\n{name} needs a value", file=sys.stderr)
                    return 2
                value = rest.pop(0)
            options[name] = value
        elif arg == "--grpc":
            use_grpc = True
        elif arg.startswith("--"):
            print(f"{USAGE}\nunknown option {arg}", file=sys.stderr)
            return 2
        else:
            args.append(arg)
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    address = args[0] if ":" in args[0] else f"127.0.0.1:{args[0]}"
    service = args[1] if len(args) > 1 else ""
    tls = Tls(options["--tls-dir"], options["--identity"]) if options["--tls-dir"] else None
    try:
        timeout = float(options["--timeout"])
        status = (probe_grpc if use_grpc else probe)(address, service, timeout, tls)
    except (OSError, ProbeError, ValueError) as exc:
        print(f"{address}: unhealthy: {exc}")
        return 1
    name = STATUS_NAMES.get(status, str(status))
    print(f"{address}{' ' + service if service else ''}: {name}")
    return 0 if status == 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
