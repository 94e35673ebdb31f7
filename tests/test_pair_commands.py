"""Many pair commands in one interconnect call, at the mirror end (in process).

A real storage system, copy table and pairs layer hold the mirror ends of
remote pairs (attached as a peer would); PairCommands runs a batch the way
the interconnect serves it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from splitmirror.datapath.system import StorageSystem
from splitmirror.errors import InvalidArgument
from splitmirror.pairs import mirror_batch
from splitmirror.pairs.manager import PairManager
from splitmirror.pairs.settings import Settings
from splitmirror.v1 import interconnect_pb2 as ic

PEER = 1001
SIZE = 64 << 20


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[tuple[StorageSystem, PairManager]]:
    system = StorageSystem(2001, "secondary", tmp_path)
    await system.open()
    manager = PairManager(system, {}, Settings(link_timeout=1.0))
    await manager.start()
    for i in range(6):
        await manager.mirror_attach(PEER, ic.AttachMirrorRequest(pair=f"p{i}", pvol=f"v{i}", svol=f"v{i}-r",
                                                                 size=SIZE, track_size=8192, mode="sync"))
    try:
        yield system, manager
    finally:
        await manager.stop()
        await system.close()


def cmd(pair: str, op: int) -> ic.PairCommandRequest:
    return ic.PairCommandRequest(pair=pair, op=op)


async def test_each_command_is_answered_in_order_and_a_pairs_commands_run_in_turn(
        mirror: tuple[StorageSystem, PairManager]) -> None:
    system, manager = mirror
    commits = system.table.commits
    batch = [cmd(f"p{i}", op) for op in (ic.PAIR_OP_RESYNC_BEGIN, ic.PAIR_OP_CLEAR_BITMAP, ic.PAIR_OP_RESYNC_DONE)
             for i in range(5)]
    batch.insert(3, cmd("nosuch", ic.PAIR_OP_STATUS))
    batch.append(cmd("p5", ic.PAIR_OP_STATUS))
    reply = await manager.mirror_commands(PEER, ic.PairCommandsRequest(commands=batch))
    assert len(reply.results) == len(batch)
    for request, result in zip(batch, reply.results, strict=True):
        if request.pair == "nosuch":
            assert result.code == grpc.StatusCode.NOT_FOUND.value[0] and "'nosuch'" in result.error
            continue
        assert result.code == 0 and not result.not_run and result.state.pair == request.pair
        expected = {ic.PAIR_OP_RESYNC_BEGIN: "COPY", ic.PAIR_OP_CLEAR_BITMAP: "COPY",
                    ic.PAIR_OP_RESYNC_DONE: "DUPLEX", ic.PAIR_OP_STATUS: "COPY"}[request.op]
        assert result.state.status == expected, (request, result)
    assert {system.pairs[f"p{i}"].status.value for i in range(5)} == {"DUPLEX"}
    # Fifteen status changes at five pairs, saved durably: a few group commits, not one per change.
    assert system.table.commits - commits <= 6
    # A refused command stops nothing else; the others of its pair still run in order.
    again = await manager.mirror_commands(PEER, ic.PairCommandsRequest(commands=[
        cmd("p0", ic.PAIR_OP_CLEAR_BITMAP), cmd("p0", 99), cmd("p0", ic.PAIR_OP_STATUS)]))
    assert [r.code for r in again.results] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]


async def test_too_many_commands_are_refused_naming_the_limit(mirror: tuple[StorageSystem, PairManager]) -> None:
    _, manager = mirror
    batch = [cmd("p0", ic.PAIR_OP_STATUS)] * (mirror_batch.MAX_COMMANDS + 1)
    with pytest.raises(InvalidArgument, match="4097 commands exceed the limit of 4096"):
        await manager.mirror_commands(PEER, ic.PairCommandsRequest(commands=batch))


async def test_a_reply_beyond_its_budget_runs_the_commands_that_fit_and_says_which_did_not(
        mirror: tuple[StorageSystem, PairManager], monkeypatch: pytest.MonkeyPatch) -> None:
    system, manager = mirror
    for i in range(4):  # pending bitmaps at the mirror ends, scattered (a few KiB serialized each)
        bitmap = system.pairs[f"p{i}"].mirror.bitmap  # type: ignore[union-attr]
        for t in range(i, 8192, 3):
            bitmap.add(t)
    size = system.pairs["p0"].mirror.bitmap.memory_bytes()  # type: ignore[union-attr]
    monkeypatch.setattr(mirror_batch, "REPLY_BUDGET", 2 * size + 3 * mirror_batch.PER_COMMAND)
    batch = [ic.PairCommandRequest(pair=f"p{i}", op=ic.PAIR_OP_RESYNC_BEGIN, reverse=True) for i in range(4)]
    reply = await manager.mirror_commands(PEER, ic.PairCommandsRequest(commands=batch))
    assert [r.not_run for r in reply.results] == [False, False, True, True]
    assert [system.pairs[f"p{i}"].row.direction for i in range(4)] == ["reverse", "reverse", "forward", "forward"]
    assert all(r.state.pending_bitmap for r in reply.results[:2])
    assert "send it again" in reply.results[2].error
    # The first command always runs, whatever its size.
    monkeypatch.setattr(mirror_batch, "REPLY_BUDGET", 1)
    reply = await manager.mirror_commands(PEER, ic.PairCommandsRequest(commands=batch[2:]))
    assert [r.not_run for r in reply.results] == [False, True]
