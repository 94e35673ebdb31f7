"""The copy task of a pair: initial copy or resync, saved as it goes.

One task per pair runs the copy engine (:mod:`splitmirror.datapath.copyengine`)
in the pair's direction while a checkpoint task saves the shrinking pending
bitmap.  A copy that completes tells the mirror end and takes the pair from
COPY to DUPLEX; one that fails suspends the pair with its tracks still
pending, so the next resync goes on from there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from ..datapath.copyengine import CopyFailed, copy_forward, copy_reverse, read_tracks
from ..errors import SplitmirrorError
from ..pairstate.pair import Pair
from ..status import PairOp, PairStatus
from ..v1 import interconnect_pb2 as ic
from .context import PairContext
from .peer import command

log = logging.getLogger("splitmirror.pairs")

CHECKPOINT_SECONDS = 1.0  # how often a running copy saves its pending bitmap


class Copier:
    def __init__(self, context: PairContext) -> None:
        self.context = context
        self.system = context.system

    def start(self, pair: Pair) -> None:
        if pair.copy_task is not None and not pair.copy_task.done():
            return
        pair.copy_task = asyncio.create_task(self._copy(pair), name=f"copy-{pair.name}")

    async def _copy(self, pair: Pair) -> None:
        assert pair.primary is not None
        reverse = pair.row.direction == "reverse"
        checkpoints = asyncio.create_task(self._checkpoint_copy(pair), name=f"checkpoint-{pair.name}")
        try:
            if reverse:
                await copy_reverse(self.system, pair, lambda tracks: self._track_source(pair, tracks))
            else:
                await copy_forward(self.system, pair)
            if pair.status is not PairStatus.COPY:
                return
            if pair.remote:
                await command(pair, ic.PAIR_OP_RESYNC_DONE)
            self.context.set_status(pair, PairOp.COPY_DONE)
            for end in pair.ends:
                end.row.direction = "forward"
            await self.system.save_rows(pair)
            await self.system.save_bitmaps(pair)
        except CopyFailed as exc:
            log.warning("%s; %d tracks still pending", exc, len(pair.primary.bitmap))
            await self.system.save_bitmaps(pair)
        except (grpc.aio.AioRpcError, SplitmirrorError) as exc:
            reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc.message
            log.warning("pair %s: copy interrupted: %s", pair.name, reason)
            if pair.status is PairStatus.COPY:
                self.context.set_status(pair, PairOp.FAULT, "copy-interrupted")
                await self.system.save_rows(pair)
            await self.system.save_bitmaps(pair)
        except asyncio.CancelledError:
            await asyncio.shield(self.system.save_bitmaps(pair))
            raise
        except Exception:
            log.exception("pair %s: copy failed", pair.name)
            if pair.status is PairStatus.COPY:
                self.context.set_status(pair, PairOp.FAULT, "copy-error")
                await self.system.save_rows(pair)
            await self.system.save_bitmaps(pair)
        finally:
            checkpoints.cancel()
            pair.progress = None if pair.status is not PairStatus.COPY else pair.progress

    async def _checkpoint_copy(self, pair: Pair) -> None:
        """Save the shrinking bitmap while a copy runs, so that a copy cut
        short by kill -9 resumes near where it stopped, not from its start.
        Bits are cleared only for acknowledged tracks, so what is saved
        always covers what is still to copy."""
        saved = -1
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            progress = pair.progress
            if progress is not None and progress.done_tracks != saved:
                saved = progress.done_tracks
                await self.system.save_bitmaps(pair)

    def _track_source(self, pair: Pair, tracks: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
        if not pair.remote:
            return read_tracks(self.system, pair, tracks)
        assert pair.link is not None
        link = pair.link

        async def remote() -> AsyncIterator[tuple[int, int, bytes]]:
            async for td in link.read_tracks(pair.name, tracks):
                yield td.track, td.count, td.data

        return remote()
