"""Verify a pair: compare per-track digests of both ends; no data crosses.

Issued at the primary end.  Each chunk of tracks is held against writes,
a barrier makes sure the mirror applied every earlier write, and both ends'
digests are compared.  With repair, the mismatching tracks are marked
pending and resynced.
"""

from __future__ import annotations

import logging

import grpc

from ..errors import FailedPrecondition, Unavailable
from ..pairstate.pair import CopyProgress, Pair
from ..replication.link import relay
from ..status import PairOp, PairStatus
from ..v1 import interconnect_pb2 as ic
from .context import PairContext, ResyncCommand
from .peer import command

log = logging.getLogger("splitmirror.pairs")

VERIFY_CHUNK = 64 << 20  # bytes compared per step (writes to it wait meanwhile)


class Verifier:
    def __init__(self, context: PairContext, resync: ResyncCommand) -> None:
        self.context = context
        self.system = context.system
        self.settings = context.settings
        self.resync = resync

    async def verify(self, pair: Pair, repair: bool) -> tuple[int, list[int], bool]:
        """Compare per-track digests of both ends; no data crosses."""
        name = pair.name
        end = pair.primary
        assert end is not None  # verify is a command of the primary end
        if pair.status is not PairStatus.DUPLEX:
            raise FailedPrecondition(f"pair {name!r} is {pair.status.value}; verify compares a DUPLEX pair")
        assert pair.channel is not None
        vol = end.volume
        ts = vol.track_size
        chunk = max(1, VERIFY_CHUNK // ts)
        mismatches: list[int] = []
        if pair.verify_progress is not None:
            raise FailedPrecondition(f"pair {name!r}: a verify is already running")
        progress = pair.verify_progress = CopyProgress("verify", vol.tracks, ts)
        try:
            for first in range(0, vol.tracks, chunk):
                count = min(chunk, vol.tracks - first)
                async with self.system.order(vol).hold(first * ts, count * ts):
                    if not await pair.channel.push(0):  # barrier: earlier writes applied
                        raise Unavailable(f"pair {name!r}: the mirror became unreachable during verify")
                    here = await vol.verify_digests(first, count)
                    there = await self._mirror_digests(pair, first, count)
                mismatches.extend(first + i for i in range(count)
                                  if here[8 * i:8 * i + 8] != there[8 * i:8 * i + 8])
                progress.done_tracks += count
        finally:
            pair.verify_progress = None
        log.info("pair %s: verify checked %d tracks, %d mismatching", name, vol.tracks, len(mismatches))
        repaired = False
        if repair and mismatches:
            for track in mismatches:
                end.bitmap.add(track)
            await self.system.save_bitmaps(pair)
            # Suspend and resync as one step: no automatic resync may slip in.
            busy, pair.reconciling = pair.reconciling, True
            try:
                if pair.status is PairStatus.DUPLEX:
                    self.context.set_status(pair, PairOp.FAULT, "verify-repair")
                    await self.system.save_rows(pair)
                    if pair.remote:
                        await command(pair, ic.PAIR_OP_SUSPEND, reason="verify-repair")
                await self.resync(name, reverse=False, force=True)
            finally:
                pair.reconciling = busy
            repaired = True
        return vol.tracks, mismatches, repaired

    async def _mirror_digests(self, pair: Pair, first: int, count: int) -> bytes:
        if not pair.remote:
            assert pair.mirror is not None
            mvol = pair.mirror.volume
            return await mvol.verify_digests(first, count)
        assert pair.link is not None
        try:
            reply = await pair.link.stub.TrackDigests(
                ic.TrackDigestsRequest(pair=pair.name, first_track=first, count=count),
                metadata=pair.link.metadata, timeout=max(30.0, self.settings.link_timeout))
        except grpc.aio.AioRpcError as exc:
            raise relay(exc, pair.peer_id) from None
        return bytes(reply.digests)
