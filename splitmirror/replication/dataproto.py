"""The replication data connection's protocol, sans I/O.

The ordered write streams of the pairs between two storage systems travel on
one TCP (TLS with ``--tls-dir``) connection per peer link, in frames; gRPC
keeps the control calls.  Every frame is a 5-byte head (u32 little-endian
body length, u8 type) and its body:

========  =========  ===========================================================
type      direction  body
========  =========  ===========================================================
HELLO     both       magic ``SMDATA\\r\\n``, u16 version, u64 system id, u32 the
                     largest frame body the sender accepts
OPEN      to mirror  u32 channel, u8 name length, the pair name (one stream)
BATCH     to mirror  u32 channel, then entries packed as in :mod:`.framing`
MARKER    to mirror  u32 channel, u64 seq, u64 offset, three u16-length
                     strings: marker, generation, backup time
ACK       to source  u32 channel, u64 seq: every entry up to seq is applied
ERROR     both       u32 channel (0: the whole connection), u8 code, u16
                     length, UTF-8 message
CLOSE     to mirror  u32 channel: the stream ends, nothing more comes on it
========  =========  ===========================================================

A channel is one pair's stream; its number is chosen by the source, above
every channel it opened before on the connection.  Both ends start with
HELLO; the mirror end checks the source's identity (I/O layer) and answers
with its own HELLO (or an ERROR and the end of the connection).

:class:`DataProtocol` turns received bytes into events and events into
bytes.  Every length in a received frame is checked before anything is
allocated for it; a violation raises :class:`ProtocolError` naming what was
wrong and the limit (the connection is then unusable).  A BATCH whose
entries do not parse is a :class:`BadBatch` event for its channel only.
Reads are buffered: :meth:`DataProtocol.get_buffer` hands out the memory the
next read goes to (a large frame body is read straight into a buffer of its
own), :meth:`DataProtocol.received` parses what arrived.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Iterable

from ..names import VOLUME_NAME
from .framing import HEADER as ENTRY_HEADER
from .framing import Frame, FramingError, decode, entry_header
from .queue import BackupMarker, Entry

MAGIC = b"SMDATA\r\n"
VERSION = 1
HEAD = struct.Struct("<IB")
_HELLO = struct.Struct("<8sHQI")
_CHANNEL = struct.Struct("<I")
#: Bytes of a BATCH frame's body before its first entry (the channel number).
CHANNEL_BYTES = _CHANNEL.size
_ACK = struct.Struct("<IQ")
_MARKER = struct.Struct("<IQQ")
_ERROR = struct.Struct("<IBH")
_U16 = struct.Struct("<H")

#: Largest body of the frames a source receives (HELLO, ACK, ERROR).
SMALL_FRAME = 4096
#: Longest message of an ERROR frame, in bytes (longer ones are cut).
MAX_ERROR = 1024
#: Longest string of a backup marker.
MAX_MARKER_STRING = 256
#: Bytes read into the shared read buffer; a frame body larger than what is
#: left there is read into a buffer of its own.
READ_BUFFER = 256 << 10


class Kind(enum.IntEnum):
    HELLO = 1
    OPEN = 2
    BATCH = 3
    MARKER = 4
    ACK = 5
    ERROR = 6
    CLOSE = 7


class Code(enum.IntEnum):
    """Why an ERROR frame ends a channel or the connection (gRPC's names)."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNAVAILABLE = 14
    INTERNAL = 13
    UNKNOWN = 2


class ProtocolError(Exception):
    """The peer broke the protocol; the message names what and the limit."""

    def __init__(self, message: str, code: Code = Code.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- events ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    system_id: int
    version: int
    max_frame: int


@dataclasses.dataclass(frozen=True, slots=True)
class Open:
    channel: int
    pair: str


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """Entries of one channel, in order (a MARKER frame is a batch of one)."""

    channel: int
    frames: list[Frame]
    size: int  # body bytes: what the frame holds in memory


@dataclasses.dataclass(frozen=True, slots=True)
class BadBatch:
    channel: int
    message: str
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    channel: int
    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    channel: int
    code: Code
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    channel: int


Event = Hello | Open | Batch | BadBatch | Ack | Error | Close

_RECEIVES = {
    "mirror": {Kind.HELLO, Kind.OPEN, Kind.BATCH, Kind.MARKER, Kind.ERROR, Kind.CLOSE},
    "source": {Kind.HELLO, Kind.ACK, Kind.ERROR},
}


# -- encoders: bytes to write (a BATCH as a list to gather into one write) -------------------


def hello(system_id: int, max_frame: int) -> bytes:
    return HEAD.pack(_HELLO.size, Kind.HELLO) + _HELLO.pack(MAGIC, VERSION, system_id, max_frame)


def open_channel(channel: int, pair: str) -> bytes:
    name = pair.encode()
    return HEAD.pack(_CHANNEL.size + 1 + len(name), Kind.OPEN) + _CHANNEL.pack(channel) + bytes([len(name)]) + name


def batch(channel: int, entries: Iterable[Entry]) -> list[bytes | memoryview]:
    """One BATCH frame of ``entries`` (none a marker): head, entry headers and
    payloads as separate buffers, so the payloads are never copied here."""
    parts: list[bytes | memoryview] = [b""]
    size = _CHANNEL.size
    for e in entries:
        if e.marker is not None:
            raise ValueError(f"entry {e.seq} is a backup marker; it goes in a MARKER frame")
        parts.append(entry_header(e))  # a group cut included
        size += ENTRY_HEADER.size
        if e.data:
            parts.append(e.data)
            size += len(e.data)
    parts[0] = HEAD.pack(size, Kind.BATCH) + _CHANNEL.pack(channel)
    return parts


def marker(channel: int, entry: Entry) -> bytes:
    assert entry.marker is not None
    strings = [s.encode()[:MAX_MARKER_STRING] for s in
               (entry.marker.marker, entry.marker.generation, entry.marker.backup_time)]
    body = _MARKER.pack(channel, entry.seq, entry.offset) + b"".join(_U16.pack(len(s)) + s for s in strings)
    return HEAD.pack(len(body), Kind.MARKER) + body


def ack(channel: int, seq: int) -> bytes:
    return HEAD.pack(_ACK.size, Kind.ACK) + _ACK.pack(channel, seq)


def error(channel: int, code: Code, message: str) -> bytes:
    text = message.encode()[:MAX_ERROR]
    return HEAD.pack(_ERROR.size + len(text), Kind.ERROR) + _ERROR.pack(channel, code, len(text)) + text


def close(channel: int) -> bytes:
    return HEAD.pack(_CHANNEL.size, Kind.CLOSE) + _CHANNEL.pack(channel)


# -- the decoder ----------------------------------------------------------------------------


class DataProtocol:
    """What one end of a data connection received, as events.

    ``side`` is "mirror" (the end that applies; it receives streams) or
    "source" (the primary end; it receives acks).  ``max_frame`` is the
    largest frame body accepted, ``max_entries`` the most entries of one
    BATCH, ``max_channels`` the channels open at once.
    """

    def __init__(self, side: str, max_frame: int, max_entries: int = 1 << 18, max_channels: int = 4096) -> None:
        if side not in _RECEIVES:
            raise ValueError(f"side must be 'mirror' or 'source', not {side!r}")
        self.side = side
        self.max_frame = max_frame if side == "mirror" else min(max_frame, SMALL_FRAME)
        self.max_entries = max_entries
        self.max_channels = max_channels
        self.peer: Hello | None = None
        self.broken = ""
        #: Channels open (mirror: opened by the source and not closed by either end).
        self.channels: set[int] = set()
        self.highest_channel = 0
        self._buf = bytearray(READ_BUFFER)
        self._start = 0  # first byte not parsed yet
        self._end = 0  # end of the bytes read
        self._body: bytearray | None = None  # a large body being read into a buffer of its own
        self._body_kind = Kind.HELLO
        self._body_filled = 0

    # -- reading -----------------------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the next read goes (never empty)."""
        if self._body is not None:
            return memoryview(self._body)[self._body_filled:]
        if self._end == len(self._buf):
            # Everything left is an incomplete head or small frame: move it to the front.
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start:self._end]
            self._start, self._end = 0, left
        return memoryview(self._buf)[self._end:]

    def received(self, n: int) -> list[Event]:
        """``n`` bytes were read into the last :meth:`get_buffer`; the events they complete."""
        if self.broken:
            raise ProtocolError(f"the connection is broken ({self.broken}); nothing more is read")
        events: list[Event] = []
        try:
            if self._body is not None:
                self._body_filled += n
                if self._body_filled < len(self._body):
                    return events
                body, self._body = self._body, None
                self._event(self._body_kind, memoryview(body), events)
            else:
                self._end += n
            self._parse(events)
        except ProtocolError as exc:
            self.broken = exc.message
            raise
        return events

    def feed(self, data: bytes) -> list[Event]:
        """:meth:`received` for bytes held elsewhere (tests, an SSL layer that copies anyway)."""
        events: list[Event] = []
        view = memoryview(data)
        while view:
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            events += self.received(n)
        return events

    def _parse(self, events: list[Event]) -> None:
        buf = self._buf
        while self._end - self._start >= HEAD.size:
            length, kind = HEAD.unpack_from(buf, self._start)
            self._check_head(length, kind)
            start = self._start + HEAD.size
            if self._end - start >= length:
                self._start = start + length
                self._event(Kind(kind), memoryview(bytes(memoryview(buf)[start:start + length])), events)
                continue
            if len(buf) - start >= length:
                return  # the rest of a small frame comes into the read buffer
            # A large body: a buffer of its own (its size checked above), the
            # part already read copied once, the rest read straight into it.
            body = bytearray(length)
            have = self._end - start
            body[:have] = buf[start:self._end]
            self._start = self._end = 0
            self._body, self._body_kind, self._body_filled = body, Kind(kind), have
            return
        if self._start == self._end:
            self._start = self._end = 0

    def _check_head(self, length: int, kind: int) -> None:
        if kind not in _RECEIVES[self.side]:
            name = Kind(kind).name if kind in Kind.__members__.values() else f"{kind}"
            raise ProtocolError(f"frame type {name} is not one the {self.side} end receives")
        if length > self.max_frame:
            raise ProtocolError(f"{Kind(kind).name} frame of {length} bytes exceeds the limit of "
                                f"{self.max_frame} bytes", Code.RESOURCE_EXHAUSTED)
        if self.peer is None and kind not in (Kind.HELLO, Kind.ERROR):
            raise ProtocolError(f"{Kind(kind).name} frame before HELLO")

    # -- one frame ---------------------------------------------------------------------------
    def _event(self, kind: Kind, body: memoryview, events: list[Event]) -> None:
        if kind is Kind.HELLO:
            events.append(self._hello(body))
        elif kind is Kind.ERROR:
            events.append(self._error(body))
        elif kind is Kind.ACK:
            if len(body) != _ACK.size:
                raise ProtocolError(f"ACK frame of {len(body)} bytes (an ACK has {_ACK.size})")
            channel, seq = _ACK.unpack(body)
            if channel > self.highest_channel or channel == 0:
                raise ProtocolError(f"ACK for channel {channel}, which was never opened")
            if channel in self.channels:
                events.append(Ack(channel, seq))
        else:
            self._mirror_event(kind, body, events)

    def _mirror_event(self, kind: Kind, body: memoryview, events: list[Event]) -> None:
        if len(body) < _CHANNEL.size:
            raise ProtocolError(f"{kind.name} frame of {len(body)} bytes is too short for its channel number")
        (channel,) = _CHANNEL.unpack_from(body)
        if kind is Kind.OPEN:
            events.append(self._open(channel, body))
            return
        if channel == 0 or channel > self.highest_channel:
            raise ProtocolError(f"{kind.name} frame for channel {channel}, which was never opened")
        if channel not in self.channels:
            return  # closed by this end (an ERROR sent): what was in flight is dropped
        if kind is Kind.CLOSE:
            if len(body) != _CHANNEL.size:
                raise ProtocolError(f"CLOSE frame of {len(body)} bytes (a CLOSE has {_CHANNEL.size})")
            self.channels.discard(channel)
            events.append(Close(channel))
        elif kind is Kind.MARKER:
            events.append(Batch(channel, [self._marker(channel, body)], len(body)))
        else:
            try:
                frames = decode(body[_CHANNEL.size:], self.max_entries)
            except FramingError as exc:
                events.append(BadBatch(channel, str(exc), len(body)))
            else:
                events.append(Batch(channel, frames, len(body)))

    def _hello(self, body: memoryview) -> Hello:
        if self.peer is not None:
            raise ProtocolError("a second HELLO on the connection")
        if len(body) != _HELLO.size:
            raise ProtocolError(f"HELLO frame of {len(body)} bytes (a HELLO has {_HELLO.size})")
        magic, version, system_id, max_frame = _HELLO.unpack(body)
        if magic != MAGIC:
            raise ProtocolError("HELLO without the splitmirror data magic: not a splitmirror data connection")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (this system speaks {VERSION})")
        if max_frame < SMALL_FRAME:
            raise ProtocolError(f"HELLO announces a frame limit of {max_frame} bytes, below the least "
                                f"{SMALL_FRAME}")
        self.peer = Hello(system_id, version, max_frame)
        return self.peer

    def _error(self, body: memoryview) -> Error:
        if len(body) < _ERROR.size:
            raise ProtocolError(f"ERROR frame of {len(body)} bytes is too short ({_ERROR.size} at least)")
        channel, code, length = _ERROR.unpack_from(body)
        if length != len(body) - _ERROR.size:
            raise ProtocolError(f"ERROR frame announces a {length}-byte message, {len(body) - _ERROR.size} follow")
        text = bytes(body[_ERROR.size:]).decode(errors="replace")
        try:
            kind = Code(code)
        except ValueError:
            kind = Code.UNKNOWN
        if channel:
            self.channels.discard(channel)
        return Error(channel, kind, text)

    def _open(self, channel: int, body: memoryview) -> Open:
        if len(body) < _CHANNEL.size + 1:
            raise ProtocolError("OPEN frame without a pair name")
        length = body[_CHANNEL.size]
        if len(body) != _CHANNEL.size + 1 + length:
            raise ProtocolError(f"OPEN frame announces a {length}-byte pair name, "
                                f"{len(body) - _CHANNEL.size - 1} follow")
        if channel <= self.highest_channel:
            raise ProtocolError(f"OPEN of channel {channel}: channels must grow (the last opened was "
                                f"{self.highest_channel})")
        if len(self.channels) >= self.max_channels:
            raise ProtocolError(f"OPEN of channel {channel}: {len(self.channels)} channels are open, the limit "
                                f"is {self.max_channels}", Code.RESOURCE_EXHAUSTED)
        try:
            name = bytes(body[_CHANNEL.size + 1:]).decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"OPEN of channel {channel}: the pair name is not UTF-8") from None
        if not VOLUME_NAME.fullmatch(name):
            raise ProtocolError(f"OPEN of channel {channel}: {name!r} is not a pair name")
        self.highest_channel = channel
        self.channels.add(channel)
        return Open(channel, name)

    def _marker(self, channel: int, body: memoryview) -> Frame:
        if len(body) < _MARKER.size:
            raise ProtocolError(f"MARKER frame of {len(body)} bytes is too short ({_MARKER.size} at least)")
        _, seq, offset = _MARKER.unpack_from(body)
        pos = _MARKER.size
        strings: list[str] = []
        for what in ("marker", "generation", "backup time"):
            if len(body) - pos < _U16.size:
                raise ProtocolError(f"MARKER frame (seq {seq}) is truncated before its {what}")
            (length,) = _U16.unpack_from(body, pos)
            pos += _U16.size
            if length > MAX_MARKER_STRING or length > len(body) - pos:
                raise ProtocolError(f"MARKER frame (seq {seq}): {what} of {length} bytes "
                                    f"({len(body) - pos} left, limit {MAX_MARKER_STRING})")
            try:
                strings.append(bytes(body[pos:pos + length]).decode())
            except UnicodeDecodeError:
                raise ProtocolError(f"MARKER frame (seq {seq}): the {what} is not UTF-8") from None
            pos += length
        if pos != len(body):
            raise ProtocolError(f"MARKER frame (seq {seq}) has {len(body) - pos} bytes after its strings")
        if not strings[0]:
            raise ProtocolError(f"MARKER frame (seq {seq}) names no marker")
        return Frame(seq, offset, b"", marker=BackupMarker(strings[0], strings[1], strings[2]))

    # -- what this end does to channels --------------------------------------------------------
    def opened(self, channel: int) -> None:
        """The source opened ``channel`` (it sent OPEN): its ACKs are expected."""
        self.highest_channel = max(self.highest_channel, channel)
        self.channels.add(channel)

    def closed(self, channel: int) -> None:
        """This end ended ``channel`` (it sent CLOSE or ERROR): what still comes for it is dropped."""
        self.channels.discard(channel)
