"""A seeded fuzz campaign against the interconnect of running daemons.

A primaryd (1001) and a secondaryd (2001) are peered for real and hold a
*guard* pair, DUPLEX, whose data is known.  The fuzzer then speaks for the
configured peer of each daemon (and sometimes for nobody, a stranger, or with
garbage metadata) and sends generated hostile messages to every interconnect
method: boundary and random integers, names that are invalid, too long,
traversing or nearly valid, bitmaps valid and corrupt, write entries inside,
across and far beyond volumes, open enums, streams of batches, and message
bytes that are mutated or not a message at all; and sessions of frames to the
replication data port (most in the real peer's name).  It never names the guard
pair: a peer may legitimately command its own pairs, so what is checked is
that nothing it sends to *other* names disturbs the guard.

Checked along the way and at the end: every answer is a status a daemon may
give (never UNKNOWN or INTERNAL, never exception text), both daemons alive,
their RSS within a bound of where it started, no traceback in their logs,
the guard pair DUPLEX at both ends with its data unchanged.

    python -m tests.ic_fuzz --seed 1 --inputs 50000      # make fuzz runs this
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor as _d
from google.protobuf.message import DecodeError, Message

from splitmirror.replication import dataproto as dp
from splitmirror.replication.link import SYSTEM_ID_KEY
from splitmirror.replication.queue import BackupMarker, Entry
from splitmirror.storage.bitmap import TrackBitmap
from splitmirror.testing import Site, wait_status
from splitmirror.v1 import host_pb2, host_pb2_grpc, interconnect_pb2

SERVICE = interconnect_pb2.DESCRIPTOR.services_by_name["Interconnect"]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
LEAKS = ("Traceback", "Unexpected <class", "Errno", "Error:", "Exception")
#: The replication data port, fuzzed like one more method (a session of frames per input).
DATA_PORT = "DataPort"
GUARD = "guard"
GUARD_BYTES = 4 << 20
#: Names: a few the fuzzer creates and reuses (so that what it creates stays
#: bounded), the guard's volumes (never its pair name), and hostile ones.
#: One pool per daemon: a pair the fuzzer makes on one daemon and a command
#: then turns around must not meet a namesake the fuzzer made on the other.
POOLS = {role: [f"fz{role[0]}{i}" for i in range(5)] for role in ("primary", "secondary")}
GUARD_VOLUMES = ["guard-v", "guard-v-r"]
HOSTILE = ["", ".", "..", "../fz0", "/etc/passwd", "fz0\n", "fz0\0", "a" * 65, "a" * 4096, "-x", "é", "fz0/../x",
           "CON", "fz0 ", " fz0", "fz0.vol"]
U64 = [0, 1, 2, 4095, 4096, 8191, 8192, 1 << 20, (1 << 20) + 1, 1 << 32, (1 << 32) - 1, 16 << 40, (16 << 40) + 1,
       1 << 50, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
U32 = [0, 1, 4096, 8192, 1 << 20, (1 << 20) + 1, 1 << 30, (1 << 31) - 1, (1 << 32) - 1, 1001, 2001]


@dataclasses.dataclass
class Figures:
    inputs: int = 0
    by_code: dict[str, int] = dataclasses.field(default_factory=dict)
    by_method: dict[str, int] = dataclasses.field(default_factory=dict)
    rss_start_kib: dict[str, int] = dataclasses.field(default_factory=dict)
    rss_peak_kib: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(self.by_code.items(), key=lambda kv: -kv[1]))
        rss = ", ".join(f"{r} {self.rss_start_kib[r] // 1024}->{self.rss_peak_kib[r] // 1024} MiB"
                        for r in sorted(self.rss_start_kib))
        return (f"{self.inputs} inputs in {self.seconds:.0f} s ({self.inputs / max(self.seconds, 1e-9):.0f}/s), "
                f"0 crashes; RSS start->peak: {rss}; answers: {codes}")


class Generator:
    """Hostile interconnect messages from one seed."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.pool = POOLS["secondary"]

    def target(self, role: str) -> None:
        """Names for the daemon of ``role`` from now on."""
        self.pool = POOLS[role]

    def name(self, field: str) -> str:
        r = self.r
        roll = r.random()
        if roll < 0.55:
            if field == "pair":
                return r.choice(self.pool)
            return r.choice([*self.pool, *(f"{p}-r" for p in self.pool), *GUARD_VOLUMES])
        if roll < 0.85:
            return r.choice(HOSTILE)
        return "".join(r.choice("abcfz0-_.\n/\0é") for _ in range(r.randint(0, 80)))

    def u64(self) -> int:
        return self.r.choice(U64) if self.r.random() < 0.7 else self.r.getrandbits(64)

    def bitmap(self) -> bytes:
        r = self.r
        roll = r.random()
        if roll < 0.2:
            return b""
        if roll < 0.7:
            tracks = r.choice([128, 512, 1 << 16, 1 << 32])
            bits = [r.choice([0, 1, 127, 128, 511, 512, (1 << 32) - 1, r.getrandbits(32)])
                    for _ in range(r.randint(1, 6))]
            return TrackBitmap(tracks, bits).to_bytes()
        return r.randbytes(r.randint(1, 64))

    def data(self) -> bytes:
        r = self.r
        size = r.choice([0, 1, 511, 4096, 8192, 65536, r.randint(0, 20000)])
        return bytes([r.randint(1, 255)]) * size if r.random() < 0.5 else r.randbytes(min(size, 20000))

    def value(self, field: _d.FieldDescriptor, depth: int) -> Any:
        t = field.type
        r = self.r
        if t == _d.FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type, depth + 1)
        if t == _d.FieldDescriptor.TYPE_STRING:
            if field.name in ("pair", "pvol", "svol", "generation", "group", "name"):
                return self.name("pair" if field.name == "pair" else "volume")
            return r.choice(["", "sync", "async", "primary", "secondary", "x" * 300, "\n", "SYNC"])
        if t == _d.FieldDescriptor.TYPE_BYTES:
            return self.bitmap() if field.name in ("tracks", "pending_bitmap", "allocated_bitmap") else self.data()
        if t == _d.FieldDescriptor.TYPE_BOOL:
            return r.random() < 0.5
        if t == _d.FieldDescriptor.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return r.choice(values) if r.random() < 0.8 else r.randint(-(1 << 31), (1 << 31) - 1)
        if t in (_d.FieldDescriptor.TYPE_UINT64, _d.FieldDescriptor.TYPE_INT64):
            v = self.u64()
            return v if t == _d.FieldDescriptor.TYPE_UINT64 else v - (1 << 63) if v >= 1 << 63 else v
        if t in (_d.FieldDescriptor.TYPE_UINT32, _d.FieldDescriptor.TYPE_INT32):
            v = r.choice(U32) if r.random() < 0.7 else r.getrandbits(32)
            return v if t == _d.FieldDescriptor.TYPE_UINT32 else v - (1 << 32) if v >= 1 << 31 else v
        if t in (_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT):
            return r.choice([0.0, -1.0, 1e300, 3.5])
        raise NotImplementedError(field.full_name)

    def message(self, descriptor: _d.Descriptor, depth: int = 0) -> Message:
        cls = getattr(interconnect_pb2, descriptor.name)
        msg = cls()
        for field in descriptor.fields:
            if self.r.random() < 0.2 or (field.type == _d.FieldDescriptor.TYPE_MESSAGE and depth >= 1):
                continue
            if getattr(field, "is_repeated", False) or getattr(field, "label", 1) == 3:  # LABEL_REPEATED
                getattr(msg, field.name).extend(self.value(field, depth) for _ in range(self.r.randint(0, 4)))
            elif field.type == _d.FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, field.name).CopyFrom(self.value(field, depth))
            else:
                setattr(msg, field.name, self.value(field, depth))
        return msg

    def attach(self) -> interconnect_pb2.AttachMirrorRequest:
        """A valid attach of a pool pair, so that the other methods find
        mirror ends to act on, not only NOT_FOUND."""
        r = self.r
        pair = r.choice(self.pool)
        return interconnect_pb2.AttachMirrorRequest(
            pair=pair, pvol=pair, svol=f"{pair}-r", size=r.choice([1, 4, 64]) << 20,
            track_size=r.choice([4096, 8192, 1 << 20]), mode=r.choice(["sync", "async"]))

    def raw(self, descriptor: _d.Descriptor) -> bytes:
        """The serialized message, often mutated, sometimes no message at all."""
        if descriptor.name == "AttachMirrorRequest" and self.r.random() < 0.5:
            return self.attach().SerializeToString()
        data = self.message(descriptor).SerializeToString()
        r = self.r
        roll = r.random()
        if roll < 0.75:
            return data
        if roll < 0.85 and data:
            cut = bytearray(data)
            for _ in range(r.randint(1, 4)):
                cut[r.randrange(len(cut))] = r.randrange(256)
            return bytes(cut)
        if roll < 0.93:
            return data[:r.randint(0, len(data))]
        return r.choice([b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x80\x80\x80\x80\x08", r.randbytes(32)])

    def metadata(self, peer: int) -> tuple[tuple[str, str], ...]:
        r = self.r.random()
        if r < 0.9:
            return ((SYSTEM_ID_KEY, str(peer)),)
        return self.r.choice([(), ((SYSTEM_ID_KEY, "999"),), ((SYSTEM_ID_KEY, "1001 "),),
                              ((SYSTEM_ID_KEY, "-1"),), ((SYSTEM_ID_KEY, str(1 << 70)),)])


def data_session(gen: Generator, peer: int) -> tuple[bytes, set[int]]:
    """A hostile session on the replication data port: a HELLO (usually the
    real peer's), then frames well formed or not, often mutated."""
    r = gen.r
    claim = peer if r.random() < 0.85 else r.choice([0, 7, 1001, 2001, (1 << 64) - 1])
    out = [dp.hello(claim, r.choice([4096, 1 << 20, (1 << 32) - 1])) if r.random() < 0.95 else r.randbytes(22)]
    channel = 0
    opened: set[int] = set()
    for _ in range(r.randint(0, 8)):
        roll = r.random()
        if roll < 0.25 or not channel:
            channel = channel + 1 if r.random() < 0.9 else r.choice([0, channel, 1 << 31])
            opened.add(channel)
            name = gen.name("pair").encode()[:255]
            out.append(dp.HEAD.pack(5 + len(name), dp.Kind.OPEN) + channel.to_bytes(4, "little")
                       + bytes([len(name)]) + name)
        elif roll < 0.6:
            entries = [Entry(r.choice([1, 2, r.randint(1, 1 << 20), gen.u64()]), gen.u64() % (1 << 64),
                             gen.data() if r.random() < 0.6 else b"",
                             zero_length=r.choice([0, 0, 4096, gen.u64() % (1 << 64)]) if r.random() < 0.3 else 0,
                             flush=r.random() < 0.2, resync=r.random() < 0.1)
                       for _ in range(r.randint(1, 5))]
            for e in entries:
                if e.data and e.zero_length:
                    e.zero_length = 0
            out.append(b"".join(bytes(p) for p in dp.batch(channel, entries)))
        elif roll < 0.7:
            marker = BackupMarker(gen.name("volume"), gen.name("volume"), r.choice(["", "2026-01-01T00:00:00Z"]))
            out.append(dp.marker(channel, Entry(r.randint(1, 4), 0, b"", marker=marker)))
        elif roll < 0.8:
            out.append(dp.close(channel))
        elif roll < 0.9:
            out.append(r.choice([dp.ack(channel, 1), dp.error(channel, dp.Code.INTERNAL, "x"),
                                 dp.HEAD.pack(r.choice([1 << 30, (1 << 32) - 1]), dp.Kind.BATCH)]))
        else:
            out.append(r.randbytes(r.randint(1, 64)))
    blob = bytearray(b"".join(out))
    if r.random() < 0.3 and blob:
        for _ in range(r.randint(1, 4)):
            blob[r.randrange(len(blob))] = r.randrange(256)
    return bytes(blob), opened


def _without_goodbye(request: bytes) -> bytes:
    """A Hello in the real peer's name never says goodbye: that stops every pair
    with the peer, the guard's too, as the real peer may (open mode trusts the
    claimed id; docs/security.md).  The guard must only see what does not name it."""
    try:
        hello = interconnect_pb2.HelloRequest.FromString(request)
    except DecodeError:
        return request  # the daemon cannot parse it either
    if not hello.goodbye:
        return request
    hello.goodbye = False
    return hello.SerializeToString()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _calls(channel: grpc.Channel) -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    for m in SERVICE.methods:
        path = f"/{SERVICE.full_name}/{m.name}"
        factory = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                   (True, True): channel.stream_stream}[m.client_streaming, m.server_streaming]
        out[m.name] = factory(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return out


class Campaign:
    """Two peered daemons with a DUPLEX guard pair, and the fuzzer against both."""

    def __init__(self, base: Path, seed: int, rss_bound_mib: int = 256) -> None:
        self.base = base
        self.gen = Generator(seed)
        self.rss_bound_kib = rss_bound_mib << 10
        self.figures = Figures()
        self.primary = Site("primary", 1001, base, link_timeout=2.0)
        self.secondary = Site("secondary", 2001, base, link_timeout=2.0)
        self.primary.peer_with(self.secondary)
        self.guard_digest = ""

    def __enter__(self) -> Campaign:
        self.secondary.start(timeout=60)
        self.primary.start(timeout=60)
        self.primary.cli("volume", "create", "guard-v", "--size", str(GUARD_BYTES))
        with self.primary.channel() as ch:
            stub = host_pb2_grpc.HostApiStub(ch)
            pattern = bytes(range(1, 256)) * (GUARD_BYTES // 255 + 1)
            stub.Write(host_pb2.WriteRequest(volume="guard-v", offset=0, data=pattern[:GUARD_BYTES]), timeout=30)
            self.guard_digest = stub.Checksum(host_pb2.ChecksumRequest(volume="guard-v"), timeout=30).digest
        self.primary.cli("pair", "create", GUARD, "--pvol", "guard-v", "--svol", "guard-v-r", "--peer", "2001")
        wait_status(self.primary, GUARD, ["DUPLEX"], timeout=60)
        for site in self.sites:
            assert site.proc is not None
            self.figures.rss_start_kib[site.role] = self.figures.rss_peak_kib[site.role] = rss_kib(site.proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        for site in self.sites:
            site.kill()

    @property
    def sites(self) -> tuple[Site, Site]:
        return self.primary, self.secondary

    def run(self, inputs: int, check_every: int = 500, progress: Callable[[str], None] | None = None) -> Figures:
        started = time.monotonic()
        targets = [(self.secondary, 1001), (self.primary, 2001)]
        channels = [grpc.insecure_channel(site.interconnect) for site, _ in targets]
        try:
            calls = [_calls(ch) for ch in channels]
            methods: list[_d.MethodDescriptor | None] = [*SERVICE.methods, None]  # None: the data port
            for i in range(inputs):
                which = self.gen.r.randrange(2)
                site, peer = targets[which]
                self.gen.target(site.role)
                method = self.gen.r.choice(methods)
                if method is None:
                    self._data(site, peer)
                else:
                    self._one(calls[which][method.name], method, peer, site)
                name = DATA_PORT if method is None else method.name
                self.figures.inputs += 1
                self.figures.by_method[name] = self.figures.by_method.get(name, 0) + 1
                if (i + 1) % check_every == 0 or i + 1 == inputs:
                    self.check()
                    self.figures.seconds = time.monotonic() - started
                    if progress is not None:
                        progress(self.figures.line())
        finally:
            for ch in channels:
                ch.close()
        self.figures.seconds = time.monotonic() - started
        return self.figures

    def _one(self, call: Callable[..., Any], method: _d.MethodDescriptor, peer: int, site: Site) -> None:
        gen = self.gen
        metadata = gen.metadata(peer)
        try:
            if method.client_streaming:
                batches = [gen.raw(method.input_type) for _ in range(gen.r.randint(1, 4))]
                for _ in call(iter(batches), metadata=metadata, timeout=5):
                    pass
            elif method.server_streaming:
                for n, _ in enumerate(call(gen.raw(method.input_type), metadata=metadata, timeout=5)):
                    if n > 64:  # a client that stops reading: the daemon must let go
                        break
            else:
                request = gen.raw(method.input_type)
                if method.name == "Hello":
                    # Whatever the claimed id looks like: a spelling the daemon reads as the
                    # real peer's ('01001', say) said goodbye in its name and suspended the guard.
                    request = _without_goodbye(request)
                call(request, metadata=metadata, timeout=5)
            code = grpc.StatusCode.OK
            details = ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.figures.by_code[code.name] = self.figures.by_code.get(code.name, 0) + 1
        if code not in ALLOWED or any(leak in details for leak in LEAKS):
            raise AssertionError(f"{site.role}d: {method.name} answered {code.name}: {details!r} "
                                 f"(input {self.figures.inputs})\n{site.log()[-4000:]}")

    def _data(self, site: Site, peer: int) -> None:
        """One session on ``site``'s data port: every answer a HELLO or a precise ERROR."""
        session, opened = data_session(self.gen, peer)
        proto = dp.DataProtocol("source", dp.SMALL_FRAME)
        for channel in opened:  # the daemon may acknowledge what it applied on them
            proto.opened(channel)
        with socket.create_connection(("127.0.0.1", site.data_port), timeout=10) as sock:
            pos = 0
            while pos < len(session):
                step = self.gen.r.randint(1, 4096)
                try:
                    sock.sendall(session[pos:pos + step])
                except (BrokenPipeError, ConnectionResetError):
                    break  # the daemon ended the connection (a refused session)
                pos += step
            received = b""
            try:
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    received += chunk
            except OSError:  # reset, or already ended by the daemon
                pass
        try:
            events = proto.feed(received)
        except dp.ProtocolError as exc:
            raise AssertionError(f"{site.role}d answered the data port with a broken frame: {exc.message}") from None
        for event in events:
            if isinstance(event, dp.Error):
                key = f"data {event.code.name}"
                self.figures.by_code[key] = self.figures.by_code.get(key, 0) + 1
                if event.code in (dp.Code.INTERNAL, dp.Code.UNKNOWN) or any(x in event.message for x in LEAKS):
                    raise AssertionError(f"{site.role}d: data port answered {event.code.name}: {event.message!r} "
                                         f"(input {self.figures.inputs})\n{site.log()[-4000:]}")

    def check(self) -> None:
        """Both alive, RSS bounded, no traceback, the guard DUPLEX with its data."""
        for site in self.sites:
            if site.proc is None or site.proc.poll() is not None:
                raise AssertionError(f"{site.role}d crashed under fuzzing:\n{site.log()[-3000:]}")
            rss = rss_kib(site.proc.pid)
            self.figures.rss_peak_kib[site.role] = max(self.figures.rss_peak_kib[site.role], rss)
            if rss - self.figures.rss_start_kib[site.role] > self.rss_bound_kib:
                raise AssertionError(f"{site.role}d RSS grew from {self.figures.rss_start_kib[site.role]} to "
                                     f"{rss} KiB under fuzzing")
            if "Traceback" in site.log():
                raise AssertionError(f"{site.role}d logged a traceback:\n{site.log()[-3000:]}")
        for site, volume in ((self.primary, "guard-v"), (self.secondary, "guard-v-r")):
            row = site.pair_row(GUARD)
            if row["status"] != "DUPLEX":
                raise AssertionError(f"guard pair {row['status']} on {site.role}: {row.get('reason')}\n"
                                     f"{site.log()[-3000:]}")
            with site.channel() as ch:
                digest = host_pb2_grpc.HostApiStub(ch).Checksum(host_pb2.ChecksumRequest(volume=volume),
                                                                timeout=60).digest
            if digest != self.guard_digest:
                raise AssertionError(f"guard data changed on {site.role} ({volume})")


def campaign(seed: int, inputs: int, base: Path | None = None,
             progress: Callable[[str], None] | None = None) -> Figures:
    with tempfile.TemporaryDirectory(prefix="ic-fuzz-") as tmp, Campaign(base or Path(tmp), seed) as run:
        return run.run(inputs, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--inputs", type=int, default=50_000)
    args = parser.parse_args(argv)
    print(f"interconnect fuzz: seed {args.seed}, {args.inputs} inputs", flush=True)
    figures = campaign(args.seed, args.inputs, progress=lambda line: print(line, flush=True))
    print(f"interconnect fuzz done: {figures.line()}")
    print("by method: " + ", ".join(f"{k} {v}" for k, v in sorted(figures.by_method.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
