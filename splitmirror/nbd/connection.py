"""One NBD client connection: an :class:`asyncio.Protocol` around :class:`~splitmirror.nbd.codec.NbdCodec`.

No stream objects and no reader task: every chunk the transport delivers is
fed to the codec and every request already buffered is parsed and dispatched
at once.  Each command runs as its own task, so many are in flight and
replies go out in completion order; the replies completed in one event-loop
turn are handed to the transport together (one ``writelines``, a READ's data
after its header without being copied).

Flow control: at most ``max_in_flight`` commands and ``max_in_flight_bytes``
of their payloads per connection; beyond that, and while the transport's
write buffer is full (a client that does not read its replies), the
connection stops reading.  What the handshake answers is decided in
:mod:`~splitmirror.nbd.options`, what a command does in
:mod:`~splitmirror.nbd.commands`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Coroutine, Generator
from typing import Final, Protocol, cast

from .backend import Export
from .codec import CommandRejected, CommandRequest, ConnectionClosed, NbdCodec, NeedData, OptionRequest, ProtocolError
from .commands import Reply, cost, log_refused, reply_to
from .options import HandshakeContext, answer_option

__all__ = ["READ_CHUNK", "Connection", "ServerSettings"]

READ_CHUNK: Final = 1024 * 1024  # kept for callers sizing their own reads


class ServerSettings(HandshakeContext, Protocol):
    """What a connection reads from the server that accepted it, each time it needs it."""

    @property
    def max_in_flight(self) -> int: ...

    @property
    def max_in_flight_bytes(self) -> int: ...

    @property
    def handshake_timeout(self) -> float: ...


def _peer(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(``host:port`` for the log, the address alone)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}", str(peer[0])
    return str(peer), str(peer)


class _Pass:
    """Hands what a coroutine stepped by hand is waiting on to the task that drives it on."""

    __slots__ = ("pending",)

    def __init__(self, pending: object) -> None:
        self.pending = pending

    def __await__(self) -> Generator[object, None, None]:
        yield self.pending


async def _resume(coro: Coroutine[object, None, None], pending: object) -> None:
    """Drive on, as a task, a coroutine whose first step ran outside any task."""
    while True:
        try:
            await _Pass(pending)
        except BaseException as exc:  # cancelled: the coroutine decides what that means
            try:
                pending = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            pending = coro.send(None)
        except StopIteration:
            return


class Connection(asyncio.Protocol):
    """One client: handshake, then commands dispatched as they are parsed."""

    def __init__(self, server: ServerSettings, admit: Callable[[Connection], str | None],
                 on_closed: Callable[[Connection], None]) -> None:
        self.server = server
        self.log = server.log
        self._admit = admit  # the server's connection caps: why this one is refused, or None
        self._on_closed = on_closed
        self.codec = NbdCodec(max_request=server.max_request)
        self.export: Export | None = None
        self.export_name = "-"
        self.peer = self.address = "?"
        self.transport: asyncio.Transport | None = None
        self.refused = False
        #: Set once the connection is gone and its commands are done.
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = 0  # commands dispatched, reply not yet handed to the transport
        self._held = 0  # their payload bytes
        self._waiting: CommandRequest | None = None  # parsed, dispatched when there is room
        self._out: Reply = []
        self._out_held = 0
        self._flush_handle: asyncio.Handle | None = None
        self._write_paused = False
        self._reading_paused = False
        self._tls_switch = False
        self._tls_on = False
        self._cert: bytes | None = None
        self._ended: str | None = None  # no more input will be processed, and why
        self._lost = False
        self._deadline: asyncio.TimerHandle | None = None
        self._processing = False

    # ------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass Transport
        self.peer, self.address = _peer(transport)
        refusal = self._admit(self)
        if refusal is not None:
            self.refused = True
            transport.abort()
            return
        self.log.info("nbd %s: connection opened", self.peer)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.server.handshake_timeout, self._expire)
        transport.write(self.codec.send_greeting())

    def data_received(self, data: bytes) -> None:
        if self._ended is not None:
            return
        if self._tls_switch:  # plaintext after STARTTLS would run with the TLS client's identity
            self._injected()
            return
        self.codec.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self._ended is None and not self._tls_switch:
            self.codec.receive_data(b"")
            self._process()
        return True  # replies to commands in flight may still go out; closed when they are done

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._deadline is not None:
            self._deadline.cancel()
        if self._ended is None:
            self._ended = "client closed the connection" + (" mid-message" if self.codec.mid_message else "")
        self._out.clear()
        self._held -= self._out_held
        self._out_held = 0
        self._settle()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flush()
        self._process()

    # --------------------------------------------------------------- parsing

    def _process(self) -> None:
        """Dispatch every event the buffered bytes hold, as far as the limits let."""
        codec = self.codec
        self._processing = True
        try:
            self._process_events(codec)
        finally:
            self._processing = False
        if self._out and self._flush_handle is not None:  # replies of commands done inline: out now, together
            self._flush_handle.cancel()
            self._flush()
        self._update_reading()

    def _process_events(self, codec: NbdCodec) -> None:
        while self._ended is None and not self._tls_switch and not self._write_paused:
            if self._waiting is not None:
                if not self._room(cost(self._waiting)):
                    break
                request, self._waiting = self._waiting, None
                self._dispatch(request)
                continue
            event = codec.next_event()
            if isinstance(event, NeedData):
                break
            if isinstance(event, CommandRequest):
                if self._room(cost(event)):
                    self._dispatch(event)
                else:
                    self._waiting = event
            elif isinstance(event, OptionRequest):
                self._option(event)
            elif isinstance(event, CommandRejected):
                log_refused(self.log, self.peer, self.export_name, event.type, event.offset, event.length,
                            event.error, event.message)
                self._reply([codec.send_error(event.handle, event.error, event.message)], 0)
            elif isinstance(event, ProtocolError):
                self.log.warning("nbd %s: protocol error (export %s): %s", self.peer, self.export_name, event.message)
                self._end("protocol error")
            else:
                assert isinstance(event, ConnectionClosed)
                self._end(event.reason)

    def _room(self, size: int) -> bool:
        if self._running >= self.server.max_in_flight:
            return False
        return not self._held or self._held + size <= self.server.max_in_flight_bytes

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost or transport.is_closing() or self._tls_switch:
            return
        stop = self._waiting is not None or self._write_paused or self._ended is not None
        if stop and not self._reading_paused:
            transport.pause_reading()
        elif not stop and self._reading_paused:
            transport.resume_reading()
        self._reading_paused = stop

    def _end(self, reason: str) -> None:
        """Process no more input; close once the commands in flight have replied."""
        if self._ended is None:
            self._ended = reason
        self._settle()

    def _settle(self) -> None:
        if self._running:
            return
        transport = self.transport
        if not self._lost and transport is not None:
            self._flush()
            transport.close()  # the buffered replies go out first
            return
        if not self.finished.done():
            if not self.refused:
                self.log.info("nbd %s: connection closed (export %s): %s", self.peer, self.export_name, self._ended)
            self.finished.set_result(None)
            self._on_closed(self)

    def _expire(self) -> None:
        if self.export is None and self._ended is None and self.transport is not None:
            timeout = self.server.handshake_timeout
            self.log.warning("nbd %s: handshake not finished within %g s; hanging up", self.peer, timeout)
            self._ended = f"handshake not finished within {timeout:g} s"
            self.transport.abort()

    # --------------------------------------------------------------- options

    def _option(self, request: OptionRequest) -> None:
        outcome = answer_option(self.server, self.codec, request, peer=self.peer, address=self.address,
                                cert=self._cert, tls_on=self._tls_on)
        if outcome.send:
            self._write(outcome.send)
        if outcome.attach is not None:
            if self._deadline is not None:
                self._deadline.cancel()
            self.export = outcome.attach
            self.export_name = outcome.attach.name
            self.log.debug("nbd %s: attached export %s", self.peer, self.export_name)
        if outcome.end is not None:
            self._end(outcome.end)
        elif outcome.starttls:
            self._tls_switch = True
            task = asyncio.get_running_loop().create_task(self._start_tls())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _injected(self) -> None:
        self.log.warning("nbd %s: plaintext bytes after NBD_OPT_STARTTLS; hanging up", self.peer)
        self._ended = "data injected before the TLS handshake"
        if self.transport is not None:
            self.transport.abort()

    async def _start_tls(self) -> None:
        tls, transport = self.server.tls, self.transport
        assert tls is not None and transport is not None
        try:
            new = await asyncio.get_running_loop().start_tls(
                transport, self, tls, server_side=True, ssl_handshake_timeout=self.server.handshake_timeout)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            self.log.warning("nbd %s: TLS handshake failed: %s", self.peer, exc)
            if self._ended is None:
                self._ended = "TLS handshake failed"
            transport.abort()
            return
        if new is None or self._ended is not None:
            return
        self.transport = new
        self._tls_switch = False
        self._tls_on = True
        self._reading_paused = False
        ssl_object = new.get_extra_info("ssl_object")
        self._cert = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.log.debug("nbd %s: TLS on", self.peer)
        self._injected() if self.codec.mid_message else self._process()

    # -------------------------------------------------------------- commands

    def _dispatch(self, request: CommandRequest) -> None:
        """Run a command at once (a cached read, a small write need no task); one that waits becomes a task."""
        size = cost(request)
        self._running += 1
        self._held += size
        coro = self._run(request, size)
        try:
            pending = coro.send(None)
        except StopIteration:
            return
        task = asyncio.get_running_loop().create_task(_resume(coro, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request: CommandRequest, size: int) -> None:
        assert self.export is not None  # commands come only after EXPORT_NAME or GO attached one
        try:
            reply = await reply_to(self.export, self.codec, request, self.log, self.peer)
        except asyncio.CancelledError:
            self._running -= 1
            self._held -= size
            self._settle()
            raise
        self._running -= 1
        self._reply(reply, size)
        if self._ended is not None:
            self._settle()
        elif not self._processing:  # else the loop in _process goes on by itself
            self._process()

    # --------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self._lost:
            self.transport.write(data)

    def _reply(self, reply: Reply, size: int) -> None:
        """Queue a reply; the replies of one loop turn are written together."""
        if self._lost:
            self._held -= size
            return
        self._out.extend(reply)
        self._out_held += size
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._write_paused or not self._out or self.transport is None or self._lost:
            return
        out, self._out = self._out, []
        self.transport.writelines(out)
        self._held -= self._out_held
        self._out_held = 0

    # -------------------------------------------------------------- shutdown

    async def shutdown(self, grace: float) -> None:
        """End the connection: commands in flight get ``grace`` seconds, then are cancelled."""
        if self._ended is None:
            self._ended = "server shutting down"
        self._update_reading()
        tasks = set(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._settle()
        if self.transport is not None and not self._lost:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.finished), 1.0)
            if not self.finished.done():
                self.transport.abort()
        await self.finished
