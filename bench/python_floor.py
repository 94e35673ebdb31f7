"""What one Python process can do: the floors behind issue 14's design choices.

Not a benchmark of splitmirror itself: it measures, side by side in one run,
the cost of the building blocks the data path could be made of, so the
changes proposed in docs/performance.md come with numbers.

1. NBD: ``qemu-img bench`` (4 KiB, depth 16, write then read) against
   ``nbdkit file`` and against a minimal NBD server written here on
   ``asyncio.Protocol`` + uvloop (requests parsed from the buffer of each
   read, ``os.pwrite`` inline, ``os.preadv(..., RWF_NOWAIT)`` inline with a
   thread-pool fallback, all replies of one read gathered into one
   ``writelines``).  It serves a plain file, so it shows what the NBD layer
   alone costs in Python, not what the daemons could reach with replication.
2. Interconnect: one message of ``--payload`` bytes and a small ack, between
   two processes over loopback, (a) on a grpc.aio bidirectional stream (raw
   bytes, no protobuf) and (b) on a length-prefixed stream over
   ``asyncio.Protocol``; one in flight (round-trip latency) and 16 in flight
   (messages/s).  CPU per message of each end from ``time.process_time``.
3. Disk: 8 KiB ``pwrite`` + ``fdatasync`` latency and CPU on the data
   directory's file system, and the cost of a hop to a worker thread.

No targets: it prints the figures.  Exits 0 unless the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import load_average, percentile, stop_process, wait_listening

from splitmirror.testing import free_port

# ------------------------------------------------------------------ NBD floor

_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC, REPLY_MAGIC = 0x25609513, 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO, OPT_INFO = 1, 2, 7, 6
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
# HAS_FLAGS | SEND_FLUSH | CAN_MULTI_CONN
TFLAGS = 1 | 4 | 256


class FloorNbd(asyncio.Protocol):
    """Fixed newstyle NBD over one file; simple replies; minimal options."""

    pool = concurrent.futures.ThreadPoolExecutor(4)

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.buf = bytearray()
        self.phase = "flags"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self.transport.write(b"NBDMAGIC" + struct.pack(">QH", IHAVEOPT, 3))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.phase != "transmission":
            self._handshake()
        if self.phase == "transmission":
            self._requests()

    def _handshake(self) -> None:
        assert self.transport is not None
        buf = self.buf
        if self.phase == "flags":
            if len(buf) < 4:
                return
            del buf[:4]
            self.phase = "options"
        while self.phase == "options" and len(buf) >= _OPT.size:
            _magic, option, length = _OPT.unpack_from(buf)
            if len(buf) < _OPT.size + length:
                return
            del buf[:_OPT.size + length]
            if option == OPT_EXPORT_NAME:
                self.transport.write(struct.pack(">QH", self.size, TFLAGS))
                self.phase = "transmission"
            elif option in (OPT_GO, OPT_INFO):
                info = struct.pack(">HQH", 0, self.size, TFLAGS)
                self.transport.write(_OPT_REPLY.pack(OPT_REPLY_MAGIC, option, REP_INFO, len(info)) + info
                                     + _OPT_REPLY.pack(OPT_REPLY_MAGIC, option, REP_ACK, 0))
                if option == OPT_GO:
                    self.phase = "transmission"
            elif option == OPT_ABORT:
                self.transport.close()
                return
            else:
                self.transport.write(_OPT_REPLY.pack(OPT_REPLY_MAGIC, option, REP_ERR_UNSUP, 0))

    def _requests(self) -> None:
        assert self.transport is not None
        buf, fd, out = self.buf, self.fd, []
        pos, end = 0, len(self.buf)
        with memoryview(buf) as view:
            while end - pos >= _REQ.size:
                _magic, _flags, ctype, handle, offset, length = _REQ.unpack_from(buf, pos)
                if ctype == CMD_WRITE:
                    if end - pos < _REQ.size + length:
                        break
                    os.pwrite(fd, view[pos + _REQ.size:pos + _REQ.size + length], offset)
                    out.append(_REPLY.pack(REPLY_MAGIC, 0, handle))
                    pos += _REQ.size + length
                    continue
                pos += _REQ.size
                if ctype == CMD_READ:
                    data = bytearray(length)
                    try:
                        os.preadv(fd, [data], offset, os.RWF_NOWAIT)
                    except BlockingIOError:  # not in the page cache: a worker thread reads it
                        asyncio.get_running_loop().run_in_executor(self.pool, self._slow_read, handle, offset, length)
                        continue
                    out += (_REPLY.pack(REPLY_MAGIC, 0, handle), data)
                elif ctype == CMD_FLUSH:
                    asyncio.get_running_loop().run_in_executor(self.pool, self._flush, handle)
                elif ctype == CMD_DISC:
                    self.transport.close()
                    break
        del buf[:pos]
        if out:
            self.transport.writelines(out)

    def _slow_read(self, handle: int, offset: int, length: int) -> None:
        data = os.pread(self.fd, length, offset)
        self._reply_threadsafe([_REPLY.pack(REPLY_MAGIC, 0, handle), data])

    def _flush(self, handle: int) -> None:
        os.fdatasync(self.fd)
        self._reply_threadsafe([_REPLY.pack(REPLY_MAGIC, 0, handle)])

    def _reply_threadsafe(self, parts: list[bytes]) -> None:
        loop = self.loop
        loop.call_soon_threadsafe(lambda: self.transport.writelines(parts) if self.transport else None)

    loop: asyncio.AbstractEventLoop


def serve_nbd(path: str, port: int) -> None:
    import uvloop

    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        FloorNbd.loop = loop
        server = await loop.create_server(lambda: FloorNbd(fd, size), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def qemu_bench(uri: str, write: bool, count: int) -> float:
    argv = ["qemu-img", "bench", "-f", "raw", "-s", "4096", "-d", "16", "-c", str(count)]
    argv += ["-w", "--pattern=0xa5"] if write else []
    result = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=600)
    m = re.search(r"Run completed in ([0-9.]+) seconds", result.stdout)
    if result.returncode != 0 or not m:
        raise RuntimeError(f"qemu-img bench on {uri} failed: {result.stderr.strip() or result.stdout!r}")
    return count / float(m.group(1))


def nbd_floor(base: Path, count: int, rounds: int) -> None:
    size = 256 << 20
    procs: dict[str, subprocess.Popen[bytes]] = {}
    uris: dict[str, str] = {}
    try:
        for name in ("nbdkit file", "Python asyncio.Protocol"):
            image = base / f"{name.split()[0]}.img"
            with image.open("wb") as f:
                f.truncate(size)
            port = free_port()
            argv = (["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(image)]
                    if name.startswith("nbdkit") else
                    [sys.executable, __file__, "--serve-nbd", str(image), "--port", str(port)])
            procs[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(port, procs[name])
            uris[name] = f"nbd://127.0.0.1:{port}/"
        ops: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for r in range(rounds):
            for name in (list(uris) if r % 2 == 0 else list(reversed(uris))):
                for op in ("write", "read"):
                    before = _proc_cpu(procs[name].pid)
                    ops.setdefault((name, op), []).append(qemu_bench(uris[name], op == "write", count))
                    cpu.setdefault((name, op), []).append((_proc_cpu(procs[name].pid) - before) / count * 1e6)
        print(f"1. NBD server alone, qemu-img bench 4 KiB depth 16, {count} requests, median of {rounds}")
        print(f"   {'server':<26} {'write ops/s':>12} {'read ops/s':>11} {'server us/write':>16} "
              f"{'server us/read':>15}")
        for name in uris:
            print(f"   {name:<26} {statistics.median(ops[(name, 'write')]):>12.0f} "
                  f"{statistics.median(ops[(name, 'read')]):>11.0f} {statistics.median(cpu[(name, 'write')]):>16.1f} "
                  f"{statistics.median(cpu[(name, 'read')]):>15.1f}")
        ref, py = "nbdkit file", "Python asyncio.Protocol"
        for op in ("write", "read"):
            ratio = statistics.median(ops[(py, op)]) / statistics.median(ops[(ref, op)])
            print(f"   Python floor / nbdkit, {op}: {ratio:.2f}")
    finally:
        for proc in procs.values():
            stop_process(proc)


def _proc_cpu(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------- interconnect floor

_LEN = struct.Struct(">I")
_ACK = struct.Struct(">Q")
STOP = b"stop"


class RawServer(asyncio.Protocol):
    """Length-prefixed messages in; one 8-byte ack per message, gathered per read."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.seq = 0
        self.cpu0 = time.process_time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf, pos, acks = self.buf, 0, []
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos < 4 + n:
                break
            if n == len(STOP) and buf[pos + 4:pos + 8] == STOP:
                cpu = time.process_time() - self.cpu0
                acks.append(_ACK.pack(0xFFFFFFFFFFFFFFFF) + struct.pack(">d", cpu))
                self.cpu0 = time.process_time()
            else:
                self.seq += 1
                acks.append(_ACK.pack(self.seq))
            pos += 4 + n
        del buf[:pos]
        if acks:
            self.transport.writelines(acks)


