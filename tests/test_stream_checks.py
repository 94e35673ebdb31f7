"""Finding 9 of issue 15: the mirror end does not trust its peer's stream.

A real secondaryd; the test plays its primary system (claiming its system
id, as the fuzz tests do) and sends Replicate streams that break sequence,
reach outside the volume or do not parse.  The secondary must apply what
came before the break, nothing after it, suspend the pair and end the call
with INVALID_ARGUMENT.  The reverse copy's check of returned tracks is
pinned on its own below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from client import Client
from splitmirror.pairs.copying import returned_run_error
from splitmirror.replication.framing import HEADER, encode
from splitmirror.replication.link import SYSTEM_ID_KEY
from splitmirror.replication.queue import Entry
from splitmirror.storage.bitmap import TrackBitmap
from splitmirror.testing import Site
from splitmirror.v1 import interconnect_pb2 as ic
from splitmirror.v1 import interconnect_pb2_grpc as ic_grpc

MiB = 1 << 20
TRACK = 8192
SIZE = 8 * MiB
PRIMARY = 1001
AS_PRIMARY = ((SYSTEM_ID_KEY, str(PRIMARY)),)


@pytest.fixture(scope="module")
def secondary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, ic_grpc.InterconnectStub]]:
    # Its primary is configured but never answers; the long link timeout
    # keeps the pairs mirroring (not suspended for a lost peer) meanwhile.
    site = Site("secondary", 2001, tmp_path_factory.mktemp("streamchecks"), link_timeout=60)
    site.peers[PRIMARY] = 1
    site.start()
    with grpc.insecure_channel(site.interconnect) as channel:
        yield site, ic_grpc.InterconnectStub(channel)
    site.kill()
    assert "Traceback" not in site.log(), site.log()[-3000:]


def _attach(stub: ic_grpc.InterconnectStub, pair: str) -> None:
    state = stub.AttachMirror(ic.AttachMirrorRequest(pair=pair, pvol="p", svol=f"{pair}-r", size=SIZE,
                                                     track_size=TRACK, mode="sync"),
                              metadata=AS_PRIMARY, timeout=10)
    assert state.status == "COPY", state


def _block(tag: int) -> bytes:
    return bytes([tag]) * TRACK


def _replicate(stub: ic_grpc.InterconnectStub, batches: list[ic.ReplicateBatch]) -> tuple[list[int], grpc.RpcError]:
    call = stub.Replicate(iter(batches), metadata=AS_PRIMARY, timeout=15)
    acks: list[int] = []
    with pytest.raises(grpc.RpcError) as err:
        for ack in call:
            acks.append(ack.seq)
    return acks, err.value


def _status(stub: ic_grpc.InterconnectStub, pair: str) -> str:
    state = stub.PairCommand(ic.PairCommandRequest(pair=pair, op=ic.PAIR_OP_STATUS), metadata=AS_PRIMARY,
                             timeout=10)
    return str(state.status)


async def _blocks(site: Site, volume: str, count: int) -> list[int]:
    """The tag of each of the first ``count`` blocks (0: never written)."""
    async with Client(site.address, timeout=10) as c:
        data = await c.read(volume, 0, count * TRACK)
    return [data[i * TRACK] for i in range(count)]


def _writes(*items: tuple[int, int, int]) -> list[Entry]:
    """(seq, block, tag) -> entries writing that block."""
    return [Entry(seq, block * TRACK, _block(tag)) for seq, block, tag in items]


def test_a_gap_in_sequence_suspends_and_applies_nothing_after_it(
        secondary: tuple[Site, ic_grpc.InterconnectStub]) -> None:
    site, stub = secondary
    _attach(stub, "gap")
    batches = [ic.ReplicateBatch(pair="gap", packed=encode(_writes((1, 0, 11), (2, 1, 12), (3, 2, 13)))),
               ic.ReplicateBatch(packed=encode(_writes((4, 3, 14), (6, 4, 16), (7, 5, 17))))]
    acks, err = _replicate(stub, batches)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "sequence number 6 skips ahead of the expected 5" in (err.details() or ""), err.details()
    assert all(a <= 4 for a in acks), acks
    assert _status(stub, "gap") == "SUSPENDED"
    assert asyncio.run(_blocks(site, "gap-r", 6)) == [11, 12, 13, 14, 0, 0]
    # Suspended: a new stream is refused whole.
    acks, err = _replicate(stub, [ic.ReplicateBatch(pair="gap", packed=encode(_writes((8, 5, 18))))])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and not acks, err
    assert asyncio.run(_blocks(site, "gap-r", 6))[5] == 0


def test_a_repeated_sequence_number_is_refused(secondary: tuple[Site, ic_grpc.InterconnectStub]) -> None:
    """Protobuf entries (the unpacked form) are checked the same way."""
    site, stub = secondary
    _attach(stub, "dup")
    entries = [ic.WriteEntry(seq=seq, offset=block * TRACK, data=_block(tag))
               for seq, block, tag in ((10, 0, 21), (11, 1, 22), (11, 2, 23), (12, 3, 24))]
    acks, err = _replicate(stub, [ic.ReplicateBatch(pair="dup", entries=entries)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "sequence number 11 repeats the expected 12" in (err.details() or ""), err.details()
    assert not acks
    assert _status(stub, "dup") == "SUSPENDED"
    assert asyncio.run(_blocks(site, "dup-r", 4)) == [21, 22, 0, 0]


def test_a_step_back_across_batches_is_refused(secondary: tuple[Site, ic_grpc.InterconnectStub]) -> None:
    site, stub = secondary
    _attach(stub, "back")
    batches = [ic.ReplicateBatch(pair="back", packed=encode(_writes((5, 0, 31), (6, 1, 32)))),
               ic.ReplicateBatch(packed=encode(_writes((3, 2, 33))))]
    _, err = _replicate(stub, batches)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "sequence number 3 repeats the expected 7" in (err.details() or "")
    assert _status(stub, "back") == "SUSPENDED"
    assert asyncio.run(_blocks(site, "back-r", 3)) == [31, 32, 0]


def test_a_write_outside_the_volume_is_refused(secondary: tuple[Site, ic_grpc.InterconnectStub]) -> None:
    site, stub = secondary
    _attach(stub, "range")
    entries = [Entry(1, 0, _block(41)), Entry(2, SIZE - 4096, _block(42)), Entry(3, TRACK, _block(43))]
    _, err = _replicate(stub, [ic.ReplicateBatch(pair="range", packed=encode(entries))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert f"outside volume 'range-r' ({SIZE} bytes)" in (err.details() or ""), err.details()
    assert _status(stub, "range") == "SUSPENDED"
    assert asyncio.run(_blocks(site, "range-r", 2)) == [41, 0]


def test_a_packed_batch_that_does_not_parse_is_refused(secondary: tuple[Site, ic_grpc.InterconnectStub]) -> None:
    site, stub = secondary
    _attach(stub, "torn")
    good = encode(_writes((1, 0, 51)))
    torn = HEADER.pack(2, TRACK, TRACK, 0, 0) + _block(52)[:100]  # announces a whole block, sends 100 bytes
    _, err = _replicate(stub, [ic.ReplicateBatch(pair="torn", packed=good),
                               ic.ReplicateBatch(packed=torn)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "malformed batch (packed entry 0 (seq 2) announces 8192 payload bytes, 100 are left)" in \
        (err.details() or ""), err.details()
    assert _status(stub, "torn") == "SUSPENDED"
    assert asyncio.run(_blocks(site, "torn-r", 2)) == [51, 0]


def test_a_well_formed_stream_is_applied_and_acknowledged(
        secondary: tuple[Site, ic_grpc.InterconnectStub]) -> None:
    """The control: the same kind of stream, in sequence, is applied and acknowledged."""
    site, stub = secondary
    _attach(stub, "good")
    batches = [ic.ReplicateBatch(pair="good", packed=encode(_writes((1, 0, 61), (2, 1, 62)))),
               ic.ReplicateBatch(packed=encode(_writes((3, 2, 63))))]
    call = stub.Replicate(iter(batches), metadata=AS_PRIMARY, timeout=15)
    acks = [ack.seq for ack in call]
    assert acks and acks[-1] == 3 and acks == sorted(acks), acks
    assert _status(stub, "good") == "COPY"
    assert asyncio.run(_blocks(site, "good-r", 3)) == [61, 62, 63]


# -- the reverse copy: runs returned by the peer ----------------------------------------------------------


def test_returned_tracks_are_checked() -> None:
    asked = TrackBitmap(100)
    asked.add_range(10, 20)
    asked.add(50)
    assert returned_run_error(asked, 10, 4, 4 * TRACK, TRACK) == ""
    assert returned_run_error(asked, 10, 4, 0, TRACK) == ""  # all zero
    assert returned_run_error(asked, 50, 1, TRACK, TRACK) == ""
    assert returned_run_error(asked, 12, 0, 0, TRACK) == "an empty run at track 12"
    assert returned_run_error(asked, 99, 2, 0, TRACK) == "tracks 99-100, beyond the volume's 100 tracks"
    assert returned_run_error(asked, 18, 4, 0, TRACK) == "tracks 18-21, not all asked for (or sent twice)"
    assert returned_run_error(asked, 30, 1, TRACK, TRACK) == "tracks 30-30, not all asked for (or sent twice)"
    assert returned_run_error(asked, 10, 2, TRACK, TRACK) == "8192 bytes for 2 tracks of 8192 bytes"
    assert returned_run_error(asked, 10, 1, TRACK + 1, TRACK) == "8193 bytes for 1 tracks of 8192 bytes"
    asked.remove_range(10, 14)  # received once: a second copy is refused
    assert returned_run_error(asked, 12, 1, TRACK, TRACK) == "tracks 12-12, not all asked for (or sent twice)"
