"""Many pair commands in one interconnect call, at the mirror end.

A mass recovery sends a thousand pairs' status, resync-begin, clear-bitmap
and resync-done commands; one ``PairCommands`` call carries many of them.
The commands of different pairs run at once, so their durable saves share
group commits (:mod:`splitmirror.storage.sqlthread`); the commands of one
pair run one after the other, in the order sent.  Each command is answered
on its own (a refusal names its pair and stops nothing else).  The reply's
size is bounded: a command whose pending bitmap would grow the reply beyond
:data:`REPLY_BUDGET` is not run, nor any after it, and says so (the caller
sends them again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from ..datapath.system import StorageSystem
from ..errors import InvalidArgument, SplitmirrorError
from ..v1 import interconnect_pb2 as ic

log = logging.getLogger("splitmirror.pairs")

#: Commands one call may carry.
MAX_COMMANDS = 4096
#: Bytes of pending bitmaps one reply may carry (the interconnect's messages are at most 64 MiB).
REPLY_BUDGET = 32 << 20
#: Bytes a reply spends per command besides its bitmap (names, numbers).
PER_COMMAND = 256

Command = Callable[[int, ic.PairCommandRequest], Awaitable[ic.MirrorState]]


def _runnable(system: StorageSystem, commands: list[ic.PairCommandRequest]) -> int:
    """How many of ``commands``, from the first, fit the reply's budget."""
    used = 0
    for i, cmd in enumerate(commands):
        used += PER_COMMAND
        if cmd.op == ic.PAIR_OP_RESYNC_BEGIN:
            pair = system.pairs.get(cmd.pair)
            if pair is not None and pair.mirror is not None:
                used += pair.mirror.bitmap.memory_bytes()
        if used > REPLY_BUDGET and i:
            return i
    return len(commands)


async def run_commands(system: StorageSystem, command: Command, peer: int,
                       req: ic.PairCommandsRequest) -> ic.PairCommandsReply:
    commands = list(req.commands)
    if len(commands) > MAX_COMMANDS:
        raise InvalidArgument(f"PairCommands from system {peer}: {len(commands)} commands exceed the limit of "
                              f"{MAX_COMMANDS} per call")
    run = _runnable(system, commands)
    results = [ic.PairCommandResult(not_run=True, code=grpc.StatusCode.ABORTED.value[0],
                                    error=f"not run: the reply would exceed {REPLY_BUDGET} bytes; send it again")
               for _ in commands]
    by_pair: dict[str, list[int]] = {}
    for i in range(run):
        by_pair.setdefault(commands[i].pair, []).append(i)

    async def one_pair(indexes: list[int]) -> None:
        for i in indexes:
            results[i] = await _one(command, peer, commands[i])

    await asyncio.gather(*(one_pair(indexes) for indexes in by_pair.values()))
    return ic.PairCommandsReply(results=results)


async def _one(command: Command, peer: int, cmd: ic.PairCommandRequest) -> ic.PairCommandResult:
    try:
        return ic.PairCommandResult(state=await command(peer, cmd))
    except SplitmirrorError as exc:
        return ic.PairCommandResult(code=exc.code.value[0], error=exc.message)
    except Exception:
        log.exception("pair command %d for pair %r from system %d failed", cmd.op, cmd.pair, peer)
        return ic.PairCommandResult(code=grpc.StatusCode.INTERNAL.value[0],
                                    error="internal error in the pair command; see the daemon log")
