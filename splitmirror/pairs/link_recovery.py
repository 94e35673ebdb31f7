"""Link loss and recovery: what faults do to pairs, and how pairs come back.

A broken replication stream, a lost peer or an async queue that would
overflow suspends the pair at once, with no await before the status change,
so writes from then on are tracked in the pending bitmap instead of queued:
hosts are never blocked and nothing is lost.  When the peer answers again,
or a keepalive shows that the mirror end suspended itself, the primary end
brings both ends back to agreement and (with auto-resync) resyncs by bitmap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..datapath.writes import mark
from ..errors import FailedPrecondition, SplitmirrorError
from ..eventsink import LINK_DOWN, LINK_UP, Event, caused_by
from ..pairstate.channel import RemoteChannel
from ..pairstate.pair import Pair
from ..replication.framing import MAX_SEQ
from ..replication.link import PeerLink
from ..replication.queue import Entry
from ..status import MIRRORING, PairOp, PairStatus
from ..v1 import interconnect_pb2 as ic
from .context import PairContext, ResyncCommand
from .copying import Copier
from .peer import command
from .roles import Roles

log = logging.getLogger("splitmirror.pairs")

#: Why a replication stream broke, when it says the link (not the pair) failed.
LINK_FAULTS = ("link error", "peer-timeout")


class LinkRecovery:
    def __init__(self, context: PairContext, copier: Copier, resync: ResyncCommand, roles: Roles) -> None:
        self.context = context
        self.roles = roles
        self.system = context.system
        self.settings = context.settings
        self.copier = copier
        self.resync = resync
        self._reconciles = asyncio.Semaphore(max(1, self.settings.reconciles_at_once))

    # -- faults -----------------------------------------------------------------------------
    async def on_stream_failure(self, pair: Pair, lost: list[Entry], reason: str) -> None:
        # No await before the status change: writes arriving from now on are
        # tracked instead of queued.
        changed = pair.status in MIRRORING and self.context.set_status(pair, PairOp.FAULT, reason)
        assert pair.primary is not None
        end = pair.primary
        ts = end.volume.track_size
        runs = [r for e in lost if not e.flush and e.length
                for r in [mark(end.bitmap, e.offset, e.length, ts)] if r]
        if runs:
            await self.system.table.add_runs(pair.name, end.volume.name, runs)
        if changed:
            if pair.link is not None and reason.startswith(LINK_FAULTS):
                # Only a fault of the link itself suspects the link (every
                # pair on it): a refusal of this pair's stream by the peer is
                # this pair's business, and in a mass recovery would make
                # every other pair reconcile again.
                if pair.link.up:
                    self.system.events.emit(Event(LINK_DOWN, peer=pair.peer_id, reason=reason))
                pair.link.suspect(reason)
            await self.system.save_rows(pair)

    async def auto_resync_local(self, pair: Pair) -> None:
        try:
            with caused_by("auto-resync"):
                await self.resync(pair.name, reverse=False)
        except SplitmirrorError as exc:
            log.warning("pair %s: automatic resync failed: %s", pair.name, exc.message)

    async def on_peer_down(self, link: PeerLink) -> None:
        self.system.events.emit(Event(LINK_DOWN, peer=link.peer_id, reason=link.reason or "peer-down"))
        # Every pair suspended at once (no await between), their rows saved
        # with one sync, then their streams closed (lost writes become bits).
        hit = [p for p in self.context.pairs_with(link.peer_id) if p.status in MIRRORING]
        for pair in hit:
            self.context.set_status(pair, PairOp.FAULT, link.reason or "peer-down")
        if hit:
            await self.system.save_rows_of(hit)
        for pair in hit:
            if pair.primary is not None and isinstance(pair.channel, RemoteChannel):
                await pair.channel.stream.close()

    def on_overflow(self, pair: Pair) -> None:
        """An async queue is full: suspend now (no await), then clean up."""
        if self.context.set_status(pair, PairOp.FAULT, "queue-full"):
            self.context.spawn(self._after_overflow(pair), f"overflow-{pair.name}")

    async def _after_overflow(self, pair: Pair) -> None:
        await self.system.save_rows(pair)
        if isinstance(pair.channel, RemoteChannel):
            await pair.channel.stream.close()  # unacknowledged writes become pending bits
        if pair.remote:
            with contextlib.suppress(SplitmirrorError):
                await command(pair, ic.PAIR_OP_SUSPEND, reason="queue-full")
        if self.settings.auto_resync and pair.status is PairStatus.SUSPENDED:
            await asyncio.sleep(0.2)
            with contextlib.suppress(SplitmirrorError), caused_by("auto-resync"):
                await self.resync(pair.name, reverse=False)

    # -- recovery ---------------------------------------------------------------------------
    async def on_peer_up(self, link: PeerLink) -> None:
        self.system.events.emit(Event(LINK_UP, peer=link.peer_id))
        # Who is primary first: an end that lost the role fences itself
        # before anything else happens to its pairs.
        await self.roles.first_contact(link, max(1.0, self.settings.link_timeout))
        # A primary end without a link is being promoted here (a swap): its promotion drives it.
        pairs = [p for p in self.context.pairs_with(link.peer_id)
                 if p.primary is not None and p.link is not None and not p.reconciling]
        for pair in pairs:
            pair.reconciling = True
        await asyncio.gather(*(self._reconcile_once(pair) for pair in pairs))

    def on_hello(self, link: PeerLink, reply: ic.HelloReply) -> None:
        """Every keepalive answer: catch a mirror end that suspended itself
        while we saw no fault (it lost us briefly), and retry automatic
        resyncs that failed while the link stayed up."""
        self.roles.check(link, link.peer_roles)
        peer_status = {state.pair: state.status for state in reply.mirrors}
        now = time.monotonic()
        for pair in self.context.pairs_with(link.peer_id):
            if pair.primary is None or pair.link is None or pair.reconciling:
                continue
            if pair.status is PairStatus.DUPLEX:
                pair.retry.reset()
                stale = peer_status.get(pair.name) == PairStatus.SUSPENDED.value
            else:
                stale = (pair.status is PairStatus.SUSPENDED and self.settings.auto_resync
                         and (pair.copy_task is None or pair.copy_task.done()) and pair.retry.due(now))
            if stale:
                pair.reconciling = True
                self.context.spawn(self._reconcile_once(pair), f"reconcile-{pair.name}")

    async def _reconcile_once(self, pair: Pair) -> None:
        try:
            async with self._reconciles:  # a bounded number at once: a thousand pairs come back in turn
                await self._reconcile(pair)
        except SplitmirrorError as exc:
            log.warning("pair %s: reconnect handling failed: %s", pair.name, exc.message)
        finally:
            pair.reconciling = False
            if pair.status is PairStatus.SUSPENDED:
                pair.retry.failed(time.monotonic(), self.settings.link_timeout)

    async def _reconcile(self, pair: Pair) -> None:
        """After a reconnect: bring both ends back to agreement."""
        if pair.primary is None or pair.link is None:
            return  # demoted or being promoted meanwhile (a swap): that procedure drives the pair
        state = await command(pair, ic.PAIR_OP_STATUS)
        remote = PairStatus(state.status)
        if isinstance(pair.channel, RemoteChannel) and not pair.channel.stream.queue.unacked:
            # Number on from what the mirror applied (after a restart here the
            # stream would start at 1 again): a takeover's point stays readable.
            queue = pair.channel.stream.queue
            if state.applied_seq < MAX_SEQ // 2:  # a peer's number, not trusted to run the stream out
                queue.next_seq = max(queue.next_seq, state.applied_seq + 1)
        if pair.status is PairStatus.DUPLEX and remote is PairStatus.DUPLEX:
            return
        if pair.status is PairStatus.COPY:
            if remote is not PairStatus.COPY:
                await command(pair, ic.PAIR_OP_RESYNC_BEGIN, reverse=pair.row.direction == "reverse")
            self.copier.start(pair)
            return
        if pair.status is PairStatus.SPLIT:
            if remote in MIRRORING:  # a split the peer never heard of (crash)
                await command(pair, ic.PAIR_OP_SPLIT, split_time=pair.row.split_time or "")
            return
        quiet = pair.status is PairStatus.DUPLEX and state.pending_tracks == 0
        if pair.status is PairStatus.DUPLEX:
            self.context.set_status(pair, PairOp.FAULT, f"peer {pair.peer_id} was {remote.value}")
            await self.system.save_rows(pair)
        if pair.status is PairStatus.SUSPENDED and (quiet or self.settings.auto_resync):
            log.info("pair %s: peer %d back, resyncing automatically", pair.name, pair.peer_id)
            try:
                # An interrupted reverse copy resumes as a reverse copy: going
                # forward instead would overwrite what hosts wrote at the mirror.
                with caused_by("auto-resync"):
                    await self.resync(pair.name, reverse=pair.row.direction == "reverse", known=state)
            except FailedPrecondition as exc:
                log.warning("%s; not resyncing automatically", exc.message)
