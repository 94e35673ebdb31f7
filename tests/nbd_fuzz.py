"""A seeded fuzz campaign against the NBD server of running daemons.

A primaryd (1001, serving NBD) and a secondaryd (2001) hold a *guard* pair,
DUPLEX, whose data is known.  Each input is one NBD session generated from
the seed: client flags, a run of options (well formed, truncated, oversized,
with hostile export names), and, when an export of the fuzzer's own is
attached, a run of transmission requests (boundary offsets and lengths,
unknown commands and flags, WRITEs with short or missing payloads, bad
magic, DISC), the whole byte stream then mutated (bytes flipped, cut,
repeated) and sent in random pieces.  The fuzzer never names the guard's
volumes, so nothing it sends may change them.

Checked along the way and at the end: both daemons alive, the primary's RSS
within a bound of where it started, a well-behaved client still served, no
traceback or internal error in the logs, the guard pair DUPLEX at both ends
with its data unchanged.

    python -m tests.nbd_fuzz --seed 1 --count 100000     # make fuzz runs this (the defaults)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

from client import Client
from splitmirror.testing import Site, wait_status

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
GUARD_VOLUMES = ("guard-v", "guard-v-r")
VOLUMES = ("fz0", "fz1", "fz2")
VOLUME_SIZE = 1 << 20
HOSTILE = ["", ".", "..", "../fz0", "/etc/passwd", "fz0\n", "fz0\0", "a" * 65, "a" * 5000, "é", "fz0 ", "FZ0",
           "\udcff"]
OFFSETS = [0, 1, 511, 512, 4096, VOLUME_SIZE - 4096, VOLUME_SIZE - 1, VOLUME_SIZE, VOLUME_SIZE + 1, 1 << 32,
           (1 << 63) - 1, 1 << 63, (1 << 64) - 4096, (1 << 64) - 1]
LENGTHS = [0, 1, 512, 4096, 65536, VOLUME_SIZE, VOLUME_SIZE + 1, 32 << 20, (32 << 20) + 1, (64 << 20) + 1,
           (1 << 32) - 1]
CONCURRENCY = 8
SESSION_TIMEOUT = 15.0
RSS_BOUND_KIB = 512 << 10


@dataclasses.dataclass
class Figures:
    inputs: int = 0
    served_bytes: int = 0  # bytes the server answered in all
    closed_by_server: int = 0  # sessions the server ended before the fuzzer did
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.inputs} inputs in {self.seconds:.0f} s ({self.inputs / max(self.seconds, 1e-9):.0f}/s), "
                f"0 crashes; {self.served_bytes} bytes answered, {self.closed_by_server} sessions ended by the "
                f"server; primaryd RSS {self.rss_start_kib // 1024} -> {self.rss_peak_kib // 1024} MiB")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Generator:
    """NBD sessions from a seed: the same seed gives the same sessions."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, values: list[int]) -> int:
        rng = self.rng
        return rng.choice(values) if rng.random() < 0.8 else rng.getrandbits(rng.choice((8, 16, 32, 64)))

    def name(self) -> bytes:
        rng = self.rng
        text = rng.choice(VOLUMES) if rng.random() < 0.75 else rng.choice(HOSTILE)
        return text.encode("utf-8", "surrogatepass")

    def option(self) -> tuple[int, bytes]:
        rng = self.rng
        option = rng.choice((1, 2, 3, 5, 6, 7, 7, 7, 8, 8, 9, 10, 11, 4, 0, 99, rng.getrandbits(32)))
        name = self.name()
        infos = [rng.choice((0, 1, 2, 3, 4, rng.getrandbits(16))) for _ in range(rng.randrange(4))]
        if option == 1:
            data = name
        elif option in (6, 7):
            data = struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)
        elif option in (9, 10):
            queries = [rng.choice((b"base:allocation", b"base:", b"qemu:dirty-bitmap:x", b""))
                       for _ in range(rng.randrange(3))]
            data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            data += b"".join(struct.pack(">I", len(q)) + q for q in queries)
        else:
            data = b"" if rng.random() < 0.7 else rng.randbytes(rng.randrange(16))
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data) + 1)]  # truncated payload
        return option, data

    def request(self) -> bytes:
        rng = self.rng
        ctype = rng.choice((0, 0, 1, 1, 1, 3, 4, 5, 6, 7, 8, 2)) if rng.random() < 0.9 else rng.getrandbits(16)
        flags = 0 if rng.random() < 0.6 else rng.choice((1, 2, 4, 8, 16, 32, rng.getrandbits(16)))
        offset = self.pick(OFFSETS) if rng.random() < 0.6 else rng.randrange(VOLUME_SIZE // 512) * 512
        length = self.pick(LENGTHS) if rng.random() < 0.6 else rng.randrange(1, 17) * 512
        magic = REQUEST_MAGIC if rng.random() < 0.99 else rng.getrandbits(32)
        header = struct.pack(">IHHQQI", magic, flags, ctype, rng.getrandbits(64), offset & (2**64 - 1),
                             length & (2**32 - 1))
        if ctype != 1:
            return header
        payload = min(length, 256 << 10) if rng.random() < 0.9 else rng.randrange(min(length, 256 << 10) + 1)
        return header + rng.randbytes(payload) if payload <= 4096 else header + bytes(payload)

    def session(self) -> list[bytes]:
        """The pieces one session sends."""
        rng = self.rng
        out = [struct.pack(">I", rng.choice((1, 3, 3, 3, 0, 2, rng.getrandbits(32))))]
        if rng.random() < 0.5:
            out.append(struct.pack(">QII", IHAVEOPT, 8, 0))  # structured replies, so meta contexts may follow
        for _ in range(rng.randrange(1, 6)):
            option, data = self.option()
            length = len(data) if rng.random() < 0.95 else rng.choice((len(data) + 1, 1 << 16, (1 << 32) - 1))
            magic = IHAVEOPT if rng.random() < 0.98 else rng.getrandbits(64)
            out.append(struct.pack(">QII", magic, option, length) + data)
            if option in (1, 7) and any(name.encode() in data for name in VOLUMES) and length == len(data):
                break  # probably attached: what follows is transmission
        out += [self.request() for _ in range(rng.randrange(8))]
        if rng.random() < 0.3:
            out = self.mutate(b"".join(out))
        return out

    def mutate(self, stream: bytes) -> list[bytes]:
        rng = self.rng
        data = bytearray(stream)
        for _ in range(rng.randrange(1, 5)):
            if not data:
                break
            at = rng.randrange(len(data))
            kind = rng.randrange(3)
            if kind == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif kind == 1:
                del data[at:at + rng.randrange(1, 64)]
            else:
                data[at:at] = data[at:at + rng.randrange(1, 64)]
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(4)))
        return [bytes(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def run_session(port: int, pieces: list[bytes]) -> tuple[int, bool]:
    """Send ``pieces``, close our side, read to the end: (bytes answered, ended by the server first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answered = 0
    ended_early = False
    try:
        async with asyncio.timeout(SESSION_TIMEOUT):
            for piece in pieces:
                writer.write(piece)
                try:
                    await writer.drain()
                except OSError:
                    ended_early = True
                    break
            if not ended_early and writer.can_write_eof():
                writer.write_eof()
            while chunk := await reader.read(1 << 20):
                answered += len(chunk)
    except OSError:  # reset, or not connected any more (the server hung up)
        ended_early = True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return answered, ended_early


class Campaign:
    """Two peered daemons with a guard pair; :meth:`run` fuzzes the primary's NBD port."""

    def __init__(self, base: Path, seed: int) -> None:
        self.seed = seed
        self.primary = Site("primary", 1001, base, nbd=True)
        self.secondary = Site("secondary", 2001, base)
        self.primary.peer_with(self.secondary)
        self.guard = bytes(range(256)) * (VOLUME_SIZE // 256)

    def __enter__(self) -> Campaign:
        self.secondary.start()
        self.primary.start()
        for name in VOLUMES:
            self.primary.cli("volume", "create", name, "--size", str(VOLUME_SIZE))
        self.primary.cli("volume", "create", GUARD_VOLUMES[0], "--size", str(VOLUME_SIZE))
        self.primary.cli("pair", "create", "guard", "--pvol", GUARD_VOLUMES[0], "--svol", GUARD_VOLUMES[1],
                         "--peer", "2001", "--wait")
        asyncio.run(self._write_guard())
        return self

    def __exit__(self, *exc: object) -> None:
        self.primary.kill()
        self.secondary.kill()

    async def _write_guard(self) -> None:
        async with Client(self.primary.address, timeout=30) as c:
            await c.write(GUARD_VOLUMES[0], 0, self.guard)
            await c.flush(GUARD_VOLUMES[0])

    def alive(self) -> None:
        for site in (self.primary, self.secondary):
            assert site.proc is not None and site.proc.poll() is None, f"{site.role}d died:\n{site.log()[-3000:]}"

    def run(self, count: int, *, check_every: int = 1000, progress: bool = False) -> Figures:
        return asyncio.run(self._run(count, check_every, progress))

    async def _run(self, count: int, check_every: int, progress: bool) -> Figures:
        assert self.primary.proc is not None
        pid = self.primary.proc.pid
        figures = Figures(rss_start_kib=rss_kib(pid))
        figures.rss_peak_kib = figures.rss_start_kib
        generator = Generator(self.seed)
        started = time.monotonic()
        done = 0
        while done < count:
            batch = min(CONCURRENCY, count - done)
            sessions = [generator.session() for _ in range(batch)]
            results = await asyncio.gather(*(run_session(self.primary.nbd_port, s) for s in sessions))
            for answered, ended in results:
                figures.served_bytes += answered
                figures.closed_by_server += ended
            done += batch
            if done % check_every < batch or done == count:
                self.alive()
                figures.rss_peak_kib = max(figures.rss_peak_kib, rss_kib(pid))
                assert figures.rss_peak_kib - figures.rss_start_kib < RSS_BOUND_KIB, figures.line()
                await self._good_client_served()
                if progress:
                    elapsed = time.monotonic() - started
                    print(f"  {done}/{count} inputs, {done / max(elapsed, 1e-9):.0f}/s, "
                          f"RSS {figures.rss_peak_kib // 1024} MiB", flush=True)
        figures.inputs = done
        figures.seconds = time.monotonic() - started
        await self._check_guard()
        return figures

    async def _good_client_served(self) -> None:
        """A client that follows the protocol reads its export."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.primary.nbd_port)
        try:
            async with asyncio.timeout(SESSION_TIMEOUT):
                await reader.readexactly(18)
                name = VOLUMES[0].encode()
                writer.write(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 1, len(name)) + name)
                await reader.readexactly(8 + 2 + 124)
                writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 7, 0, 4096))
                magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
                assert (magic, error, handle) == (0x67446698, 0, 7), (magic, error, handle)
                await reader.readexactly(4096)
        finally:
            writer.close()

    async def _check_guard(self) -> None:
        self.alive()
        wait_status(self.primary, "guard", ["DUPLEX"])
        wait_status(self.secondary, "guard", ["DUPLEX"])
        async with Client(self.primary.address, timeout=30) as c:
            assert await c.read(GUARD_VOLUMES[0], 0, VOLUME_SIZE) == self.guard, "the guard PVOL changed"
        async with Client(self.secondary.address, timeout=30) as c:
            assert await c.read(GUARD_VOLUMES[1], 0, VOLUME_SIZE) == self.guard, "the guard SVOL changed"
        for site in (self.primary, self.secondary):
            log = site.log()
            assert "Traceback" not in log, f"{site.role}d logged a traceback:\n{log[-3000:]}"
            errors = [line for line in log.splitlines() if " ERROR splitmirror.nbd" in line]
            assert not errors, f"{site.role}d logged NBD errors: {errors[:5]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", "--inputs", type=int, default=100_000, dest="count",
                        help="sessions to generate (default 100000)")
    args = parser.parse_args(argv)
    print(f"NBD fuzz: seed {args.seed}, {args.count} inputs", flush=True)
    with tempfile.TemporaryDirectory(prefix="splitmirror-nbd-fuzz-") as tmp, Campaign(Path(tmp), args.seed) as c:
        figures = c.run(args.count, check_every=max(1000, args.count // 50), progress=True)
    print(f"NBD fuzz: {figures.line()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
