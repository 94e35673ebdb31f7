"""One NBD client connection: the asyncio I/O driver around :class:`~splitmirror.nbd.codec.NbdCodec`.

One task per connection reads and decodes; every command runs as its own
task, so many requests are in flight per connection and replies go out in
completion order.  Writes to the socket are serialised by a lock and the
number of commands in flight per connection is bounded.  What the replies
carry is decided in :mod:`~splitmirror.nbd.reply_values`; the codec encodes
it; this module only moves bytes and calls the export.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Final, Protocol

from .backend import Admission, Export, ExportCatalog, ExportError
from .codec import (
    CommandRejected,
    CommandRequest,
    ConnectionClosed,
    NbdCodec,
    NeedData,
    OptionRequest,
    ProtocolError,
)
from .constants import (
    BASE_ALLOCATION,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    OptionReply,
)
from .reply_values import (
    ALLOCATION_ID,
    command_name,
    descriptors,
    meta_context_id,
    option_refusal,
    preferred_block_size,
    transmission_flags,
    wire_errno,
)

__all__ = ["READ_CHUNK", "Connection", "ServerSettings"]

READ_CHUNK: Final = 1024 * 1024  # bytes asked of the socket per read


class ServerSettings(Protocol):
    """What a connection reads from the server that accepted it, each time it needs it."""

    @property
    def catalog(self) -> ExportCatalog: ...

    @property
    def max_request(self) -> int: ...

    @property
    def max_in_flight(self) -> int: ...

    @property
    def max_in_flight_bytes(self) -> int: ...

    @property
    def handshake_timeout(self) -> float: ...

    @property
    def tls(self) -> ssl.SSLContext | None: ...

    @property
    def admit(self) -> Admission | None: ...

    @property
    def log(self) -> logging.Logger: ...


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes the stream holds that no one has read yet."""
    buffer = getattr(reader, "_buffer", b"")
    return len(buffer) if isinstance(buffer, bytes | bytearray) else 0


