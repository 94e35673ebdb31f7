"""The pair manager: the small facade the host API and the interconnect call.

It holds one object per role of a pair end and sends each command on an
existing pair to the module of the role this system plays for it
(:attr:`~splitmirror.pairstate.pair.Pair.role`): ``split`` on a pair whose
mirror end is here goes to the mirror end, which refuses it.  The
interconnect's handlers go to the mirror end, which answers only for the
pairs it holds the mirror end of.  It also wires the pairs loaded at start
to their channels and stops them cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from ..datapath.local_channel import LocalChannel
from ..datapath.system import StorageSystem
from ..errors import InvalidArgument, NotFound
from ..pairstate.pair import MODES, EndRole, Pair
from ..replication.framing import Frame, SequenceCheck
from ..replication.link import PeerLink
from ..status import PairOp, PairStatus
from ..v1 import interconnect_pb2 as ic
from .context import PairContext
from .copying import Copier
from .crash_recovery import recover_write_intent
from .group_rollback import GroupRollback
from .link_recovery import LinkRecovery
from .mirror_batch import run_commands
from .mirror_end import MirrorEnd
from .primary_end import PrimaryEnd
from .roles import Roles
from .settings import Settings
from .swap import Swap
from .verify import Verifier

log = logging.getLogger("splitmirror.pairs")


class EndCommands(Protocol):
    """The host's commands on an existing pair, as the module of one role answers them."""

    async def split(self, pair: Pair) -> Pair: ...

    async def resync(self, pair: Pair, reverse: bool, force: bool = False,
                     known: ic.MirrorState | None = None) -> Pair: ...

    async def delete(self, pair: Pair) -> None: ...

    async def set_mode(self, pair: Pair, mode: str) -> Pair: ...

    async def verify(self, pair: Pair, repair: bool) -> tuple[int, list[int], bool]: ...


