"""Planned switchover: swap the roles of a pair's ends with zero data loss.

``pair swap`` (either site, both up, the pair DUPLEX) is driven by the
current primary, in steps that each leave at most one writable end:

1. hold host writes on every pair named (a consistency group: all at one
   point of the write order), and drain the stream with a flush;
2. confirm the ends are in step: both DUPLEX, nothing pending at either;
3. demote: this end becomes the mirror end at the next epoch, persisted
   (from here no end here is writable);
4. tell the other end to take the primary role at that epoch; it
   persists it, wires its stream to us and serves host writes.

No data is copied.  A second swap is the failback.  A ``kill -9`` between
3 and 4 leaves both ends refusing writes; on their next contact the epoch
rule (:func:`splitmirror.pairs.roles.decide`) promotes the other end.
"""

from __future__ import annotations

import logging

import grpc

from ..clock import utc_now
from ..errors import FailedPrecondition, SplitmirrorError, Unavailable
from ..pairstate.pair import EndRole, Pair
from ..replication.link import relay
from ..status import PairStatus
from ..storage.copytable import RoleRecord
from ..v1 import interconnect_pb2 as ic
from .context import PairContext
from .failpoints import failpoint
from .peer import command
from .roles import Attach, Roles, check_next_epoch

log = logging.getLogger("splitmirror.pairs")


