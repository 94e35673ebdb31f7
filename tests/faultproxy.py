"""A small TCP proxy that injects interconnect faults between two daemons.

The proxy runs its own asyncio loop on a background thread, so it keeps
forwarding while the test's loop is busy or blocked (starting a daemon,
running the CLI).  Its controls are plain, thread-safe methods:

- :meth:`FaultProxy.cut`: close every connection and refuse new ones (reset
  right after accept) until :meth:`FaultProxy.heal`: a cable pulled out.
- :meth:`FaultProxy.delay`: add latency to every forwarded chunk, in both
  directions (order kept; bandwidth is not limited).
- :meth:`FaultProxy.blackhole`: keep connections open (and accept new ones)
  but drop every byte: a hung peer.  The byte streams of those connections
  are broken from then on, so :meth:`FaultProxy.heal` resets them; a peer
  coming back from a hang is reached again over a fresh connection.
- :meth:`FaultProxy.heal`: back to plain forwarding, no delay.

Put one proxy on each direction (primary -> secondary interconnect and
secondary -> primary interconnect) so that a fault is symmetric::

    ps = FaultProxy(secondary.interconnect).start()
    sp = FaultProxy(primary.interconnect).start()
    primary.peer_addresses[secondary.system_id] = ps.address
    secondary.peer_addresses[primary.system_id] = sp.address
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, Self, TypeVar

__all__ = ["FaultProxy", "ProxyPair"]

T = TypeVar("T")

OPEN, CUT, BLACKHOLE = "open", "cut", "blackhole"
CHUNK = 256 << 10


@dataclasses.dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    dropped: bool = False  # bytes were discarded: the stream is broken

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None and not writer.transport.is_closing():
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``target`` (``host:port``)."""

    def __init__(self, target: str, port: int = 0, name: str = "") -> None:
        host, _, tport = target.rpartition(":")
        self.target = (host or "127.0.0.1", int(tport))
        self.name = name or f"proxy->{target}"
        self.port = port
        self.mode = OPEN
        self.latency = 0.0
        self.accepted = 0
        self.refused = 0
        self.bytes_forwarded = 0
        self.bytes_dropped = 0
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle (any thread) ---------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True))
                self.port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            self._abort(self._conns)
            for _ in range(50):  # let the handlers see their transports closed
                await asyncio.sleep(0.01)
                if not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                    break

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- controls (any thread) ----------------------------------------------
    def cut(self) -> None:
        """Close every connection; refuse new ones until :meth:`heal`."""

        async def do() -> None:
            self.mode = CUT
            self._abort(self._conns)

        self._run(do())

    def blackhole(self) -> None:
        """Keep connections open but drop every byte, both ways."""

        async def do() -> None:
            self.mode = BLACKHOLE

        self._run(do())

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency to each chunk forwarded from now on."""

        async def do() -> None:
            self.latency = max(0.0, seconds)

        self._run(do())

    def heal(self, reset: bool = True) -> None:
        """Plain forwarding again, without delay.

        Connections whose bytes a blackhole dropped cannot carry their
        protocol any more: by default they are reset, so both peers notice
        and reconnect (a peer back from a hang).  With ``reset=False`` they
        stay open and silent on both sides, as a connection to a host that
        vanished without a word (power loss) stays open at the survivor;
        new connections are forwarded normally."""

        async def do() -> None:
            self.mode = OPEN
            self.latency = 0.0
            if reset:
                self._abort([c for c in self._conns if c.dropped])

        self._run(do())

    @property
    def connections(self) -> int:
        return len(self._conns)

    def describe(self) -> str:
        extra = f", +{self.latency * 1000:.0f} ms" if self.latency else ""
        return (f"{self.name} {self.address}->{self.target[0]}:{self.target[1]} [{self.mode}{extra}] "
                f"conns={len(self._conns)} accepted={self.accepted} refused={self.refused} "
                f"fwd={self.bytes_forwarded} dropped={self.bytes_dropped}")

    # -- internals (proxy loop) ---------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10)

    def _abort(self, conns: Iterable[_Conn]) -> None:
        for conn in list(conns):
            conn.abort()
            self._conns.discard(conn)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == CUT:
            self.refused += 1
            writer.transport.abort()
            return
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            if self.mode == BLACKHOLE:
                # A hung peer: the connection is accepted and nothing answers.
                conn.dropped = True
                while data := await reader.read(CHUNK):
                    self.bytes_dropped += len(data)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                conn.abort()  # the peer is down: the client sees a reset, like a refused connect
                return
            conn.upstream = up_writer
            if conn not in self._conns:  # cut meanwhile
                conn.abort()
                return
            pumps = [asyncio.create_task(self._pump(reader, up_writer, conn)),
                     asyncio.create_task(self._pump(up_reader, writer, conn))]
            conn.tasks.extend(pumps)
            await asyncio.gather(*pumps, return_exceptions=True)
            if not self._dropping(conn):
                self._close(conn)
        except (asyncio.CancelledError, OSError):
            if not self._dropping(conn):
                conn.abort()
        finally:
            if not self._dropping(conn):
                self._conns.discard(conn)

    def _dropping(self, conn: _Conn) -> bool:
        """Whether ``conn`` drops what it carries: it does from the first
        moment of a blackhole on (bytes, end of stream and resets alike)."""
        if self.mode == BLACKHOLE:
            conn.dropped = True
        return conn.dropped

    def _close(self, conn: _Conn) -> None:
        for w in (conn.client, conn.upstream):
            if w is not None and not w.transport.is_closing():
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: _Conn) -> None:
        """Copy one direction; each chunk leaves ``latency`` seconds after it arrived.

        A reset on either side resets the other (as a real connection would);
        an end of stream is passed on as one.  On a connection whose bytes
        were dropped nothing is passed on at all: it stays open, silent,
        until heal() resets it or cut() closes everything."""
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        arrived = asyncio.Event()
        finished = False

        def dropping() -> bool:
            return self._dropping(conn)

        async def sender() -> None:
            while True:
                while not queue:
                    if finished:
                        return
                    arrived.clear()
                    await arrived.wait()
                due, data = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if dropping():
                    self.bytes_dropped += len(data)
                    continue
                dst.write(data)
                self.bytes_forwarded += len(data)
                await dst.drain()

        send_task = asyncio.create_task(sender())
        conn.tasks.append(send_task)
        try:
            while data := await src.read(CHUNK):
                if dropping():
                    self.bytes_dropped += len(data)
                    continue
                queue.append((time.monotonic() + self.latency, data))
                arrived.set()
                if send_task.done():
                    break
            finished = True
            arrived.set()
            await send_task
        except (OSError, asyncio.IncompleteReadError):
            if not dropping():
                conn.abort()
            return
        finally:
            finished = True
            arrived.set()
        if send_task.exception() is not None:
            if not dropping():
                conn.abort()
            return
        if not dropping() and dst.can_write_eof() and not dst.transport.is_closing():
            with contextlib.suppress(OSError):
                dst.write_eof()


class Direction:
    """The proxies of one direction: the interconnect's and the replication
    data port's (when the far site serves one), faulted together."""

    def __init__(self, far: Any, near: Any, name: str) -> None:
        self.interconnect = FaultProxy(far.interconnect, name=name).start()
        self.proxies = [self.interconnect]
        near.peer_addresses[far.system_id] = self.interconnect.address
        if far.data_port:
            data = FaultProxy(far.data_address, name=f"{name} data").start()
            self.proxies.append(data)
            near.peer_data_addresses[far.system_id] = data.address

    @property
    def address(self) -> str:
        return self.interconnect.address

    def cut(self) -> None:
        for p in self.proxies:
            p.cut()

    def blackhole(self) -> None:
        for p in self.proxies:
            p.blackhole()

    def delay(self, seconds: float) -> None:
        for p in self.proxies:
            p.delay(seconds)

    def heal(self, reset: bool = True) -> None:
        for p in self.proxies:
            p.heal(reset)

    def close(self) -> None:
        for p in self.proxies:
            p.close()

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.proxies)


class ProxyPair:
    """One proxy per direction between a primary and a secondary Site, so
    that every fault is symmetric.  Configure before the sites start."""

    def __init__(self, primary: Any, secondary: Any) -> None:
        self.to_secondary = Direction(secondary, primary, "primary->secondary")
        self.to_primary = Direction(primary, secondary, "secondary->primary")

    def __iter__(self) -> Iterator[FaultProxy]:
        return iter((*self.to_secondary.proxies, *self.to_primary.proxies))

    def _each(self, fn: Callable[[FaultProxy], None]) -> None:
        for proxy in self:
            fn(proxy)

    def cut(self) -> None:
        self._each(FaultProxy.cut)

    def blackhole(self) -> None:
        self._each(FaultProxy.blackhole)

    def delay(self, seconds: float) -> None:
        self._each(lambda p: p.delay(seconds))

    def heal(self, reset: bool = True) -> None:
        self._each(lambda p: p.heal(reset))

    def close(self) -> None:
        self._each(FaultProxy.close)

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self)
