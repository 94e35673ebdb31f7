"""Sans-I/O NBD server protocol machine, in the style of h11.

Feed received bytes with :meth:`NbdCodec.receive_data` (``b""`` means the
peer closed its side) and pull parsed events with :meth:`NbdCodec.next_event`
until it returns :class:`NeedData`.  Every ``send_*`` method returns the
bytes to put on the wire and advances the state machine; the caller does
the I/O.  There is no asyncio and no socket in here.

Peer mistakes never raise: a fatal one is returned as a :class:`ProtocolError`
event (the caller should hang up), a refusable request as
:class:`CommandRejected` (the caller sends the error reply).  Misuse by the
server side (e.g. replying to an option that was not asked) raises
:class:`LocalProtocolError`.

Phases: greeting -> client flags -> option haggling (one option at a time,
each answered before the next is parsed) -> transmission -> closing/closed.
Every transition is listed in :data:`_TRANSITIONS`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from .constants import (
    DEFAULT_MAX_REQUEST,
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

__all__ = [
    "CommandRejected",
    "CommandRequest",
    "ConnectionClosed",
    "Event",
    "LocalProtocolError",
    "NbdCodec",
    "NeedData",
    "OptionRequest",
    "ProtocolError",
    "State",
]

_GREETING: Final = struct.Struct(">QQH")
_CLIENT_FLAGS: Final = struct.Struct(">I")
_OPTION_HEADER: Final = struct.Struct(">QII")
_OPTION_REPLY: Final = struct.Struct(">QIII")
_REQUEST: Final = struct.Struct(">IHHQQI")
_SIMPLE_REPLY: Final = struct.Struct(">IIQ")
_CHUNK: Final = struct.Struct(">IHHQI")
_DATA_CHUNK: Final = struct.Struct(">IHHQIQ")  # an OFFSET_DATA chunk header with its offset
_EXPORT_REPLY: Final = struct.Struct(">QH")
_INFO_EXPORT: Final = struct.Struct(">HQH")
_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_ERROR_HEAD: Final = struct.Struct(">IH")
_EXTENT: Final = struct.Struct(">II")

_U32_MAX: Final = 0xFFFFFFFF
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
_WRITING: Final = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_NEEDS_FLAG: Final = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}
# Command flags valid per command, on top of FUA (valid everywhere once
# NBD_FLAG_SEND_FUA is advertised).  DF additionally needs NBD_FLAG_SEND_DF.
_COMMAND_FLAGS: Final = {
    Command.READ: CommandFlag.DF,
    Command.WRITE: CommandFlag(0),
    Command.FLUSH: CommandFlag(0),
    Command.TRIM: CommandFlag(0),
    Command.WRITE_ZEROES: CommandFlag.NO_HOLE,
    Command.BLOCK_STATUS: CommandFlag.REQ_ONE,
}
# Which option each partial (non-final) reply type may answer.
_PARTIAL_REPLIES: Final = {
    OptionReply.SERVER: frozenset({Option.LIST}),
    OptionReply.INFO: frozenset({Option.INFO, Option.GO}),
    OptionReply.META_CONTEXT: frozenset({Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT}),
}


class LocalProtocolError(Exception):
    """The server side used the codec wrongly (a bug in the caller)."""


# --------------------------------------------------------------------- events


@dataclass(frozen=True)
class NeedData:
    """Nothing can be parsed until more bytes are fed with receive_data()."""


@dataclass(frozen=True)
class OptionRequest:
    """One option from the client; the server must answer it before the next.

    ``name`` is the export name (EXPORT_NAME, INFO, GO, *_META_CONTEXT),
    ``info_requests`` the NBD_INFO_* items asked by INFO/GO and ``queries``
    the metadata context queries.  When ``invalid`` is set the payload was
    malformed: reply NBD_REP_ERR_INVALID (or hang up for EXPORT_NAME).
    """

    option: int
    data: bytes = b""
    name: str = ""
    info_requests: tuple[int, ...] = ()
    queries: tuple[str, ...] = ()
    invalid: str | None = None


@dataclass(frozen=True)
class CommandRequest:
    """A valid transmission request; WRITE carries its complete payload."""

    handle: int
    type: Command
    flags: CommandFlag
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True)
class CommandRejected:
    """A request the codec refused; send ``error`` back (see send_error())."""

    handle: int
    type: int
    flags: int
    offset: int
    length: int
    error: Errno
    message: str


@dataclass(frozen=True)
class ConnectionClosed:
    """No more input: EOF, NBD_CMD_DISC, NBD_OPT_ABORT or an earlier error."""

    clean: bool
    reason: str


@dataclass(frozen=True)
class ProtocolError:
    """The client broke the protocol beyond repair; hang up."""

    message: str


Event = NeedData | OptionRequest | CommandRequest | CommandRejected | ConnectionClosed | ProtocolError


# -------------------------------------------------------------- state machine


class State(Enum):
    GREETING = auto()  # the server has not sent its greeting yet
    CLIENT_FLAGS = auto()  # waiting for the client's 32-bit flags
    OPTIONS = auto()  # waiting for the next option
    OPTION_REPLY = auto()  # an option arrived; the server owes its final reply
    TRANSMISSION = auto()  # requests and replies
    CLOSING = auto()  # input ended; replies to outstanding requests may go out
    CLOSED = auto()  # nothing more in either direction


class Trigger(Enum):
    SEND_GREETING = auto()
    RECV_CLIENT_FLAGS = auto()
    RECV_OPTION = auto()
    SEND_PARTIAL_REPLY = auto()  # NBD_REP_SERVER / _INFO / _META_CONTEXT
    SEND_FINAL_REPLY = auto()  # NBD_REP_ACK or an error
    SEND_ABORT_ACK = auto()  # final reply to NBD_OPT_ABORT
    ENTER_TRANSMISSION = auto()  # GO acknowledged / EXPORT_NAME answered
    RECV_REQUEST = auto()
    SEND_REPLY = auto()
    RECV_DISC = auto()
    INPUT_ENDED = auto()  # EOF or a fatal protocol error from the peer


_TRANSITIONS: Final[dict[tuple[State, Trigger], State]] = {
    (State.GREETING, Trigger.SEND_GREETING): State.CLIENT_FLAGS,
    (State.CLIENT_FLAGS, Trigger.RECV_CLIENT_FLAGS): State.OPTIONS,
    (State.OPTIONS, Trigger.RECV_OPTION): State.OPTION_REPLY,
    (State.OPTION_REPLY, Trigger.SEND_PARTIAL_REPLY): State.OPTION_REPLY,
    (State.OPTION_REPLY, Trigger.SEND_FINAL_REPLY): State.OPTIONS,
    (State.OPTION_REPLY, Trigger.SEND_ABORT_ACK): State.CLOSED,
    (State.OPTION_REPLY, Trigger.ENTER_TRANSMISSION): State.TRANSMISSION,
    (State.TRANSMISSION, Trigger.RECV_REQUEST): State.TRANSMISSION,
    (State.TRANSMISSION, Trigger.SEND_REPLY): State.TRANSMISSION,
    (State.TRANSMISSION, Trigger.RECV_DISC): State.CLOSING,
    (State.TRANSMISSION, Trigger.INPUT_ENDED): State.CLOSING,
    (State.CLOSING, Trigger.SEND_REPLY): State.CLOSING,
    (State.CLIENT_FLAGS, Trigger.INPUT_ENDED): State.CLOSED,
    (State.OPTIONS, Trigger.INPUT_ENDED): State.CLOSED,
}


def _take(buf: bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` with one copy instead of two."""
    with memoryview(buf) as view:
        return bytes(view[start:end])


