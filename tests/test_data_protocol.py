"""The replication data connection's protocol (sans I/O): frames both ways and hostile input."""

from __future__ import annotations

import struct

import pytest

from splitmirror.replication import dataproto as dp
from splitmirror.replication.framing import HEADER as ENTRY_HEADER
from splitmirror.replication.queue import BackupMarker, Entry, GroupCut


def joined(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def mirror_ready(max_frame: int = 1 << 20, **kw: int) -> dp.DataProtocol:
    proto = dp.DataProtocol("mirror", max_frame, **kw)
    (event,) = proto.feed(dp.hello(1001, 1 << 20))
    assert event == dp.Hello(1001, dp.VERSION, 1 << 20)
    return proto


def entries() -> list[Entry]:
    return [Entry(7, 4096, b"a" * 4096), Entry(8, 0, b"", zero_length=8192), Entry(9, 0, b"", flush=True),
            Entry(10, 65536, b"r" * 512, resync=True), Entry(11, 0, b"")]


def test_stream_round_trip_in_one_piece_and_byte_by_byte() -> None:
    mark = Entry(12, 0, b"", marker=BackupMarker("bk-1", "gen1", "2026-12-03T13:00:00Z"))
    wire = (dp.open_channel(3, "db-mirror") + joined(dp.batch(3, entries())) + dp.marker(3, mark)
            + dp.close(3))
    for pieces in ([wire], [wire[i:i + 1] for i in range(len(wire))]):
        proto = mirror_ready()
        events: list[dp.Event] = []
        for piece in pieces:
            events += proto.feed(piece)
        opened, batch, marker, closed = events
        assert opened == dp.Open(3, "db-mirror")
        assert isinstance(batch, dp.Batch) and batch.channel == 3
        assert [(f.seq, f.offset, bytes(f.data), f.zero_length, f.flush, f.resync) for f in batch.frames] == \
               [(e.seq, e.offset, e.data, e.zero_length, e.flush, e.resync) for e in entries()]
        assert isinstance(marker, dp.Batch) and marker.frames[0].marker == mark.marker
        assert marker.frames[0].seq == 12
        assert closed == dp.Close(3)
        assert proto.channels == set()


def test_source_side_reads_hello_acks_and_errors() -> None:
    proto = dp.DataProtocol("source", 1 << 20)
    proto.opened(1)
    proto.opened(2)
    events = proto.feed(dp.hello(2001, 64 << 20) + dp.ack(1, 41) + dp.error(2, dp.Code.FAILED_PRECONDITION,
                                                                          "pair 'p' is SPLIT") + dp.ack(2, 9))
    assert events == [dp.Hello(2001, dp.VERSION, 64 << 20), dp.Ack(1, 41),
                      dp.Error(2, dp.Code.FAILED_PRECONDITION, "pair 'p' is SPLIT")]  # the ACK after it: dropped
    assert proto.peer is not None and proto.peer.max_frame == 64 << 20


def test_a_large_batch_is_read_into_a_buffer_of_its_own_without_copies_per_entry() -> None:
    big = [Entry(1, 0, bytes(range(256)) * 4096), Entry(2, 1 << 20, b"z" * (3 << 20))]
    wire = dp.open_channel(1, "p") + joined(dp.batch(1, big))
    proto = mirror_ready(max_frame=8 << 20)
    events: list[dp.Event] = []
    view = memoryview(wire)
    reads = 0
    while view:
        target = proto.get_buffer()
        n = min(len(target), len(view), 1 << 20)
        target[:n] = view[:n]
        view = view[n:]
        events += proto.received(n)
        reads += 1
    assert reads <= 6  # the body went straight into its own buffer, 1 MiB per read
    _, batch = events
    assert isinstance(batch, dp.Batch)
    assert [bytes(f.data) for f in batch.frames] == [e.data for e in big]
    assert all(isinstance(f.data, memoryview) for f in batch.frames)  # views of the frame's buffer
    assert batch.size == len(wire) - len(dp.open_channel(1, "p")) - dp.HEAD.size


def refused(proto: dp.DataProtocol, data: bytes, *words: str) -> dp.ProtocolError:
    with pytest.raises(dp.ProtocolError) as info:
        proto.feed(data)
    for word in words:
        assert word in info.value.message, info.value.message
    # Broken for good: nothing more is parsed.
    with pytest.raises(dp.ProtocolError, match="broken"):
        proto.feed(dp.close(1))
    return info.value


def test_an_oversized_frame_is_refused_on_its_head_before_any_allocation() -> None:
    proto = mirror_ready(max_frame=1 << 20)
    proto.feed(dp.open_channel(1, "p"))
    exc = refused(proto, dp.HEAD.pack((1 << 32) - 1, dp.Kind.BATCH), "BATCH frame of 4294967295 bytes",
                  "limit of 1048576")
    assert exc.code is dp.Code.RESOURCE_EXHAUSTED
    assert proto._body is None


def test_the_source_accepts_only_small_frames() -> None:
    proto = dp.DataProtocol("source", 64 << 20)
    proto.feed(dp.hello(2, 1 << 20))
    refused(proto, dp.HEAD.pack(dp.SMALL_FRAME + 1, dp.Kind.ACK), f"limit of {dp.SMALL_FRAME}")


@pytest.mark.parametrize("side,frame,words", [
    ("mirror", dp.ack(1, 1), ("ACK", "not one the mirror end receives")),
    ("source", dp.open_channel(1, "p"), ("OPEN", "not one the source end receives")),
    ("mirror", dp.HEAD.pack(0, 99), ("frame type 99",)),
], ids=["ack-to-mirror", "open-to-source", "unknown-type"])
def test_frames_of_the_wrong_direction_are_refused(side: str, frame: bytes, words: tuple[str, ...]) -> None:
    proto = dp.DataProtocol(side, 1 << 20)
    proto.feed(dp.hello(1, 1 << 20))
    refused(proto, frame, *words)


@pytest.mark.parametrize("wire,words", [
    (dp.open_channel(1, "p"), ("OPEN frame before HELLO",)),
    (dp.HEAD.pack(22, dp.Kind.HELLO) + struct.pack("<8sHQI", b"GET / HT", 1, 1, 4096), ("magic",)),
    (dp.HEAD.pack(22, dp.Kind.HELLO) + struct.pack("<8sHQI", dp.MAGIC, 2, 1, 4096), ("version 2", "speaks 1")),
    (dp.HEAD.pack(22, dp.Kind.HELLO) + struct.pack("<8sHQI", dp.MAGIC, 1, 1, 100), ("frame limit of 100",)),
    (dp.HEAD.pack(3, dp.Kind.HELLO) + b"abc", ("HELLO frame of 3 bytes",)),
    (dp.hello(1, 1 << 20) * 2, ("second HELLO",)),
], ids=["no-hello", "bad-magic", "bad-version", "tiny-limit", "short-hello", "two-hellos"])
def test_handshake_violations(wire: bytes, words: tuple[str, ...]) -> None:
    refused(dp.DataProtocol("mirror", 1 << 20), wire, *words)


def test_channel_rules() -> None:
    refused(mirror_ready(), dp.open_channel(2, "a") + dp.open_channel(2, "b"), "channels must grow")
    refused(mirror_ready(), dp.open_channel(1, "a") + dp.open_channel(0, "b"), "channels must grow")
    refused(mirror_ready(), joined(dp.batch(5, entries())), "channel 5, which was never opened")
    refused(mirror_ready(), dp.open_channel(1, "../etc"), "is not a pair name")
    refused(mirror_ready(), dp.HEAD.pack(6, dp.Kind.OPEN) + struct.pack("<IB", 1, 9) + b"a", "9-byte pair name")
    refused(mirror_ready(), dp.HEAD.pack(6, dp.Kind.OPEN) + struct.pack("<IB", 1, 1) + b"\xff", "not UTF-8")
    refused(mirror_ready(max_channels=2), dp.open_channel(1, "a") + dp.open_channel(2, "b") + dp.open_channel(3, "c"),
            "2 channels are open, the limit is 2")
    refused(mirror_ready(), dp.HEAD.pack(2, dp.Kind.BATCH) + b"ab", "too short for its channel number")


def test_frames_for_a_channel_this_end_closed_are_dropped() -> None:
    proto = mirror_ready()
    proto.feed(dp.open_channel(4, "p"))
    proto.closed(4)  # an ERROR was sent for it
    assert proto.feed(joined(dp.batch(4, entries())) + dp.close(4)) == []
    (event,) = proto.feed(dp.open_channel(5, "p"))
    assert event == dp.Open(5, "p")


@pytest.mark.parametrize("packed,words", [
    (ENTRY_HEADER.pack(1, 0, 100, 0, 0) + b"x" * 10, ("announces 100 payload bytes", "10 are left")),
    (ENTRY_HEADER.pack(1, 0, 0, 0, 0x80), ("unknown flags 0x80",)),
    (ENTRY_HEADER.pack(1, 0, 1, 4096, 0) + b"x", ("both a payload and a zero run",)),
    (b"\x01\x02", ("truncated",)),
], ids=["short-payload", "flags", "data-and-zeroes", "short-header"])
def test_a_batch_that_does_not_parse_is_an_event_of_its_channel(packed: bytes, words: tuple[str, ...]) -> None:
    proto = mirror_ready()
    proto.feed(dp.open_channel(1, "p"))
    (event,) = proto.feed(dp.HEAD.pack(4 + len(packed), dp.Kind.BATCH) + struct.pack("<I", 1) + packed)
    assert isinstance(event, dp.BadBatch) and event.channel == 1
    for word in words:
        assert word in event.message
    assert proto.feed(dp.close(1)) == [dp.Close(1)]  # the connection goes on


def test_too_many_entries_in_one_batch() -> None:
    proto = mirror_ready(max_entries=3)
    proto.feed(dp.open_channel(1, "p"))
    (event,) = proto.feed(joined(dp.batch(1, entries())))
    assert isinstance(event, dp.BadBatch) and "more than 3 entries" in event.message


def marker_frame(*strings: bytes, tail: bytes = b"") -> bytes:
    body = struct.pack("<IQQ", 1, 5, 0) + b"".join(struct.pack("<H", len(s)) + s for s in strings) + tail
    return dp.HEAD.pack(len(body), dp.Kind.MARKER) + body


@pytest.mark.parametrize("frame,words", [
    (marker_frame(b"m", b"g"), ("truncated before its backup time",)),
    (marker_frame(b"m" * 300, b"g", b"t"), ("marker of 300 bytes", "limit 256")),
    (marker_frame(b"m", b"g", b"t", tail=b"!"), ("1 bytes after its strings",)),
    (marker_frame(b"", b"g", b"t"), ("names no marker",)),
    (marker_frame(b"\xfe", b"g", b"t"), ("not UTF-8",)),
    (dp.HEAD.pack(8, dp.Kind.MARKER) + b"\x01\x00\x00\x00abcd", ("too short",)),
], ids=["truncated", "long-string", "trailing", "empty", "utf8", "short"])
def test_hostile_markers(frame: bytes, words: tuple[str, ...]) -> None:
    proto = mirror_ready()
    proto.feed(dp.open_channel(1, "p"))
    refused(proto, frame, *words)


def test_hostile_acks_and_errors() -> None:
    def source() -> dp.DataProtocol:
        proto = dp.DataProtocol("source", 1 << 20)
        proto.feed(dp.hello(2, 1 << 20))
        proto.opened(1)
        return proto

    refused(source(), dp.HEAD.pack(4, dp.Kind.ACK) + b"abcd", "ACK frame of 4 bytes")
    refused(source(), dp.ack(2, 1), "channel 2, which was never opened")
    refused(source(), dp.HEAD.pack(9, dp.Kind.ERROR) + struct.pack("<IBH", 1, 3, 50) + b"ab", "50-byte message")
    refused(source(), dp.HEAD.pack(3, dp.Kind.ERROR) + b"abc", "too short")
    # An unknown code is still an error, not a crash.
    (event,) = source().feed(dp.HEAD.pack(9, dp.Kind.ERROR) + struct.pack("<IBH", 0, 200, 2) + b"no")
    assert event == dp.Error(0, dp.Code.UNKNOWN, "no")


def test_an_error_message_is_cut_to_its_limit() -> None:
    proto = dp.DataProtocol("source", 1 << 20)
    (event,) = proto.feed(dp.error(0, dp.Code.PERMISSION_DENIED, "x" * 5000))
    assert isinstance(event, dp.Error) and len(event.message) == dp.MAX_ERROR


def test_markers_do_not_go_in_batches() -> None:
    with pytest.raises(ValueError, match="MARKER frame"):
        dp.batch(1, [Entry(1, 0, b"", marker=BackupMarker("m", "g", "t"))])


def test_a_group_cut_crosses_the_data_connection() -> None:
    cut = GroupCut(1_764_000_000_000_000_007, 3)
    proto = mirror_ready()
    wire = dp.open_channel(1, "p") + joined(dp.batch(1, [Entry(1, 0, b"a" * 512), Entry(2, 0, b"", cut=cut)]))
    _, batch = proto.feed(wire)
    assert isinstance(batch, dp.Batch)
    assert [(f.seq, f.cut) for f in batch.frames] == [(1, None), (2, cut)]
