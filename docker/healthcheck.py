#!/usr/bin/env python3
"""Container healthcheck: ask a daemon's gRPC health service (grpc.health.v1).

    splitmirror-healthcheck [HOST:]PORT [SERVICE] [--timeout SECONDS]

Exit 0 when the service answers SERVING, 1 otherwise, with one line saying
why.  Docker runs this every few seconds in every daemon container, so it
speaks the few HTTP/2 frames of one unary gRPC call with the standard
library alone: it starts in ~20 ms where importing grpcio costs ~300 ms of
CPU per probe.  ``--grpc`` makes the same call through grpcio +
grpc_health instead (for comparison; the tests check that both agree).
"""

from __future__ import annotations

import socket
import struct
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
METHOD = "/grpc.health.v1.Health/Check"


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


def _request_headers(authority: str) -> bytes:
    return b"".join([
        b"\x83",                                   # :method POST (static 3)
        b"\x86",                                   # :scheme http (static 6)
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


def probe(address: str, service: str = "", timeout: float = 3.0) -> int:
    """One ``Health.Check`` call; returns the serving status number."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(PREFACE + _frame(SETTINGS, 0, 0)
                     + _frame(HEADERS, END_HEADERS, 1, _request_headers(f"{host}:{port}"))
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


def probe_grpc(address: str, service: str = "", timeout: float = 3.0) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise ProbeError(f"{exc.code().name}: {exc.details()}") from None  # type: ignore[attr-defined]
        return int(reply.status)


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    use_grpc = "--grpc" in argv
    timeout = 3.0
    if "--timeout" in argv:
        timeout = float(argv[argv.index("--timeout") + 1])
        args.remove(argv[argv.index("--timeout") + 1])
    if not args:
        print("usage: splitmirror-healthcheck [HOST:]PORT [SERVICE] [--timeout S] [--grpc]", file=sys.stderr)
        return 2
    address = args[0] if ":" in args[0] else f"127.0.0.1:{args[0]}"
    service = args[1] if len(args) > 1 else ""
    try:
        status = (probe_grpc if use_grpc else probe)(address, service, timeout)
    except (OSError, ProbeError, ValueError) as exc:
        print(f"{address}: unhealthy: {exc}")
        return 1
    name = STATUS_NAMES.get(status, str(status))
    print(f"{address}{' ' + service if service else ''}: {name}")
    return 0 if status == 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
