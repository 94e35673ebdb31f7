"""Pair commands to one peer, many in one interconnect call.

The commands issued while one call is on its way (a mass recovery issues a
thousand pairs' status, resync-begin, clear-bitmap and resync-done
commands at once) go together in the next ``PairCommands`` call, so the
calls over a link follow the number of steps of a recovery, not the number
of pairs.  A lone command waits for nothing: it leaves at the next step of
the event loop.  Each caller gets its own answer or its own refusal; a
command the peer did not run (its reply was full) goes in the next call; a
peer that does not know ``PairCommands`` gets one ``PairCommand`` each.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from ..errors import ResourceExhausted, Unavailable, from_status
from ..v1 import interconnect_pb2 as ic
from ..v1 import interconnect_pb2_grpc as ic_grpc

#: Commands one call carries at most (the peer refuses more than 4096).
MAX_PER_CALL = 1024
#: Calls on their way at once; commands issued meanwhile wait for the next.
CALLS_AT_ONCE = 1
#: Seconds a call may take per command it carries, on top of the link timeout.
SECONDS_PER_COMMAND = 0.02


#: Times a command the peer did not run is sent again before it fails.
MAX_SENDS = 8


@dataclasses.dataclass(eq=False)
class _Waiting:
    request: ic.PairCommandRequest
    answer: asyncio.Future[ic.MirrorState]
    sends: int = 0


class CommandBatcher:
    """Sends the pair commands to one peer, gathered into ``PairCommands`` calls."""

    def __init__(self, stub: ic_grpc.InterconnectAsyncStub, metadata: tuple[tuple[str, str], ...],
                 timeout: float, peer_id: int) -> None:
        self._stub = stub
        self._metadata = metadata
        self._timeout = timeout
        self._peer_id = peer_id
        self._waiting: list[_Waiting] = []
        self._calls = 0
        self._scheduled = False
        self._batches_unknown = False  # the peer answered UNIMPLEMENTED: one call per command
        self._tasks: set[asyncio.Future[None]] = set()

    async def command(self, request: ic.PairCommandRequest) -> ic.MirrorState:
        """The peer's answer to one command (raises AioRpcError for the call, SplitmirrorError for a refusal)."""
        if self._batches_unknown:
            reply: ic.MirrorState = await self._stub.PairCommand(request, metadata=self._metadata,
                                                                   timeout=self._timeout)
            return reply
        waiting = _Waiting(request, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        self._kick()
        return await waiting.answer

    def _kick(self) -> None:
        if self._waiting and self._calls < CALLS_AT_ONCE and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        """Next step of the loop: what was issued meanwhile leaves together."""
        self._scheduled = False
        batch = [w for w in self._waiting[:MAX_PER_CALL] if not w.answer.done()]  # skip the cancelled
        del self._waiting[:MAX_PER_CALL]
        if not batch:
            self._kick()
            return
        self._calls += 1
        self._spawn(self._call(batch), self._call_done)

    def _spawn(self, work: Coroutine[Any, Any, None], then: Callable[[asyncio.Future[None]], None] | None = None,
               ) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if then is not None:
            task.add_done_callback(then)

    def _call_done(self, task: asyncio.Future[None]) -> None:
        self._calls -= 1
        self._kick()

    def _closing(self) -> Unavailable:
        return Unavailable(f"peer system {self._peer_id} is unreachable (the link is closing)")

    async def close(self) -> None:
        """Stop: the commands on their way or waiting fail as unreachable."""
        for w in self._waiting:
            if not w.answer.done():
                w.answer.set_exception(self._closing())
        self._waiting.clear()
        for task in list(self._tasks):
            task.cancel()

    async def _call(self, batch: list[_Waiting]) -> None:
        for w in batch:
            w.sends += 1
        request = ic.PairCommandsRequest(commands=[w.request for w in batch])
        try:
            reply = await self._stub.PairCommands(
                request, metadata=self._metadata, timeout=self._timeout + SECONDS_PER_COMMAND * len(batch))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and not self._batches_unknown:
                self._batches_unknown = True  # an older peer: one call per command from now on
                for w in batch:
                    self._one_by_one(w)
                return
            for w in batch:
                if not w.answer.done():
                    w.answer.set_exception(exc)
            return
        except BaseException:
            for w in batch:
                if not w.answer.done():
                    w.answer.set_exception(self._closing())
            raise
        again = []
        for w, result in zip(batch, reply.results, strict=False):
            if w.answer.done():
                continue
            if result.not_run:
                again.append(w)
            elif result.code:
                code = next((c for c in grpc.StatusCode if c.value[0] == result.code), grpc.StatusCode.UNKNOWN)
                w.answer.set_exception(from_status(code, f"peer system {self._peer_id}: {result.error}"))
            else:
                w.answer.set_result(result.state)
        again += batch[len(reply.results):]  # a short reply: what is not answered was not run
        for w in again:
            if w.sends >= MAX_SENDS:
                w.answer.set_exception(ResourceExhausted(
                    f"peer system {self._peer_id} did not run pair command {w.request.op} for pair "
                    f"{w.request.pair!r} in {MAX_SENDS} calls"))
        self._waiting[:0] = [w for w in again if not w.answer.done()]

    def _one_by_one(self, waiting: _Waiting) -> None:
        async def one() -> None:
            try:
                answer = await self.command(waiting.request)
            except Exception as exc:
                if not waiting.answer.done():
                    waiting.answer.set_exception(exc)
            else:
                if not waiting.answer.done():
                    waiting.answer.set_result(answer)

        self._spawn(one())