def serve_transport(kind: str, port: int) -> None:
    import uvloop

    async def raw() -> None:
        server = await asyncio.get_running_loop().create_server(RawServer, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    async def grpc_server() -> None:
        import grpc

        async def stream(requests, context):  # type: ignore[no-untyped-def]
            seq, cpu0 = 0, time.process_time()
            async for msg in requests:
                if msg == STOP:
                    yield _ACK.pack(0xFFFFFFFFFFFFFFFF) + struct.pack(">d", time.process_time() - cpu0)
                    cpu0 = time.process_time()
                    continue
                seq += 1
                yield _ACK.pack(seq)

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "floor.Link", {"Stream": grpc.stream_stream_rpc_method_handler(stream)})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(raw() if kind == "raw" else grpc_server())


class _RawClient(asyncio.Protocol):
    def __init__(self, acks: asyncio.Queue[bytes]) -> None:
        self.acks = acks
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= 8:
            size = 16 if _ACK.unpack_from(buf, pos)[0] == 0xFFFFFFFFFFFFFFFF else 8
            if len(buf) - pos < size:
                break
            self.acks.put_nowait(bytes(buf[pos:pos + size]))
            pos += size
        del buf[:pos]


async def _client(kind: str, port: int, payload: int, count: int, window: int) -> dict[str, float]:
    """Send ``count`` messages with ``window`` in flight; latencies, CPU of both ends."""
    msg = os.urandom(payload)
    latencies: list[float] = []
    sent_at: dict[int, float] = {}
    acks: asyncio.Queue[bytes] = asyncio.Queue()
    if kind == "raw":
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: _RawClient(acks), "127.0.0.1", port)

        def send(data: bytes) -> None:
            transport.writelines([_LEN.pack(len(data)), data])
    else:
        import grpc

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.stream_stream("/floor.Link/Stream")()
        outbox: asyncio.Queue[bytes] = asyncio.Queue()

        async def writer() -> None:  # one write at a time, as grpc.aio wants
            while True:
                await call.write(await outbox.get())

        async def reader() -> None:
            while True:
                acks.put_nowait(await call.read())

        tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]

        def send(data: bytes) -> None:
            outbox.put_nowait(data)

    async def recv() -> bytes:
        return await acks.get()

    async def stop_and_server_cpu() -> float:
        send(STOP)
        while True:
            got = await recv()
            if len(got) == 16:
                return float(struct.unpack(">d", got[8:])[0])

    for _ in range(200):  # warm-up
        send(msg)
        await recv()
    await stop_and_server_cpu()
    cpu0 = time.process_time()
    started = time.perf_counter()
    next_seq, acked = 0, 0
    while acked < count:
        while next_seq < count and next_seq - acked < window:
            next_seq += 1
            sent_at[next_seq] = time.perf_counter()
            send(msg)
        await recv()
        acked += 1
        latencies.append(time.perf_counter() - sent_at.pop(acked))
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - cpu0
    server_cpu = await stop_and_server_cpu()
    if kind == "raw":
        transport.close()
    else:
        for task in tasks:
            task.cancel()
        await channel.close()
    return {"rate": count / elapsed, "median_us": statistics.median(latencies) * 1e6,
            "p99_us": percentile(latencies, 99) * 1e6, "client_us": client_cpu / count * 1e6,
            "server_us": server_cpu / count * 1e6}


