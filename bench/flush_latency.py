"""8 KiB write + FLUSH at queue depth 1 over NBD: SIMPLEX vs sync vs async.

A small NBD client written here (fixed newstyle handshake, NBD_OPT_GO,
simple replies, NBD_CMD_WRITE and NBD_CMD_FLUSH on one TCP connection)
sends, one request at a time, an 8 KiB write at a random 8 KiB-aligned
offset and then a FLUSH, and times the pair as the host sees it (write sent
-> flush acknowledged).  It does so against, in one run:

  (a) a SIMPLEX volume on primaryd,
  (b) the PVOL of a sync DUPLEX pair (primaryd -> secondaryd),
  (c) the PVOL of an async DUPLEX pair,

in interleaved rounds (each kind leads a round in turn) after a warm-up,
and prints the median and p99 of write+FLUSH per kind (and of the write and
the FLUSH alone), and each daemon's CPU microseconds per write+FLUSH.
Targets (issue 14): sync median <= SIMPLEX median + 0.5 ms; async median
<= 1.2 x SIMPLEX median.  ``--profile DIR`` then profiles both daemons
(py-spy) for each kind and prints the CPU cost of each stage.  Exits 0
whether the targets are met or not (non-zero only when the run fails).
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _harness import (
    KINDS,
    CpuMeter,
    Daemons,
    Kind,
    add_profile_args,
    load_average,
    median,
    percentile,
    print_profiles,
    profiled,
    rotated,
    verdict,
)

from splitmirror.sizes import parse_size

BLOCK = 8192
SYNC_EXTRA_MS = 0.5
ASYNC_FACTOR = 1.2

# NBD protocol constants (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
TFLAG_SEND_FLUSH = 1 << 2


class NbdError(Exception):
    pass


class RawNbd:
    """One NBD connection, one request at a time, simple replies only."""

    def __init__(self, host: str, port: int, export: str, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.handle = 0
        self.size, self.flags = self._handshake(export)
        if not self.flags & TFLAG_SEND_FLUSH:
            raise NbdError(f"export {export!r} does not accept NBD_CMD_FLUSH")

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdError("connection closed by the server")
            buf += chunk
        return bytes(buf)

    def _handshake(self, export: str) -> tuple[int, int]:
        magic, opt_magic, _server_flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError("not a fixed newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = flags = -1
        while True:
            rmagic, option, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if rmagic != REPLY_MAGIC_OPT or option != OPT_GO:
                raise NbdError("malformed option reply")
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                size, flags = struct.unpack(">QH", payload[2:12])
            elif rtype & (1 << 31):
                raise NbdError(f"NBD_OPT_GO refused ({rtype:#x}): {payload.decode(errors='replace')}")
        if size < 0:
            raise NbdError("the server sent no NBD_INFO_EXPORT")
        return size, flags

    def _request(self, cmd: int, offset: int = 0, data: bytes = b"", length: int = 0) -> None:
        self.handle += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.handle, offset, len(data) or length)
        self.sock.sendall(header + data if data else header)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise NbdError("unexpected reply (a structured reply, or another request's)")
        if error:
            raise NbdError(f"command {cmd} failed: errno {error}")

    def write(self, offset: int, data: bytes) -> None:
        self._request(CMD_WRITE, offset, data)

    def flush(self) -> None:
        self._request(CMD_FLUSH)

    def close(self) -> None:
        try:
            self.handle += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self.handle, 0, 0))
        except OSError:
            pass
        self.sock.close()


class Samples:
    def __init__(self) -> None:
        self.total: list[float] = []
        self.write: list[float] = []
        self.flush: list[float] = []
        self.cpu: dict[str, float] = {}  # daemon -> CPU seconds
        self.statuses: set[str] = set()


def write_flush(conn: RawNbd, offsets: list[int], payload: bytes, out: Samples | None) -> None:
    for offset in offsets:
        t0 = time.perf_counter()
        conn.write(offset, payload)
        t1 = time.perf_counter()
        conn.flush()
        t2 = time.perf_counter()
        if out is not None:
            out.write.append(t1 - t0)
            out.flush.append(t2 - t1)
            out.total.append(t2 - t0)


def bench(base: Path, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    slots = args.size // BLOCK
    daemons = Daemons(base, args.size, grpc_stream=args.grpc_stream)
    conns: dict[str, RawNbd] = {}
    try:
        daemons.start()
        for kind in KINDS:
            conns[kind.label] = RawNbd("127.0.0.1", daemons.primary.nbd_port, kind.volume)

        def offsets(n: int) -> list[int]:
            return [rng.randrange(slots) * BLOCK for _ in range(n)]

        print(f"{BLOCK} B write + FLUSH, queue depth 1, {args.writes} per kind in {args.rounds} interleaved rounds "
              f"({args.warmup} warm-up), {args.size >> 20} MiB volumes; load average {load_average()}")
        for kind in KINDS:
            write_flush(conns[kind.label], offsets(args.warmup), rng.randbytes(BLOCK), None)
        samples = {kind.label: Samples() for kind in KINDS}
        per_round = max(1, args.writes // args.rounds)
        for r in range(args.rounds):
            for kind in rotated(KINDS, r):
                s = samples[kind.label]
                meter = CpuMeter(daemons.pids)
                meter.start()
                write_flush(conns[kind.label], offsets(per_round), rng.randbytes(BLOCK), s)
                for name, use in meter.stop().items():
                    s.cpu[name] = s.cpu.get(name, 0.0) + use.seconds
                s.statuses.add(daemons.settle(kind))

        print(f"{'kind':<8} {'ops':>6} {'median ms':>10} {'p99 ms':>8} {'write med':>10} {'flush med':>10} "
              f"{'primaryd us/op':>15} {'secondaryd us/op':>17}  pair")
        for kind in KINDS:
            s = samples[kind.label]
            n = len(s.total)
            print(f"{kind.label:<8} {n:>6} {median(s.total) * 1e3:>10.3f} {percentile(s.total, 99) * 1e3:>8.3f} "
                  f"{median(s.write) * 1e3:>10.3f} {median(s.flush) * 1e3:>10.3f} "
                  f"{s.cpu['primaryd'] / n * 1e6:>15.1f} {s.cpu['secondaryd'] / n * 1e6:>17.1f}  "
                  f"{','.join(sorted(s.statuses))}")
        simplex = median(samples["SIMPLEX"].total) * 1e3
        sync = median(samples["sync"].total) * 1e3
        asynch = median(samples["async"].total) * 1e3
        print()
        print(f"{'figure':<34} {'value':>9}  {'target':>10}  verdict")
        print(f"{'sync median - SIMPLEX median':<34} {sync - simplex:>6.3f} ms  {'<= 0.500 ms':>10}  "
              f"{verdict(sync - simplex <= SYNC_EXTRA_MS)}")
        print(f"{'async median / SIMPLEX median':<34} {asynch / simplex:>9.2f}  {'<= 1.20':>10}  "
              f"{verdict(asynch <= ASYNC_FACTOR * simplex)}")
        print(f"{'sync median / SIMPLEX median':<34} {sync / simplex:>9.2f}  {'(none)':>10}")
        print(f"load average {load_average()}")
        if args.profile:
            profile(daemons, conns, offsets, rng, args)
    finally:
        for conn in conns.values():
            conn.close()
        daemons.stop()
    return 0


def profile(daemons: Daemons, conns: dict[str, RawNbd], offsets: Callable[[int], list[int]], rng: random.Random,
            args: argparse.Namespace) -> None:
    """One profiled run per kind, --profile-seconds long each."""
    costs: dict[str, dict[str, dict[str, float]]] = {}
    requests: dict[str, int] = {}
    for kind in KINDS:
        conn = conns[kind.label]

        def run(kind: Kind = kind, conn: RawNbd = conn) -> int:
            done = 0
            deadline = time.monotonic() + args.profile_seconds
            while time.monotonic() < deadline:
                write_flush(conn, offsets(50), rng.randbytes(BLOCK), None)
                done += 50
            return done

        done, _, costs[kind.label] = profiled(args.profile, f"flush-{kind.label}", daemons.pids,
                                              args.profile_rate, not args.no_native, run)
        requests[kind.label] = done
        daemons.settle(kind)
    print()
    print(f"profiles (py-spy --rate {args.profile_rate}{'' if args.no_native else ' --native'}, "
          f"~{args.profile_seconds:g} s per column; raw stacks in {args.profile}); load average {load_average()}")
    print_profiles(costs, requests, "write+FLUSH")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=3000, help="timed write+FLUSH pairs per kind (default 3000)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed pairs per kind first (default 200)")
    parser.add_argument("--size", default="256M", help="volume size (default 256M)")
    parser.add_argument("--seed", type=int, default=14)
    add_profile_args(parser, seconds=20)
    args = parser.parse_args()
    args.size = parse_size(args.size)
    if args.size < BLOCK or args.size % (1 << 20):
        parser.error("--size must be a positive multiple of 1M")
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-flush-") as tmp:
        return bench(Path(tmp), args)


if __name__ == "__main__":
    sys.exit(main())