class PairManager:
    def __init__(self, system: StorageSystem, links: dict[int, PeerLink], settings: Settings) -> None:
        self.system = system
        self.links = links
        self.settings = settings
        self.context = PairContext(system, links, settings)
        self.copying = Copier(self.context)
        self.roles = Roles(self.context, lambda pair, link: self.primary_end.attach_remote(pair, link))
        self.recovery = LinkRecovery(self.context, self.copying, self.resync, self.roles)
        self.primary_end = PrimaryEnd(self.context, self.copying, Verifier(self.context, self.resync),
                                      self.recovery.on_stream_failure)
        rollback = GroupRollback(self.context)
        self.roles.roll_back = rollback.roll_back
        self.mirror_end = MirrorEnd(self.context, rollback)
        self.swapping = Swap(self.context, self.roles, lambda pair, link: self.primary_end.attach_remote(pair, link))
        self._ends: dict[EndRole, EndCommands] = {EndRole.PRIMARY: self.primary_end,
                                                  EndRole.MIRROR: self.mirror_end}
        system.async_queue_bytes = settings.async_queue_bytes
        system.on_overflow = self.recovery.on_overflow

    # -- startup / shutdown -----------------------------------------------------
    async def start(self) -> None:
        """Wire loaded pairs to their channels; recover after an unclean stop."""
        if not self.system.clean_start:
            await recover_write_intent(self.context)
        for pair in self.system.pairs.values():
            if pair.role is not EndRole.PRIMARY:
                continue
            if pair.remote:
                link = self.links.get(pair.peer_id)
                if link is None:
                    log.error("pair %s: peer system %d is not configured; pair stays as it is", pair.name,
                              pair.peer_id)
                    continue
                self.primary_end.attach_remote(pair, link)
            else:
                pair.channel = LocalChannel(self.system, pair)
                if pair.status is PairStatus.COPY:
                    self.copying.start(pair)
                elif pair.status is PairStatus.SUSPENDED and self.settings.auto_resync:
                    # No peer will come back to trigger it: resync right away.
                    self.context.spawn(self.recovery.auto_resync_local(pair), f"resync-{pair.name}")
        # Before the host API serves a write: ask each peer who is primary
        # now (an old primary that lost the role fences itself here).
        peers = sorted({p.peer_id for p in self.system.pairs.values() if p.remote} & set(self.links))
        await asyncio.gather(*(self.roles.first_contact(self.links[peer], max(1.0, self.settings.link_timeout))
                               for peer in peers))
        self.system.intent.start()

    async def stop(self) -> None:
        for pair in self.system.pairs.values():
            if pair.copy_task is not None:
                pair.copy_task.cancel()
        await self.context.cancel_tasks()
        for pair in self.system.pairs.values():
            if pair.channel is not None:
                await pair.channel.close()
        # The last sequence each mirror end applied: a takeover after the restart names it.
        mirrors = [p.mirror.row for p in self.system.pairs.values() if p.mirror is not None and p.remote]
        if mirrors:
            await self.system.table.save_pairs(mirrors)
        await self.system.intent.stop()
        await self.system.intent.clear_idle(0)

    # -- lookups and status -----------------------------------------------------
    def pair(self, name: str) -> Pair:
        return self.context.pair(name)

    def link(self, peer: int) -> PeerLink:
        return self.context.link(peer)

    def pairs_with(self, peer: int) -> list[Pair]:
        return self.context.pairs_with(peer)

    def mirror_pair(self, peer: int, name: str) -> Pair:
        """The pair ``name`` whose mirror end is here, driven by system ``peer``."""
        return self.mirror_end.pair_for(peer, name)

    def set_status(self, pair: Pair, op: PairOp, reason: str = "") -> bool:
        return self.context.set_status(pair, op, reason)

    def _end(self, pair: Pair) -> EndCommands:
        return self._ends[pair.role]

    # -- the host's pair commands -------------------------------------------------
    async def create(self, name: str, pvol: str, svol: str, peer: int, mode: str, group: str) -> Pair:
        return await self.primary_end.create(name, pvol, svol, peer, mode, group)

    async def split(self, name: str) -> Pair:
        pair = self.pair(name)
        return await self._end(pair).split(pair)

    async def resync(self, name: str, reverse: bool, force: bool = False,
                     known: ic.MirrorState | None = None) -> Pair:
        """``pair resync``; ``known``: the mirror end's state, just asked (reconnect handling)."""
        pair = self.pair(name)
        return await self._end(pair).resync(pair, reverse, force, known)

    async def delete(self, name: str) -> None:
        pair = self.pair(name)
        await self._end(pair).delete(pair)

    async def set_mode(self, name: str, mode: str) -> Pair:
        if mode not in MODES:
            raise InvalidArgument(f"pair {name!r}: mode must be sync or async, not {mode!r}")
        pair = self.pair(name)
        return await self._end(pair).set_mode(pair, mode)

    async def verify(self, name: str, repair: bool) -> tuple[int, list[int], bool]:
        """Compare per-track digests of both ends; no data crosses."""
        pair = self.pair(name)
        return await self._end(pair).verify(pair, repair)

    # -- disaster recovery ------------------------------------------------------------
    async def takeover(self, name: str, group: str, force: bool = False) -> list[Pair]:
        return await self.roles.takeover(name, group, force)

    async def swap(self, name: str, group: str) -> list[Pair]:
        return await self.swapping.swap(name, group)

    # -- the interconnect: the mirror end's side ----------------------------------------
    async def mirror_attach(self, peer: int, req: ic.AttachMirrorRequest) -> ic.MirrorState:
        return await self.mirror_end.attach(peer, req)

    async def mirror_command(self, peer: int, req: ic.PairCommandRequest) -> ic.MirrorState:
        if req.op == ic.PAIR_OP_ROLE:
            for state in self.roles.roles_for(peer):
                if state.pair == req.pair:
                    return state
            raise NotFound(f"pair {req.pair!r} has no end on system {self.system.system_id} for system {peer}")
        if req.op == ic.PAIR_OP_SWAP:
            return await self._swap_command(peer, req)
        return await self.mirror_end.command(peer, req)

    async def mirror_commands(self, peer: int, req: ic.PairCommandsRequest) -> ic.PairCommandsReply:
        return await run_commands(self.system, self.mirror_command, peer, req)

    async def _swap_command(self, peer: int, req: ic.PairCommandRequest) -> ic.MirrorState:
        """A swap asked by the mirror end (epoch 0: drive it here), or the primary
        handing its role over (promote here)."""
        pair = self.pair(req.pair)
        if not pair.remote or pair.peer_id != peer:
            raise NotFound(f"pair {req.pair!r} has no end on system {self.system.system_id} for system {peer}")
        if req.epoch:
            await self.swapping.promote(pair, req.epoch)
        else:
            await self.swapping.swap("" if req.group else req.pair, req.group)
        return next(s for s in self.roles.roles_for(peer) if s.pair == pair.name)

    async def mirror_apply(self, pair: Pair, batch: ic.ReplicateBatch, sequence: SequenceCheck) -> int:
        return await self.mirror_end.apply(pair, batch, sequence)

    async def mirror_apply_frames(self, pair: Pair, frames: list[Frame], sequence: SequenceCheck) -> int:
        return await self.mirror_end.apply_frames(pair, frames, sequence)

    async def mirror_refuse_stream(self, pair: Pair, why: str) -> None:
        self.mirror_end.check_mirroring(pair)
        await self.mirror_end.refuse_stream(pair, why)

    def mirror_read_tracks(self, peer: int, name: str, tracks: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
        return self.mirror_end.read_tracks(peer, name, tracks)

    async def mirror_digests(self, peer: int, req: ic.TrackDigestsRequest) -> ic.TrackDigestsReply:
        return await self.mirror_end.digests(peer, req)