class _Invalid(Exception):
    """A syntactically invalid option payload (-> NBD_REP_ERR_INVALID)."""


class _Fields:
    """Bounds-checked reader over an option payload."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise _Invalid("option payload is truncated")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise _Invalid(f"string of {n} bytes exceeds {MAX_STRING}")
        return _decode(self.take(n))

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _Invalid("trailing bytes in option payload")


def _decode(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("string is not valid UTF-8") from None
    if "\0" in text:
        raise _Invalid("string contains NUL")
    return text


def _parse_option(option: int, data: bytes, structured: bool) -> OptionRequest:
    try:
        match option:
            case Option.EXPORT_NAME:
                if len(data) > MAX_STRING:
                    raise _Invalid("export name too long")
                return OptionRequest(option, data, name=_decode(data))
            case Option.INFO | Option.GO:
                fields = _Fields(data)
                name = fields.string(fields.u32())
                count = fields.u16()
                requests = tuple(fields.u16() for _ in range(count))
                fields.end()
                return OptionRequest(option, data, name=name, info_requests=requests)
            case Option.LIST_META_CONTEXT | Option.SET_META_CONTEXT:
                if not structured:
                    raise _Invalid("structured replies were not negotiated")
                fields = _Fields(data)
                name = fields.string(fields.u32())
                count = fields.u32()
                queries = tuple(fields.string(fields.u32()) for _ in range(count))
                fields.end()
                return OptionRequest(option, data, name=name, queries=queries)
            case Option.LIST | Option.STRUCTURED_REPLY | Option.STARTTLS:
                if data:
                    raise _Invalid("this option takes no data")
    except _Invalid as exc:
        return OptionRequest(option, data, invalid=str(exc))
    return OptionRequest(option, data)


def _encode_message(message: str) -> bytes:
    """UTF-8 encode, cut to the protocol's string limit on a char boundary."""
    raw = message.encode("utf-8", "replace")[:MAX_STRING]
    return raw.decode("utf-8", "ignore").encode("utf-8")