class Connection:
    """One client: handshake, then a read loop spawning command tasks."""

    def __init__(
        self,
        server: ServerSettings,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        shutdown_grace: float,
    ) -> None:
        self.server = server
        #: Seconds in-flight commands get to complete when the server shuts down.
        self.shutdown_grace = shutdown_grace
        self.log = server.log
        self.reader = reader
        self.writer = writer
        self.peer = _peer_name(writer)
        self.codec = NbdCodec(max_request=server.max_request)
        self.export: Export | None = None
        self.export_name = "-"
        self._write_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(server.max_in_flight)
        #: Payload bytes of requests and replies this connection holds now.
        self._held = 0
        self._released = asyncio.Event()
        self._deadline: asyncio.TimerHandle | None = None
        self._expired = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._broken = False
        self._tls_done = False
        self._peer_cert: bytes | None = None
        peer = writer.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)

    async def serve(self) -> None:
        self.log.info("nbd %s: connection opened", self.peer)
        reason = "connection lost"
        grace: float | None = None  # a departed client's commands still complete
        self._deadline = asyncio.get_running_loop().call_later(self.server.handshake_timeout, self._expire)
        try:
            await self._send(self.codec.send_greeting())
            reason = await self._read_loop()
            if self._expired:
                reason = f"handshake not finished within {self.server.handshake_timeout:g} s"
        except asyncio.CancelledError:
            reason = "server shutting down"
            grace = self.shutdown_grace
            raise
        except Exception:
            self.log.exception("nbd %s: internal error (export %s)", self.peer, self.export_name)
            reason = "internal error"
        finally:
            self._deadline.cancel()
            try:
                await self._finish_commands(grace)
            finally:
                self.writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await self.writer.wait_closed()
                self.log.info("nbd %s: connection closed (export %s): %s", self.peer, self.export_name, reason)

    async def _read_loop(self) -> str:
        """Decode and dispatch until the connection ends; returns why."""
        codec = self.codec
        while True:
            event = codec.next_event()
            if isinstance(event, NeedData):
                codec.receive_data(await self._receive())
            elif isinstance(event, OptionRequest):
                end = await self._handle_option(event)
                if end is not None:
                    return end
            elif isinstance(event, CommandRequest):
                await self._slots.acquire()
                cost = _cost(event)
                while self._held and self._held + cost > self.server.max_in_flight_bytes:
                    # Replies wait (a client that does not read them): read no more requests.
                    self._released.clear()
                    await self._released.wait()
                self._held += cost
                task = asyncio.create_task(self._run_command(event, cost))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(event, CommandRejected):
                self._refused(event.type, event.offset, event.length, event.error, event.message)
                await self._send(codec.send_error(event.handle, event.error, event.message))
            elif isinstance(event, ProtocolError):
                self.log.warning(
                    "nbd %s: protocol error (export %s): %s",
                    self.peer,
                    self.export_name,
                    event.message,
                )
                return "protocol error"
            else:
                assert isinstance(event, ConnectionClosed)
                return event.reason

    async def _receive(self) -> bytes:
        if self._broken:
            return b""
        try:
            return await self.reader.read(READ_CHUNK)
        except (ConnectionError, OSError):
            return b""

    async def _send(self, data: bytes) -> None:
        async with self._write_lock:
            if self._broken or self.writer.is_closing():
                return
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError):
                self._broken = True

    async def _finish_commands(self, grace: float | None) -> None:
        """Let in-flight commands complete; cancel those still running after ``grace`` s."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # ---------------------------------------------------------------- options

    def _refusal(self, name: str, listing: bool = False) -> str | None:
        admit = self.server.admit
        return None if admit is None else admit(name, self.address, self._peer_cert, listing)

    def _open(self, name: str) -> Export | ExportError:
        refusal = self._refusal(name)
        if refusal is not None:
            return ExportError(Errno.EPERM, refusal)
        try:
            return self.server.catalog.open_export(name)
        except ExportError as exc:
            return exc
        except Exception:
            self.log.exception("nbd %s: opening export %r failed", self.peer, name)
            return ExportError(Errno.EIO, "internal error opening the export")

    def _attach(self, export: Export) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self.export = export
        self.export_name = export.name
        self.log.debug("nbd %s: attached export %s", self.peer, export.name)

    async def _handle_option(self, request: OptionRequest) -> str | None:
        """Answer one option; returns why the connection must end, if it must."""
        codec = self.codec
        option = request.option
        if request.invalid is not None:
            self.log.warning("nbd %s: invalid option %d: %s", self.peer, option, request.invalid)
            if option == Option.EXPORT_NAME:
                return "invalid NBD_OPT_EXPORT_NAME"
            await self._send(codec.send_option_error(option, OptionReply.ERR_INVALID, request.invalid))
            return None
        if option == Option.STARTTLS:
            return await self._starttls()
        if self.server.tls is not None and not self._tls_done:
            if option == Option.EXPORT_NAME:
                self.log.warning("nbd %s: NBD_OPT_EXPORT_NAME without TLS refused", self.peer)
                return "TLS required"
            if option != Option.ABORT:
                await self._send(codec.send_option_error(option, OptionReply.ERR_TLS_REQD, "TLS is required"))
                return None
        match option:
            case Option.EXPORT_NAME:
                export = self._open(request.name)
                if isinstance(export, ExportError):
                    self._refused_export(request.name, export)
                    return "NBD_OPT_EXPORT_NAME refused"
                self._attach(export)
                flags = transmission_flags(export, codec.structured_replies)
                await self._send(codec.send_export_name_reply(export.size, flags))
            case Option.INFO | Option.GO:
                await self._info_or_go(request)
            case Option.LIST:
                names = [n for n in self.server.catalog.export_names() if self._refusal(n, listing=True) is None]
                out = [codec.send_server_entry(name) for name in names]
                out.append(codec.send_option_ack(option))
                await self._send(b"".join(out))
            case Option.ABORT:
                await self._send(codec.send_option_ack(option))
                return "client sent NBD_OPT_ABORT"
            case Option.STRUCTURED_REPLY:
                await self._send(codec.send_option_ack(option))
            case Option.LIST_META_CONTEXT | Option.SET_META_CONTEXT:
                await self._meta_context(request)
            case _:
                self.log.debug("nbd %s: unsupported option %d", self.peer, option)
                await self._send(
                    codec.send_option_error(option, OptionReply.ERR_UNSUP, f"option {option} is not supported")
                )
        return None

    async def _starttls(self) -> str | None:
        codec = self.codec
        tls = self.server.tls
        if tls is None:
            await self._send(codec.send_option_error(Option.STARTTLS, OptionReply.ERR_UNSUP, "TLS is not configured"))
            return None
        if self._tls_done:
            await self._send(codec.send_option_error(Option.STARTTLS, OptionReply.ERR_INVALID, "TLS already on"))
            return None
        await self._send(codec.send_option_ack(Option.STARTTLS))
        try:
            async with self._write_lock:
                await self.writer.start_tls(tls)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            self.log.warning("nbd %s: TLS handshake failed: %s", self.peer, exc)
            self._broken = True
            return "TLS handshake failed"
        if _buffered(self.reader) or self.codec.buffered:
            # Plaintext that arrived before the switch would run with the TLS
            # client's identity (nbdkit CVE-2021-3716): hang up.
            self.log.warning("nbd %s: plaintext bytes after NBD_OPT_STARTTLS; hanging up", self.peer)
            self._broken = True
            return "data injected before the TLS handshake"
        self._tls_done = True
        ssl_object = self.writer.get_extra_info("ssl_object")
        self._peer_cert = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.log.debug("nbd %s: TLS on", self.peer)
        return None

    async def _info_or_go(self, request: OptionRequest) -> None:
        codec = self.codec
        option = request.option
        export = self._open(request.name)
        if isinstance(export, ExportError):
            self._refused_export(request.name, export)
            reply = option_refusal(export)
            await self._send(codec.send_option_error(option, reply, export.message))
            return
        out = [
            codec.send_export_info(option, export.size, transmission_flags(export, codec.structured_replies)),
            codec.send_block_size_info(
                option, 1, preferred_block_size(export, self.server.max_request), self.server.max_request
            ),
        ]
        if Info.NAME in request.info_requests:
            out.append(codec.send_text_info(option, Info.NAME, export.name))
        out.append(codec.send_option_ack(option))
        if option == Option.GO:
            self._attach(export)
        await self._send(b"".join(out))

    async def _meta_context(self, request: OptionRequest) -> None:
        codec = self.codec
        option = request.option
        context_id = meta_context_id(option, request.queries)
        out = [] if context_id is None else [codec.send_meta_context(option, context_id, BASE_ALLOCATION)]
        out.append(codec.send_option_ack(option))
        await self._send(b"".join(out))

    def _refused_export(self, name: str, exc: ExportError) -> None:
        self.log.warning("nbd %s: refused export %r: %s (errno %d)", self.peer, name, exc.message, exc.errno)

    # --------------------------------------------------------------- commands

    def _refused(self, ctype: int, offset: int, length: int, error: int, message: str) -> None:
        self.log.warning(
            "nbd %s: refused %s offset=%d length=%d on export %s: %s (%s)",
            self.peer,
            command_name(ctype),
            offset,
            length,
            self.export_name,
            message,
            wire_errno(error).name,
        )

    def _expire(self) -> None:
        if self.export is None and not self._broken:
            self._expired = True
            self.log.warning("nbd %s: handshake not finished within %g s; hanging up", self.peer,
                             self.server.handshake_timeout)
            self._broken = True
            self.writer.transport.abort()

    async def _run_command(self, request: CommandRequest, cost: int) -> None:
        codec = self.codec
        try:
            try:
                export = self.export
                assert export is not None  # commands come only after EXPORT_NAME or GO attached one
                reply = await _execute(export, codec, request)
            except ExportError as exc:
                errno = wire_errno(exc.errno)
                self._refused(request.type, request.offset, request.length, errno, exc.message)
                reply = codec.send_error(request.handle, errno, exc.message)
            except Exception:
                self.log.exception(
                    "nbd %s: %s offset=%d length=%d on export %s failed",
                    self.peer,
                    request.type.name,
                    request.offset,
                    request.length,
                    self.export_name,
                )
                reply = codec.send_error(request.handle, Errno.EIO, "internal server error")
            await self._send(reply)
        finally:
            self._held -= cost
            self._released.set()
            self._slots.release()


def _cost(request: CommandRequest) -> int:
    """Payload bytes a command holds until its reply is sent."""
    return request.length if request.type in (Command.READ, Command.WRITE) else 0


def _check_writable(export: Export) -> None:
    if export.read_only():
        raise ExportError(Errno.EPERM, "export is read-only")


async def _execute(export: Export, codec: NbdCodec, request: CommandRequest) -> bytes:
    """Run one transmission command on ``export``; returns the encoded reply.

    Raises :class:`ExportError` for what the export refuses.
    """
    handle, offset, length = request.handle, request.offset, request.length
    fua = CommandFlag.FUA in request.flags
    match request.type:
        case Command.READ:
            data = await export.read(offset, length)
            if len(data) != length:
                raise ExportError(Errno.EIO, f"backend returned {len(data)} of {length} bytes")
            return codec.send_read_reply(handle, offset, data)
        case Command.WRITE:
            _check_writable(export)
            await export.write(offset, request.data, fua)
        case Command.FLUSH:
            await export.flush()
        case Command.TRIM:
            _check_writable(export)
            await export.trim(offset, length)
            if fua:
                await export.flush()
        case Command.WRITE_ZEROES:
            _check_writable(export)
            await export.write_zeroes(offset, length, fua)
        case Command.BLOCK_STATUS:
            extents = await export.allocation(offset, length)
            req_one = CommandFlag.REQ_ONE in request.flags
            return codec.send_block_status(handle, ALLOCATION_ID, descriptors(extents, length, req_one))
        case _:
            raise ExportError(Errno.EINVAL, f"unsupported command {request.type.name}")
    return codec.send_ok(handle)