def transport_floor(payload: int, count: int) -> None:
    print(f"2. Interconnect transport, {payload} B messages + 8 B acks, two processes on loopback, uvloop")
    print(f"   {'transport':<34} {'in flight':>9} {'msgs/s':>8} {'RTT med us':>11} {'p99 us':>8} "
          f"{'sender us/msg':>14} {'receiver us/msg':>16}")
    for kind, label in (("grpc", "grpc.aio bidi stream (raw bytes)"), ("raw", "asyncio.Protocol, length prefix")):
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve-transport", kind, "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, server)
            for window in (1, 16):
                out = subprocess.run([sys.executable, __file__, "--client", kind, "--port", str(port), "--payload",
                                      str(payload), "--messages", str(count), "--window", str(window)],
                                     capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    raise RuntimeError(f"transport client failed: {out.stderr.strip()}")
                r = json.loads(out.stdout)
                print(f"   {label:<34} {window:>9} {r['rate']:>8.0f} {r['median_us']:>11.0f} {r['p99_us']:>8.0f} "
                      f"{r['client_us']:>14.1f} {r['server_us']:>16.1f}")
        finally:
            stop_process(server)


# ------------------------------------------------------------------ disk floor

def disk_floor(base: Path, count: int) -> None:
    path = base / "disk.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 256 << 20)
        block = os.urandom(8192)
        lat, cpu0 = [], time.process_time()
        for i in range(count):
            t0 = time.perf_counter()
            os.pwrite(fd, block, (i * 7919 % 32768) * 8192)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / count * 1e6
        clean = []
        for _ in range(200):
            t0 = time.perf_counter()
            os.fsync(fd)
            clean.append(time.perf_counter() - t0)
        pool = concurrent.futures.ThreadPoolExecutor(4)

        async def hops(n: int) -> tuple[float, float]:
            loop = asyncio.get_running_loop()
            inline_cpu0 = time.process_time()
            for i in range(n):
                os.pread(fd, 4096, (i % 1024) * 4096)
            inline = (time.process_time() - inline_cpu0) / n * 1e6
            cpu0 = time.process_time()
            for i in range(n):
                await loop.run_in_executor(pool, os.pread, fd, 4096, (i % 1024) * 4096)
            return inline, (time.process_time() - cpu0) / n * 1e6

        import uvloop

        inline, hop = uvloop.run(hops(5000))
        pool.shutdown()
        print(f"3. Disk and threads ({path.parent}):")
        print(f"   8 KiB pwrite + fdatasync: median {statistics.median(lat) * 1e3:.3f} ms, "
              f"p99 {percentile(lat, 99) * 1e3:.3f} ms, CPU {cpu:.0f} us each")
        print(f"   fsync of a file with nothing to write: median {statistics.median(clean) * 1e6:.0f} us")
        print(f"   4 KiB pread from the page cache: inline {inline:.1f} us CPU, through run_in_executor "
              f"{hop:.1f} us CPU")
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40000, help="qemu-img bench requests per run (default 40000)")
    parser.add_argument("--rounds", type=int, default=3, help="NBD rounds, alternating order (default 3)")
    parser.add_argument("--messages", type=int, default=20000, help="interconnect messages per run (default 20000)")
    parser.add_argument("--payload", type=int, default=4096, help="interconnect message size (default 4096)")
    parser.add_argument("--syncs", type=int, default=1000, help="pwrite+fdatasync samples (default 1000)")
    parser.add_argument("--serve-nbd", help=argparse.SUPPRESS)
    parser.add_argument("--serve-transport", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_nbd:
        serve_nbd(args.serve_nbd, args.port)
        return 0
    if args.serve_transport:
        serve_transport(args.serve_transport, args.port)
        return 0
    if args.client:
        import uvloop

        result = uvloop.run(_client(args.client, args.port, args.payload, args.messages, args.window))
        print(json.dumps(result))
        return 0
    missing = [tool for tool in ("qemu-img", "nbdkit") if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (Debian packages qemu-utils, nbdkit)", file=sys.stderr)
        return 2
    print(f"load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="splitmirror-bench-floor-") as tmp:
        nbd_floor(Path(tmp), args.count, args.rounds)
        transport_floor(args.payload, args.messages)
        disk_floor(Path(tmp), args.syncs)
    print(f"load average {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
