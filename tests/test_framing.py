"""The packed stream format (sans-I/O): round trips, hostile input, sequence checks."""

from __future__ import annotations

import random
import struct

import pytest

from splitmirror.replication.framing import (
    CUT,
    HEADER,
    MAX_CUT_MEMBERS,
    Frame,
    FramingError,
    SequenceCheck,
    decode,
    encode,
    frames_of,
)
from splitmirror.replication.queue import BackupMarker, GroupCut, ReplicationQueue
from splitmirror.replication.stream import messages
from splitmirror.v1 import interconnect_pb2 as ic


def _queue_with(rng: random.Random, count: int) -> ReplicationQueue:
    q = ReplicationQueue()
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            q.push(rng.randrange(1 << 30) * 512, rng.randbytes(rng.choice([512, 4096, 8192, 65536])))
        elif kind < 0.7:
            q.push(rng.randrange(1 << 20) * 4096, zero_length=rng.choice([4096, 1 << 20, 1 << 33]))
        elif kind < 0.8:
            q.push(0, flush=True)
        elif kind < 0.9:
            q.push(rng.randrange(1 << 20) * 8192, rng.randbytes(8192), resync=True)
        else:
            q.push(0)  # a barrier
    return q


def test_round_trip_keeps_every_field_in_order() -> None:
    rng = random.Random(9)
    q = _queue_with(rng, 500)
    batch = q.take_batch()
    frames = decode(encode(batch), 1000)
    assert [(f.seq, f.offset, f.data, f.zero_length, f.flush, f.resync) for f in frames] == \
           [(e.seq, e.offset, e.data, e.zero_length, e.flush, e.resync) for e in batch]


def test_markers_travel_as_entries_between_packed_runs() -> None:
    q = ReplicationQueue()
    q.push(0, b"a" * 512)
    q.push(512, b"b" * 512)
    q.push(0, marker=BackupMarker("m1", "gen1", "2026-01-01T00:00:00Z"))
    q.push(1024, b"c" * 512)
    msgs = messages(q.take_batch())
    assert [bool(m.packed) for m in msgs] == [True, False, True]
    frames = [f for m in msgs for f in frames_of(m, 100)]
    assert [f.seq for f in frames] == [1, 2, 3, 4]
    assert frames[2].marker == BackupMarker("m1", "gen1", "2026-01-01T00:00:00Z")
    assert frames[3].data == b"c" * 512 and frames[3].marker is None


def test_one_packed_message_for_a_batch_of_writes() -> None:
    q = ReplicationQueue()
    for i in range(64):
        q.push(i * 4096, bytes([i]) * 4096)
    msgs = messages(q.take_batch())
    assert len(msgs) == 1 and not msgs[0].entries
    assert len(msgs[0].packed) == 64 * (HEADER.size + 4096)


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size + 100])
def test_truncated_input_is_refused(cut: int) -> None:
    q = ReplicationQueue()
    q.push(0, b"x" * 4096)
    buf = encode(q.take_batch())
    with pytest.raises(FramingError, match=r"truncated|payload bytes"):
        decode(buf[:cut], 10)


def test_hostile_headers_are_refused_before_slicing() -> None:
    huge = HEADER.pack(1, 0, 0xFFFFFFFF, 0, 0)
    with pytest.raises(FramingError, match="announces 4294967295 payload bytes, 0 are left"):
        decode(huge, 10)
    with pytest.raises(FramingError, match="unknown flags 0x80"):
        decode(HEADER.pack(1, 0, 0, 0, 0x80), 10)
    with pytest.raises(FramingError, match="both a payload and a zero run"):
        decode(HEADER.pack(1, 0, 4, 4096, 0) + b"abcd", 10)
    with pytest.raises(FramingError, match="more than 3 entries"):
        decode(HEADER.pack(1, 0, 0, 0, 0) * 4, 3)
    both = ic.ReplicateBatch(packed=HEADER.pack(1, 0, 0, 0, 0), entries=[ic.WriteEntry(seq=1)])
    with pytest.raises(FramingError, match="both packed and protobuf"):
        frames_of(both, 10)


def test_random_bytes_never_escape_as_other_errors() -> None:
    rng = random.Random(15)
    for _ in range(3000):
        buf = rng.randbytes(rng.randrange(0, 200))
        try:
            frames = decode(buf, 50)
        except FramingError:
            continue
        assert sum(HEADER.size + len(f.data) for f in frames) == len(buf)


def test_encode_refuses_markers() -> None:
    q = ReplicationQueue()
    q.push(0, marker=BackupMarker("m", "g", "t"))
    with pytest.raises(ValueError, match="marker"):
        encode(q.take_batch())


def test_sequence_check() -> None:
    s = SequenceCheck()
    assert s.accept(7) == ""  # a stream starts anywhere
    assert s.accept(8) == ""
    assert s.accept(8) == "sequence number 8 repeats the expected 9"
    assert s.accept(3) == "sequence number 3 repeats the expected 9"
    assert s.accept(11) == "sequence number 11 skips ahead of the expected 9"
    assert s.accept(9) == ""  # a refused number is not taken
    assert SequenceCheck().accept(0) == "sequence number 0"


def test_frame_length() -> None:
    assert Frame(1, 0, b"abc").length == 3
    assert Frame(1, 0, b"", zero_length=4096).length == 4096
    assert struct.calcsize("<QQIQB") == HEADER.size


def test_group_cuts_round_trip_packed_and_hostile_ones_are_refused() -> None:
    q = ReplicationQueue()
    q.push(0, b"a" * 512)
    q.push(0, cut=GroupCut(1_700_000_000_000_000_001, 2))
    q.push(512, b"b" * 512)
    msgs = messages(q.take_batch())
    assert len(msgs) == 1 and msgs[0].packed  # a cut travels packed with the writes
    frames = frames_of(msgs[0], 10)
    assert [(f.seq, f.cut, f.length) for f in frames] == [
        (1, None, 512), (2, GroupCut(1_700_000_000_000_000_001, 2), 0), (3, None, 512)]
    with pytest.raises(FramingError, match="group cut 7 names 0 streams"):
        decode(HEADER.pack(1, 7, 0, 0, CUT), 10)
    with pytest.raises(FramingError, match=f"names {MAX_CUT_MEMBERS + 1} streams"):
        decode(HEADER.pack(1, 7, 0, MAX_CUT_MEMBERS + 1, CUT), 10)
    with pytest.raises(FramingError, match="is a group cut with flags 0x5"):
        decode(HEADER.pack(1, 7, 0, 2, CUT | 1), 10)
    with pytest.raises(FramingError, match="and 4 payload bytes"):
        decode(HEADER.pack(1, 7, 4, 0, CUT) + b"abcd", 10)


def test_sequence_numbers_stop_at_the_signed_64_bit_limit() -> None:
    check = SequenceCheck()
    assert check.accept((1 << 63) - 1) == ""
    assert "exceeds the limit" in SequenceCheck().accept(1 << 63)