class Swap:
    def __init__(self, context: PairContext, roles: Roles, attach: Attach) -> None:
        self.context = context
        self.system = context.system
        self.roles = roles
        self.attach = attach
        roles.promote = self.promote

    async def swap(self, name: str, group: str) -> list[Pair]:
        pairs = self.roles.named(name, group)
        for pair in pairs:
            if not pair.remote:
                raise FailedPrecondition(f"pair {pair.name!r} is a local pair; swap is for remote pairs")
        roles = {p.role for p in pairs}
        if roles == {EndRole.MIRROR}:
            return await self._ask_primary(pairs, name, group)
        if roles != {EndRole.PRIMARY}:
            raise FailedPrecondition(f"group {group!r} has primary and mirror ends on system "
                                     f"{self.system.system_id}; swap its pairs one by one")
        await self.drive(pairs)
        return pairs

    async def _ask_primary(self, pairs: list[Pair], name: str, group: str) -> list[Pair]:
        """Issued at the mirror end: the primary drives the swap (and promotes us)."""
        peers = {p.peer_id for p in pairs}
        if len(peers) != 1:
            raise FailedPrecondition(f"group {group!r} spans primaries {sorted(peers)}; swap per pair")
        link = self.context.link(peers.pop())
        if not link.up:
            raise Unavailable(f"pair {pairs[0].name!r}: its primary, system {link.peer_id}, is unreachable; a swap "
                              f"needs both ends (when the primary site is lost: 'splitmirror pair takeover')")
        try:
            await link.stub.PairCommand(ic.PairCommandRequest(pair=name or pairs[0].name, op=ic.PAIR_OP_SWAP,
                                                              group=group),
                                        metadata=link.metadata, timeout=max(30.0, link.timeout))
        except grpc.aio.AioRpcError as exc:
            raise relay(exc, link.peer_id) from None
        return pairs

    async def drive(self, pairs: list[Pair]) -> None:
        """At the primary: drain, confirm, demote here, promote there."""
        for pair in pairs:
            self._check(pair)
        peer = pairs[0].peer_id
        held = f"swap of pair {{}} to system {peer} under way; host writes wait for the new primary (retry there)"
        for pair in pairs:  # one point of the write order for the whole group
            pair.hold_writes = held.format(repr(pair.name))
        try:
            for pair in pairs:
                assert pair.channel is not None
                if not await pair.channel.push(0, flush=True):
                    raise Unavailable(f"pair {pair.name!r}: the mirror became unreachable while draining; "
                                      "swap not done, roles unchanged")
            failpoint("swap-drained")
            for pair in pairs:
                await self._confirm(pair)
        except BaseException:
            for pair in pairs:
                pair.hold_writes = ""
            raise
        # Demote: persisted before the other end is told, so that at no
        # moment are both ends writable.  The other end learns it from step 4
        # (or, after a crash here, on contact), not from a keepalive.
        self.roles.hold_shown(pairs)
        try:
            await self._demote_and_hand_over(pairs, peer)
        finally:
            self.roles.release_shown(pairs)

    async def _demote_and_hand_over(self, pairs: list[Pair], peer: int) -> None:
        check_next_epoch(pairs)
        epoch = max(p.row.epoch for p in pairs) + 1
        since = utc_now()
        for pair in pairs:
            if pair.channel is not None:
                channel, pair.channel = pair.channel, None
                await channel.close()
            end = pair.primary
            assert end is not None
            end.row.epoch = epoch
            end.row.role = RoleRecord(how="swap", since=since, swap="demoted")
            pair.move_end_to(EndRole.MIRROR)
            pair.hold_writes = ""
        for pair in pairs:
            await self.system.save_rows(pair)
            self.roles.report(pair, "demoted", f"swap to system {peer}")
        failpoint("swap-demoted")
        for pair in pairs:
            try:
                await self.context.link(peer).stub.PairCommand(
                    ic.PairCommandRequest(pair=pair.name, op=ic.PAIR_OP_SWAP, epoch=epoch),
                    metadata=self.context.link(peer).metadata, timeout=max(10.0, self.context.settings.link_timeout))
            except grpc.aio.AioRpcError as exc:
                log.warning("pair %s: system %d did not confirm the primary role: %s", pair.name, peer, exc.details())
                raise Unavailable(
                    f"pair {pair.name!r}: system {self.system.system_id} gave the primary role up (epoch {epoch}) "
                    f"but system {peer} did not confirm taking it; it takes it when it next reaches system "
                    f"{self.system.system_id}, or, if it is lost, run 'splitmirror pair takeover {pair.name}' "
                    "here") from None
            pair.row.role.swap = ""
            await self.system.save_rows(pair)
        log.info("pairs %s swapped: system %d is primary at epoch %d", ", ".join(p.name for p in pairs), peer, epoch)

    def _check(self, pair: Pair) -> None:
        if pair.status is not PairStatus.DUPLEX:
            raise FailedPrecondition(f"pair {pair.name!r} is {pair.status.value}; swap needs it DUPLEX (resync first)")
        if pair.link is None or not pair.link.up:
            raise Unavailable(f"pair {pair.name!r}: system {pair.peer_id} is unreachable; a swap needs both ends")
        if pair.backup_running or (pair.copy_task is not None and not pair.copy_task.done()):
            raise FailedPrecondition(f"pair {pair.name!r} is busy (a backup or copy is running); retry")

    async def _confirm(self, pair: Pair) -> None:
        """Both ends in step: DUPLEX, nothing pending on either."""
        assert pair.primary is not None
        try:
            state = await command(pair, ic.PAIR_OP_STATUS)
        except SplitmirrorError as exc:
            raise Unavailable(f"pair {pair.name!r}: system {pair.peer_id} did not confirm it is in step "
                              f"({exc.message}); swap not done") from None
        if pair.status is not PairStatus.DUPLEX or len(pair.primary.bitmap) or state.status != "DUPLEX" \
                or state.pending_tracks:
            raise FailedPrecondition(
                f"pair {pair.name!r} is not in step (here {pair.status.value} with {len(pair.primary.bitmap)} "
                f"tracks pending, system {pair.peer_id} {state.status} with {state.pending_tracks}); swap not done")

    async def promote(self, pair: Pair, epoch: int) -> None:
        """At the mirror end: take the primary role the other end gave up at ``epoch``."""
        end = pair.mirror
        if end is None:
            if pair.primary is not None and pair.primary.row.epoch < epoch:
                pair.primary.row.epoch = epoch
                await self.system.save_rows(pair)
            return
        if end.row.epoch >= epoch:
            raise FailedPrecondition(f"pair {pair.name!r}: system {self.system.system_id} is at epoch "
                                     f"{end.row.epoch} already; a swap to epoch {epoch} is stale")
        failpoint("swap-promote")
        self.roles.hold_shown([pair])  # the old primary learns it from our answer, not from a keepalive
        try:
            end.row.epoch = epoch
            end.row.role = RoleRecord(how="swap", since=utc_now())
            pair.move_end_to(EndRole.PRIMARY)
            # Wired at once: a keepalive answer during the save reconciles
            # primary ends, which need their link.
            self.attach(pair, self.context.link(pair.peer_id))
            await self.system.save_rows(pair)
            failpoint("swap-promoted")
        finally:
            self.roles.release_shown([pair])
        log.warning("pair %s: primary here at epoch %d (swapped from system %d)", pair.name, epoch, pair.peer_id)
        self.roles.report(pair, "promoted", f"swap from system {pair.peer_id}")
