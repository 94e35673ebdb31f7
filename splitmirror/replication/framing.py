"""Many stream entries in one interconnect message, payloads as raw bytes.

A ``ReplicateBatch`` carries its writes, flushes, barriers and resync
tracks packed into one ``bytes`` field instead of one protobuf message
each: per entry a fixed header (sequence number, offset, payload length,
zero-run length, flags) followed by the payload.  gRPC then moves one
buffer per batch, and the mirror end reads the entries with ``struct``
(one copy per payload, as a protobuf ``bytes`` field costs too).

A group cut (:class:`~splitmirror.replication.queue.GroupCut`) is an entry
with the ``CUT`` flag and no payload: its offset field holds the cut number
and its zero-run field the number of streams that carry it.

Backup markers carry strings and stay protobuf ``WriteEntry`` messages; a
batch carries either packed entries or protobuf entries, never both.

Sans-I/O: no asyncio, no gRPC.  :func:`decode` treats its input as hostile:
every length is checked against what is left before anything is sliced.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable

from ..v1 import interconnect_pb2 as ic
from .queue import BackupMarker, Entry, GroupCut

#: seq, offset, payload bytes, zero-run bytes, flags
HEADER = struct.Struct("<QQIQB")
FLUSH = 0x01
RESYNC = 0x02
CUT = 0x04
KNOWN_FLAGS = FLUSH | RESYNC | CUT
#: The largest sequence number (the copy table keeps the last one applied as a signed 64-bit integer).
MAX_SEQ = (1 << 63) - 1
#: Streams one group cut may name (a consistency group of more pairs is refused).
MAX_CUT_MEMBERS = 1 << 16


class FramingError(ValueError):
    """A packed batch that does not parse; the message names the entry."""


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """One decoded entry of a packed batch."""

    seq: int
    offset: int
    data: bytes | memoryview
    zero_length: int = 0
    flush: bool = False
    resync: bool = False
    marker: BackupMarker | None = None
    cut: GroupCut | None = None

    @property
    def length(self) -> int:
        return self.zero_length or len(self.data)


def encoded_size(entry: Entry) -> int:
    return HEADER.size + len(entry.data)


def entry_header(e: Entry) -> bytes:
    """The packed header of one entry (its payload follows it); every packer uses this one."""
    if e.cut is not None:
        return HEADER.pack(e.seq, e.cut.cut, 0, e.cut.members, CUT)
    flags = (FLUSH if e.flush else 0) | (RESYNC if e.resync else 0)
    return HEADER.pack(e.seq, e.offset, len(e.data), e.zero_length, flags)


def encode(entries: Iterable[Entry]) -> bytes:
    """Pack entries (none a backup marker) into one buffer, in order."""
    parts: list[bytes | memoryview] = []
    for e in entries:
        if e.marker is not None:
            raise ValueError(f"entry {e.seq} is a backup marker; markers are not packed")
        parts.append(entry_header(e))
        if e.data:
            parts.append(e.data)
    return b"".join(parts)


def decode(buf: bytes | memoryview, max_entries: int) -> list[Frame]:
    """The entries of a packed batch, in order.

    The payloads are views of ``buf`` (no copy).  Raises
    :class:`FramingError` for a truncated header or payload, unknown flags,
    an entry with both data and a zero run, or more than ``max_entries``
    entries.
    """
    frames: list[Frame] = []
    buf = memoryview(buf)
    pos = 0
    end = len(buf)
    size = HEADER.size
    unpack = HEADER.unpack_from
    while pos < end:
        index = len(frames)
        if index >= max_entries:
            raise FramingError(f"packed batch holds more than {max_entries} entries")
        if end - pos < size:
            raise FramingError(f"packed entry {index} is truncated: {end - pos} of {size} header bytes")
        seq, offset, length, zero_length, flags = unpack(buf, pos)
        pos += size
        if flags & ~KNOWN_FLAGS:
            raise FramingError(f"packed entry {index} (seq {seq}) has unknown flags {flags:#x}")
        if length > end - pos:
            raise FramingError(f"packed entry {index} (seq {seq}) announces {length} payload bytes, "
                               f"{end - pos} are left")
        if length and zero_length:
            raise FramingError(f"packed entry {index} (seq {seq}) has both a payload and a zero run")
        if flags & CUT:
            if flags != CUT or length:
                raise FramingError(f"packed entry {index} (seq {seq}) is a group cut with flags {flags:#x} and "
                                   f"{length} payload bytes (a cut has neither)")
            if not 1 <= zero_length <= MAX_CUT_MEMBERS:
                raise FramingError(f"packed entry {index} (seq {seq}): group cut {offset} names {zero_length} "
                                   f"streams; the limit is 1 to {MAX_CUT_MEMBERS}")
            frames.append(Frame(seq, 0, b"", cut=GroupCut(offset, zero_length)))
            continue
        frames.append(Frame(seq, offset, buf[pos:pos + length] if length else b"", zero_length,
                            bool(flags & FLUSH), bool(flags & RESYNC)))
        pos += length
    return frames


def from_entry(e: ic.WriteEntry) -> Frame:
    """A protobuf ``WriteEntry`` as a frame."""
    marker = BackupMarker(e.backup_marker, e.backup_generation, e.backup_time) if e.backup_marker else None
    return Frame(e.seq, e.offset, e.data, e.zero_length, e.flush, e.resync, marker)


def frames_of(batch: ic.ReplicateBatch, max_entries: int) -> list[Frame]:
    """The entries of one stream message, packed or not."""
    if batch.packed:
        if len(batch.entries):
            raise FramingError("batch carries both packed and protobuf entries")
        return decode(batch.packed, max_entries)
    if len(batch.entries) > max_entries:
        raise FramingError(f"batch holds more than {max_entries} entries")
    return [from_entry(e) for e in batch.entries]


class SequenceCheck:
    """The sequence numbers of one stream: consecutive from its first entry.

    The primary end numbers every entry it pushes, and a stream carries
    them without gaps; a repeat, a gap or a step back means the peer (or
    something between) is broken or hostile, and nothing after it may be
    applied.
    """

    def __init__(self) -> None:
        self.last: int | None = None

    def accept(self, seq: int) -> str:
        """'' when ``seq`` is the next one (and take it), else why not."""
        if seq == 0:
            return "sequence number 0"
        if seq > MAX_SEQ:
            return f"sequence number {seq} exceeds the limit {MAX_SEQ} (2^63-1)"
        if self.last is not None and seq != self.last + 1:
            kind = "repeats" if seq <= self.last else "skips ahead of"
            return f"sequence number {seq} {kind} the expected {self.last + 1}"
        self.last = seq
        return ""