# ---------------------------------------------------------------------- codec


class NbdCodec:
    """The server side of one NBD connection, without any I/O."""

    def __init__(
        self,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_option_data: int = MAX_OPTION_DATA,
        max_options: int = MAX_OPTIONS,
    ) -> None:
        if not 1 <= max_request <= _U32_MAX - 8:
            raise ValueError(f"max_request out of range: {max_request}")
        self.max_request = max_request
        self.max_option_data = max_option_data
        #: Options a client may send before it chooses an export (as nbdkit).
        self.max_options = max_options
        self.options_seen = 0
        # A refused WRITE up to this size has its payload skipped (reply
        # EINVAL); a larger one is treated as an attack and ends the session.
        self.discard_limit = 2 * max_request
        self.no_zeroes = False
        self.structured_replies = False
        self.meta_contexts: dict[int, str] = {}  # selected id -> context name
        self.export_name: str | None = None
        self.export_size = 0
        self.transmission_flags = TransmissionFlag(0)
        self._state = State.GREETING
        self._buf = bytearray()
        self._eof = False
        self._skip = 0  # payload bytes of a refused WRITE still to drop
        self._rejected: CommandRejected | None = None  # answered once its payload is dropped
        self._closed: ConnectionClosed | None = None
        self._pending: OptionRequest | None = None
        self._pending_export: tuple[int, TransmissionFlag] | None = None
        self._staged_contexts: dict[int, str] = {}
        self._meta_export: str | None = None

    @property
    def mid_message(self) -> bool:
        """Part of a message was received (the rest would be needed to parse it)."""
        return bool(self._buf or self._skip)

    @property
    def state(self) -> State:
        return self._state

    def _transition(self, trigger: Trigger) -> None:
        new = _TRANSITIONS.get((self._state, trigger))
        if new is None:
            raise LocalProtocolError(f"{trigger.name} is not allowed in {self._state.name}")
        self._state = new

    # ------------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self._state in (State.CLOSING, State.CLOSED):
            return
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError("data received after EOF")
        else:
            self._buf += data

    def next_event(self) -> Event:
        """Parse the next event from the bytes received so far."""
        if self._closed is not None:
            return self._closed
        if self._state is State.GREETING:
            raise LocalProtocolError("send_greeting() first")
        if self._state is State.OPTION_REPLY:
            raise LocalProtocolError("the pending option has not been answered")
        if self._skip:
            dropped = min(self._skip, len(self._buf))
            del self._buf[:dropped]
            self._skip -= dropped
        event: Event | None = None
        if not self._skip:
            event, self._rejected = self._rejected, None
            if event is None:
                event = _READERS[self._state](self)
        if event is not None:
            return event
        if self._eof:
            if self._buf or self._skip:
                return self._end(False, "client closed the connection mid-message")
            return self._end(True, "client closed the connection")
        return NeedData()

    def _end(self, clean: bool, reason: str) -> ConnectionClosed:
        self._transition(Trigger.INPUT_ENDED)
        self._closed = ConnectionClosed(clean, reason)
        self._buf.clear()
        return self._closed

    def _fail(self, message: str) -> ProtocolError:
        self._end(False, message)
        return ProtocolError(message)

    def _read_client_flags(self) -> Event | None:
        if len(self._buf) < _CLIENT_FLAGS.size:
            return None
        (flags,) = _CLIENT_FLAGS.unpack_from(self._buf)
        del self._buf[: _CLIENT_FLAGS.size]
        if flags & ~_KNOWN_CLIENT_FLAGS:
            return self._fail(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._transition(Trigger.RECV_CLIENT_FLAGS)
        return self._read_option()

    def _read_option(self) -> Event | None:
        buf = self._buf
        if len(buf) < _OPTION_HEADER.size:
            return None
        magic, option, length = _OPTION_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            return self._fail(f"bad option magic {magic:#x}")
        if self.options_seen >= self.max_options:
            return self._fail(f"more than {self.max_options} options without choosing an export")
        if length > self.max_option_data:
            return self._fail(f"option {option} payload of {length} bytes is too large")
        end = _OPTION_HEADER.size + length
        if len(buf) < end:
            return None
        data = bytes(buf[_OPTION_HEADER.size : end])
        del buf[:end]
        self.options_seen += 1
        if option == Option.STARTTLS and buf:
            # Bytes sent before the TLS handshake must not run after it with the
            # TLS client's identity (nbdkit CVE-2021-3716): hang up.
            return self._fail(f"{len(buf)} bytes sent after NBD_OPT_STARTTLS, before the TLS handshake")
        request = _parse_option(option, data, self.structured_replies)
        self._pending = request
        self._pending_export = None
        self._staged_contexts = {}
        if option == Option.SET_META_CONTEXT:  # replaces the set even on failure
            self.meta_contexts = {}
            self._meta_export = None
        self._transition(Trigger.RECV_OPTION)
        return request

    def _read_request(self) -> Event | None:
        buf = self._buf
        if len(buf) < _REQUEST.size:
            return None
        magic, flags, ctype, handle, offset, length = _REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            return self._fail(f"bad request magic {magic:#x}")
        refusal = self._check_request(ctype, flags, offset, length)
        payload = length if ctype == Command.WRITE else 0
        if refusal is None:
            end = _REQUEST.size + payload
            if len(buf) < end:
                return None
            data = _take(buf, _REQUEST.size, end) if payload else b""
            del buf[:end]
            if ctype == Command.DISC:
                self._transition(Trigger.RECV_DISC)
                self._closed = ConnectionClosed(True, "client sent NBD_CMD_DISC")
                return self._closed
            self._transition(Trigger.RECV_REQUEST)
            return CommandRequest(handle, Command(ctype), CommandFlag(flags), offset, length, data)
        if payload > self.discard_limit:
            return self._fail(f"WRITE of {payload} bytes is too large to skip")
        del buf[: _REQUEST.size]
        error, message = refusal
        self._transition(Trigger.RECV_REQUEST)
        rejected = CommandRejected(handle, ctype, flags, offset, length, error, message)
        if not payload:
            return rejected
        # The reply waits until the payload is consumed: a client (libnbd) that is
        # still sending the request cannot match a reply that overtakes it.
        self._skip = payload
        self._rejected = rejected
        return self.next_event() if self._buf else None

    def _check_request(self, ctype: int, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """Why a request must be refused, or None when it is acceptable."""
        if ctype == Command.DISC:
            return None
        tflags = self.transmission_flags
        try:
            command = Command(ctype)
            allowed = _COMMAND_FLAGS[command]
        except (ValueError, KeyError):
            return Errno.EINVAL, f"unsupported command {ctype}"
        if TransmissionFlag.SEND_FUA in tflags:
            allowed |= CommandFlag.FUA
        if TransmissionFlag.SEND_DF not in tflags:
            allowed &= ~CommandFlag.DF
        if flags & ~int(allowed):  # int: ~IntFlag only covers defined bits
            return Errno.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        needed = _NEEDS_FLAG.get(command)
        if needed is not None and needed not in tflags:
            return Errno.EINVAL, f"{command.name} was not advertised"
        if command is Command.BLOCK_STATUS:
            if not self.meta_contexts:
                return Errno.EINVAL, "no metadata context was negotiated"
            if length == 0:
                return Errno.EINVAL, "zero-length BLOCK_STATUS"
        if command in _WRITING and TransmissionFlag.READ_ONLY in tflags:
            return Errno.EPERM, "export is read-only"
        if command in (Command.READ, Command.WRITE) and length > self.max_request:
            return Errno.EINVAL, f"length {length} exceeds maximum {self.max_request}"
        if command is not Command.FLUSH and offset + length > self.export_size:
            error = Errno.ENOSPC if command in _WRITING - {Command.TRIM} else Errno.EINVAL
            return error, f"range {offset}+{length} beyond export size {self.export_size}"
        return None

    # ---------------------------------------------------------- handshaking

    def send_greeting(self) -> bytes:
        """The server's opening bytes (fixed newstyle, NO_ZEROES offered)."""
        self._transition(Trigger.SEND_GREETING)
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, _SERVER_HANDSHAKE_FLAGS)

    def _require_pending(self, option: int) -> OptionRequest:
        pending = self._pending
        if self._state is not State.OPTION_REPLY or pending is None:
            raise LocalProtocolError("no option is waiting for a reply")
        if pending.option != option:
            raise LocalProtocolError(f"reply for option {option}, pending is {pending.option}")
        return pending

    def send_option_reply(self, option: int, reply: int, data: bytes = b"") -> bytes:
        """One reply to the pending option; ACK or an error reply ends it."""
        pending = self._require_pending(option)
        if option == Option.EXPORT_NAME:
            raise LocalProtocolError("EXPORT_NAME: use send_export_name_reply() or hang up")
        packet = _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data
        if reply in _PARTIAL_REPLIES:
            if option not in _PARTIAL_REPLIES[OptionReply(reply)]:
                raise LocalProtocolError(f"reply {reply} does not answer option {option}")
            self._note_partial(OptionReply(reply), data)
            self._transition(Trigger.SEND_PARTIAL_REPLY)
        elif option == Option.ABORT:
            self._transition(Trigger.SEND_ABORT_ACK)
            self._closed = ConnectionClosed(True, "client sent NBD_OPT_ABORT")
        elif reply == OptionReply.ACK:
            self._acknowledge(pending)
        elif reply & (1 << 31):
            self._transition(Trigger.SEND_FINAL_REPLY)
        else:
            raise LocalProtocolError(f"unknown option reply type {reply}")
        return packet

    def _note_partial(self, reply: OptionReply, data: bytes) -> None:
        if reply is OptionReply.INFO and data[:2] == _U16.pack(Info.EXPORT):
            if len(data) != _INFO_EXPORT.size:
                raise LocalProtocolError("NBD_INFO_EXPORT must be 12 bytes")
            _, size, flags = _INFO_EXPORT.unpack(data)
            self._pending_export = size, TransmissionFlag(flags)
        elif reply is OptionReply.META_CONTEXT:
            if len(data) < 4:
                raise LocalProtocolError("NBD_REP_META_CONTEXT needs an id")
            (context_id,) = _U32.unpack_from(data)
            self._staged_contexts[context_id] = data[4:].decode("utf-8")

    def _acknowledge(self, pending: OptionRequest) -> None:
        option = pending.option
        if option in (Option.INFO, Option.GO) and self._pending_export is None:
            raise LocalProtocolError("NBD_INFO_EXPORT must be sent before the ACK")
        if option == Option.GO:
            assert self._pending_export is not None
            self._enter_transmission(pending.name, *self._pending_export)
            return
        if option == Option.STRUCTURED_REPLY:
            self.structured_replies = True
        elif option == Option.SET_META_CONTEXT:
            self.meta_contexts = dict(self._staged_contexts)
            self._meta_export = pending.name
        self._transition(Trigger.SEND_FINAL_REPLY)

    def _enter_transmission(self, name: str, size: int, flags: TransmissionFlag) -> None:
        self._transition(Trigger.ENTER_TRANSMISSION)
        self.export_name = name
        self.export_size = size
        self.transmission_flags = flags | TransmissionFlag.HAS_FLAGS
        if self._meta_export != name:
            self.meta_contexts = {}
        self._pending = None

    def send_option_ack(self, option: int) -> bytes:
        return self.send_option_reply(option, OptionReply.ACK)

    def send_option_error(self, option: int, reply: OptionReply, message: str = "") -> bytes:
        if not reply.is_error:
            raise LocalProtocolError(f"{reply.name} is not an error reply")
        return self.send_option_reply(option, reply, _encode_message(message))

    def send_server_entry(self, name: str, description: str = "") -> bytes:
        """One NBD_REP_SERVER reply to NBD_OPT_LIST."""
        raw = name.encode("utf-8")
        data = _U32.pack(len(raw)) + raw + description.encode("utf-8")
        return self.send_option_reply(Option.LIST, OptionReply.SERVER, data)

    def send_export_info(self, option: int, size: int, flags: TransmissionFlag) -> bytes:
        """NBD_INFO_EXPORT, mandatory before the ACK of NBD_OPT_INFO/GO."""
        flags |= TransmissionFlag.HAS_FLAGS
        data = _INFO_EXPORT.pack(Info.EXPORT, size, flags)
        return self.send_option_reply(option, OptionReply.INFO, data)

    def send_block_size_info(self, option: int, minimum: int, preferred: int, maximum: int) -> bytes:
        data = _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)
        return self.send_option_reply(option, OptionReply.INFO, data)

    def send_text_info(self, option: int, info: Info, text: str) -> bytes:
        """NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
        if info not in (Info.NAME, Info.DESCRIPTION):
            raise LocalProtocolError(f"{info.name} is not a text item")
        data = _U16.pack(info) + _encode_message(text)
        return self.send_option_reply(option, OptionReply.INFO, data)

    def send_meta_context(self, option: int, context_id: int, name: str) -> bytes:
        data = _U32.pack(context_id) + name.encode("utf-8")
        return self.send_option_reply(option, OptionReply.META_CONTEXT, data)

    def send_export_name_reply(self, size: int, flags: TransmissionFlag) -> bytes:
        """Accept NBD_OPT_EXPORT_NAME and enter transmission.

        To refuse it the server can only hang up (the spec has no reply).
        """
        pending = self._require_pending(Option.EXPORT_NAME)
        self._enter_transmission(pending.name, size, flags)
        packet = _EXPORT_REPLY.pack(size, self.transmission_flags)
        return packet if self.no_zeroes else packet + bytes(EXPORT_NAME_PADDING)

    # ---------------------------------------------------------- transmission

    def send_simple_reply(self, handle: int, error: int = 0, data: bytes = b"") -> bytes:
        if data and (error or self.structured_replies):
            raise LocalProtocolError("a simple reply may carry data only for a plain READ")
        self._transition(Trigger.SEND_REPLY)
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data

    def _chunk(self, handle: int, rtype: ReplyType, done: bool, *parts: bytes) -> bytes:
        if not self.structured_replies:
            raise LocalProtocolError("structured replies were not negotiated")
        self._transition(Trigger.SEND_REPLY)
        length = sum(len(part) for part in parts)
        flags = ReplyFlag.DONE if done else ReplyFlag(0)
        header = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, handle, length)
        return b"".join((header, *parts))

    def send_structured_read(self, handle: int, offset: int, data: bytes, *, done: bool = True) -> bytes:
        """An NBD_REPLY_TYPE_OFFSET_DATA chunk."""
        if not data:
            raise LocalProtocolError("OFFSET_DATA needs at least one byte")
        return self._chunk(handle, ReplyType.OFFSET_DATA, done, _U64.pack(offset), data)

    def send_structured_done(self, handle: int) -> bytes:
        """An NBD_REPLY_TYPE_NONE chunk with the DONE flag."""
        return self._chunk(handle, ReplyType.NONE, True)

    def send_structured_error(self, handle: int, error: int, message: str = "", *, done: bool = True) -> bytes:
        """An NBD_REPLY_TYPE_ERROR chunk with a human-readable message."""
        if not error:
            raise LocalProtocolError("error chunks need a nonzero error")
        raw = _encode_message(message)
        return self._chunk(handle, ReplyType.ERROR, done, _ERROR_HEAD.pack(error, len(raw)), raw)

    def send_block_status(
        self,
        handle: int,
        context_id: int,
        extents: Sequence[tuple[int, int]],
        *,
        done: bool = True,
    ) -> bytes:
        """An NBD_REPLY_TYPE_BLOCK_STATUS chunk of (length, status) extents."""
        if context_id not in self.meta_contexts:
            raise LocalProtocolError(f"metadata context {context_id} was not selected")
        if not extents or not all(0 < length <= _U32_MAX for length, _ in extents):
            raise LocalProtocolError("block status needs extents of nonzero length")
        body = b"".join(_EXTENT.pack(length, status) for length, status in extents)
        return self._chunk(handle, ReplyType.BLOCK_STATUS, done, _U32.pack(context_id), body)

    def send_ok(self, handle: int) -> bytes:
        """Success without payload (a simple reply is fine in both modes)."""
        return self.send_simple_reply(handle)

    def send_read_reply(self, handle: int, offset: int, data: bytes) -> bytes:
        """The complete, successful reply to a READ in the negotiated style."""
        return self.send_read_header(handle, offset, len(data)) + data

    def send_read_header(self, handle: int, offset: int, length: int) -> bytes:
        """The reply to a successful READ up to its ``length`` data bytes, which follow as they are."""
        if not self.structured_replies or not length:
            return self.send_structured_done(handle) if self.structured_replies else self.send_simple_reply(handle)
        self._transition(Trigger.SEND_REPLY)
        return _DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.OFFSET_DATA, handle, 8 + length,
                                offset)

    def send_error(self, handle: int, error: int, message: str = "") -> bytes:
        """A failed reply: an error chunk if structured, else a simple reply."""
        if self.structured_replies:
            return self.send_structured_error(handle, error, message)
        return self.send_simple_reply(handle, error)


_READERS: Final[dict[State, Callable[[NbdCodec], Event | None]]] = {
    State.CLIENT_FLAGS: NbdCodec._read_client_flags,
    State.OPTIONS: NbdCodec._read_option,
    State.TRANSMISSION: NbdCodec._read_request,
}
