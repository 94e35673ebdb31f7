"""Who is primary: role epochs, takeover, and fencing an old primary that returns.

Each end of a remote pair keeps a role epoch in the copy table (DRBD's
generation identifiers are the model): it grows by one at every takeover
and every swap.  At each epoch exactly one end may be primary, so when two
ends meet, the one with the higher epoch says who is primary now
(:func:`decide`, pure): an old primary that learns it lost the role fences
its volume before serving another host write (reads stay allowed) and
waits, SUSPENDED, with its own divergent tracks still pending, until the
new primary's operator resyncs; nothing is overwritten before that.

A takeover (``pair takeover``, at the secondary, while the primary is
unreachable) moves this system's end to the primary role at the next
epoch and holds the pair SPLIT: host writes are tracked in its bitmap, and
no automatic resync runs.  Swapping roles with both ends up is
:mod:`splitmirror.pairs.swap`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from ..clock import utc_now
from ..errors import FailedPrecondition, InvalidArgument, NotFound, SplitmirrorError
from ..eventsink import ROLE, Event
from ..pairstate.pair import EndRole, Pair
from ..replication.link import PeerLink
from ..status import PairOp, PairStatus
from ..storage.copytable import RoleRecord
from ..v1 import interconnect_pb2 as ic
from .context import PairContext
from .failpoints import failpoint
from .group_rollback import RolledBack

log = logging.getLogger("splitmirror.pairs")

#: Wires a pair whose end became primary here to its mirror channel.
Attach = Callable[[Pair, PeerLink], None]
#: Makes this system's mirror end primary at an epoch the other end handed over (a swap).
Promote = Callable[[Pair, int], Awaitable[None]]
#: Returns async group mirror ends to their group's last complete cut (before a takeover).
RollBack = Callable[[list[Pair]], Awaitable[dict[str, RolledBack]]]

#: The largest role epoch: kept in SQLite (signed 64 bits), as every integer a peer sends.
MAX_EPOCH = (1 << 63) - 1


def check_next_epoch(pairs: list[Pair]) -> None:
    """Refuse a role change whose next epoch would pass :data:`MAX_EPOCH` (nothing changed yet)."""
    for pair in pairs:
        if pair.row.epoch >= MAX_EPOCH:
            raise FailedPrecondition(f"pair {pair.name!r} is at role epoch {pair.row.epoch}, the largest there is "
                                     f"({MAX_EPOCH}); it cannot change roles again (delete and recreate it)")


#: Why host writes wait while an end learns whether it is still primary.
FENCING = "took the primary role over; fencing"
#: Why host writes are refused while both ends claim the primary role.
CONFLICT = "both claim the primary role"


class Decision(enum.Enum):
    """What an end does after comparing its role epoch with the other end's."""

    KEEP = "keep"              # the roles agree (or the other end has to act)
    FENCE = "fence"            # I was primary; the other end took the role at a higher epoch
    PROMOTE = "promote"        # the other end gave me the role (a swap it finished its half of)
    ADOPT = "adopt"            # my role is right; take the higher epoch number
    CONFLICT = "conflict"      # both primary at one epoch: refuse writes at both ends
    NO_PRIMARY = "no-primary"  # both mirror at one epoch: an operator takes over at one end


def decide(my_epoch: int, i_am_primary: bool, peer_epoch: int, peer_is_primary: bool) -> Decision:
    """The one rule that settles the roles when two ends of a pair meet."""
    if peer_epoch > my_epoch:
        if peer_is_primary:
            return Decision.FENCE if i_am_primary else Decision.ADOPT
        return Decision.ADOPT if i_am_primary else Decision.PROMOTE
    if peer_epoch < my_epoch:
        return Decision.KEEP
    if i_am_primary and peer_is_primary:
        return Decision.CONFLICT
    if not i_am_primary and not peer_is_primary:
        return Decision.NO_PRIMARY
    return Decision.KEEP


class Roles:
    """Takeover, and the role check every contact with a peer runs."""

    def __init__(self, context: PairContext, attach: Attach) -> None:
        self.context = context
        self.system = context.system
        self.attach = attach
        self._settling: dict[int, asyncio.Lock] = {}
        #: Per peer: the records of the last roles digest computed, and that digest.
        self._digests: dict[int, tuple[list[tuple[str, PairStatus, int, bool]], bytes]] = {}
        #: Pairs whose role change is under way here: the role and epoch peers still see.
        self._shown: dict[str, tuple[int, bool]] = {}
        #: Set by the swap module: completes a swap the other end began.
        self.promote: Promote | None = None
        #: Set by the manager: an async group's mirror ends back to their common point.
        self.roll_back: RollBack | None = None

    # -- which pairs a command names ------------------------------------------------------
    def named(self, name: str, group: str) -> list[Pair]:
        if bool(name) == bool(group):
            raise InvalidArgument("name a pair or a consistency group (--group), not both")
        if name:
            return [self.context.pair(name)]
        pairs = [p for _, p in sorted(self.system.pairs.items()) if p.row.group == group and p.remote]
        if not pairs:
            raise NotFound(f"consistency group {group!r} has no remote pair on system {self.system.system_id}")
        return pairs

    def report(self, pair: Pair, what: str, reason: str, detail: str = "") -> None:
        end = pair.primary or pair.mirror
        assert end is not None
        self.system.events.emit(Event(ROLE, pair=pair.name, volume=end.volume.name, peer=pair.peer_id, op=what,
                                      status=pair.status.value, reason=reason,
                                      detail=detail or f"epoch {end.row.epoch}"))

    # -- takeover ---------------------------------------------------------------------------
    async def takeover(self, name: str, group: str, force: bool) -> list[Pair]:
        """At the secondary: this system's mirror ends become primary ends."""
        pairs = self.named(name, group)
        sid = self.system.system_id
        for pair in pairs:
            if not pair.remote:
                raise FailedPrecondition(f"pair {pair.name!r} is a local pair; takeover is for remote pairs")
            if pair.role is EndRole.PRIMARY and not (force and CONFLICT in pair.hold_writes):
                raise FailedPrecondition(f"pair {pair.name!r}: system {sid} holds its primary end already "
                                         f"(epoch {pair.row.epoch}); nothing to take over")
            link = self.context.links.get(pair.peer_id)
            if link is None:
                raise FailedPrecondition(
                    f"pair {pair.name!r}: its primary, system {pair.peer_id}, is not configured as a peer of system "
                    f"{sid} (--peer); the new primary needs that link to resync the old one later")
            if not force and (link.up or await self._answers(link)):
                raise FailedPrecondition(
                    f"pair {pair.name!r}: its primary, system {pair.peer_id}, is reachable; use "
                    f"'splitmirror pair swap {pair.name}' for a planned switchover (takeover is for a lost primary)")
            if pair.status is PairStatus.COPY and not force:
                raise FailedPrecondition(
                    f"pair {pair.name!r} is COPY: its volume here is not a consistent image yet (a copy was "
                    "under way); 'pair takeover --force' takes it over anyway")
        check_next_epoch(pairs)
        # An async group's mirror ends first return to the group's last
        # complete cut (the same point of the write order at every pair).
        rolled = await self.roll_back(pairs) if self.roll_back is not None else {}
        self.hold_shown(pairs)  # peers see the new role once it is on disk
        try:
            return await self._take_over(pairs, rolled)
        finally:
            self.release_shown(pairs)

    async def _take_over(self, pairs: list[Pair], rolled: dict[str, RolledBack]) -> list[Pair]:
        # One point of the write order for the whole group: no await from the
        # first role change to the last, so no replicated batch slips between.
        since = utc_now()
        for pair in pairs:
            back = rolled.get(pair.name)
            cut, undone = (back.point, len(back.tracks)) if back is not None else (0, 0)
            runs = [[first, count] for first, count in back.tracks.runs()] if back is not None else []
            if pair.primary is not None:  # both ends claimed the role: this one keeps it, one epoch up
                pair.primary.row.epoch += 1
                pair.primary.row.role = RoleRecord(how="takeover", since=since, seq=pair.applied_seq)
                pair.hold_writes = ""
                if pair.status is PairStatus.COPY:
                    self.context.set_status(pair, PairOp.FAULT, "takeover")
                self.context.set_status(pair, PairOp.TAKEOVER, f"kept over system {pair.peer_id}'s claim")
                if pair.channel is None:
                    self.attach(pair, self.context.links[pair.peer_id])
                continue
            end = pair.mirror
            assert end is not None
            was = end.row.epoch
            end.row.epoch = was + 1
            end.row.role = RoleRecord(how="takeover", since=since, seq=pair.applied_seq, cut=cut, undone=undone,
                                      undone_runs=runs)
            if pair.status is PairStatus.COPY:
                self.context.set_status(pair, PairOp.FAULT, "takeover")
            pair.move_end_to(EndRole.PRIMARY)
            self.context.set_status(pair, PairOp.TAKEOVER, f"taken over from system {pair.peer_id}")
            if pair.channel is None:  # at once: a keepalive during the saves reconciles primary ends
                self.attach(pair, self.context.links[pair.peer_id])
        failpoint("takeover-decided")
        for pair in pairs:
            await self.system.save_rows(pair)
            await self.system.save_bitmaps(pair)
            failpoint("takeover-saved")
            role = pair.row.role
            point = f", group {pair.row.group} cut {role.cut} ({role.undone} tracks rolled back)" if role.cut else ""
            log.warning("pair %s: taken over from system %d at epoch %d (last sequence applied %d%s)", pair.name,
                        pair.peer_id, pair.row.epoch, role.seq, point)
            self.report(pair, "takeover", f"taken over from system {pair.peer_id}",
                        f"epoch {pair.row.epoch}, last sequence applied {role.seq}{point}")
        return pairs

    async def _answers(self, link: PeerLink) -> bool:
        """Ask the primary now (the keepalive may not have run yet, e.g. just after a start)."""
        try:
            await link.stub.Hello(ic.HelloRequest(system_id=link.own_id, role=link.role), metadata=link.metadata,
                                  timeout=max(1.0, self.context.settings.link_timeout))
        except grpc.aio.AioRpcError:
            return False
        return True

    # -- what a peer says about its ends ---------------------------------------------------------
    def hold_shown(self, pairs: list[Pair]) -> None:
        """Peers keep seeing these ends' present role and epoch until :meth:`release_shown`.

        Around a role change this end makes in steps (a swap's demotion or
        promotion, a takeover): the other end learns the new role from the
        step that tells it, or on contact after a crash, never from a
        keepalive that caught the change in memory before it was on disk.
        So each crash point of a swap leaves one outcome, and the tests that
        kill a daemon there replay the same schedule every time."""
        for p in pairs:
            self._shown.setdefault(p.name, (p.row.epoch, p.primary is not None))

    def release_shown(self, pairs: list[Pair]) -> None:
        for p in pairs:
            self._shown.pop(p.name, None)

    def _role_shown(self, p: Pair) -> tuple[int, bool]:
        held = self._shown.get(p.name)
        return held if held is not None else (p.row.epoch, p.primary is not None)

    def roles_for(self, peer: int) -> list[ic.MirrorState]:
        """This system's ends of the pairs it holds with ``peer``: role and epoch (the Hello's)."""
        return [ic.MirrorState(pair=p.name, status=p.status.value, epoch=epoch, primary=primary)
                for p in self.context.pairs_with(peer) for epoch, primary in (self._role_shown(p),)]

    def roles_digest(self, peer: int) -> bytes:
        """A digest of :meth:`roles_for` (every Hello's): equal digests, equal lists."""
        records = [(p.name, p.row.status, *self._role_shown(p)) for p in self.context.pairs_with(peer)]
        known = self._digests.get(peer)
        if known is not None and known[0] == records:
            return known[1]
        digest = hashlib.blake2b(repr(records).encode(), digest_size=16).digest()
        self._digests[peer] = (records, digest)
        return digest

    def fill_hello(self, peer: int, known: bytes, reply: ic.HelloReply) -> None:
        """The roles part of a Hello answer: the full list only when the caller's digest is stale."""
        reply.roles_digest = self.roles_digest(peer)
        if known and known == reply.roles_digest:
            reply.roles_unchanged = True
        else:
            reply.roles.extend(self.roles_for(peer))

    async def first_contact(self, link: PeerLink, timeout: float) -> None:
        """Ask the peer for its ends' roles now (at start, and whenever the link comes back)."""
        try:
            reply = await link.stub.Hello(ic.HelloRequest(system_id=link.own_id, role=link.role),
                                          metadata=link.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("peer %d did not answer the role check (%s); roles stay as they are", link.peer_id,
                     exc.code().name)
            return
        await self.settle(link, list(reply.roles))

    def check(self, link: PeerLink, roles: list[ic.MirrorState]) -> None:
        """Every keepalive answer: settle the roles if an epoch differs (no await before a fence)."""
        mine = {p.name: p for p in self.context.pairs_with(link.peer_id)}
        if any(r.pair in mine and (r.epoch != mine[r.pair].row.epoch or mine[r.pair].row.role.swap
                                   or r.primary == (mine[r.pair].role is EndRole.PRIMARY)) for r in roles):
            for pair in self._fence_now(link, roles):
                pair.hold_writes = f"pair {pair.name!r}: system {pair.peer_id} {FENCING}"
            self.context.spawn(self.settle(link, roles), f"roles-{link.peer_id}")

    def _fence_now(self, link: PeerLink, roles: list[ic.MirrorState]) -> list[Pair]:
        out = []
        for r in roles:
            pair = self.system.pairs.get(r.pair)
            if pair is not None and pair.remote and pair.peer_id == link.peer_id and pair.primary is not None \
                    and decide(pair.row.epoch, True, r.epoch, r.primary) is Decision.FENCE:
                out.append(pair)
        return out

    async def settle(self, link: PeerLink, roles: list[ic.MirrorState]) -> None:
        lock = self._settling.setdefault(link.peer_id, asyncio.Lock())
        async with lock:
            for r in roles:
                try:
                    await self._settle_one(link, r)
                except SplitmirrorError as exc:
                    log.warning("pair %s: roles with system %d not settled: %s", r.pair, link.peer_id, exc.message)

    async def _settle_one(self, link: PeerLink, r: ic.MirrorState) -> None:
        pair = self.system.pairs.get(r.pair)
        if pair is None or not pair.remote or pair.peer_id != link.peer_id:
            return
        primary = pair.role is EndRole.PRIMARY
        decision = decide(pair.row.epoch, primary, r.epoch, r.primary)
        if decision is Decision.FENCE:
            await self.fence(pair, r.epoch)
        elif decision is Decision.PROMOTE and self.promote is not None:
            await self.promote(pair, r.epoch)
        elif decision is Decision.ADOPT:
            (pair.primary or pair.mirror).row.epoch = r.epoch  # type: ignore[union-attr]
            await self.system.save_rows(pair)
        elif decision is Decision.CONFLICT:
            self._conflict(pair, r.epoch)
        elif decision is Decision.NO_PRIMARY and not pair.row.role.swap and not pair.reconciling:
            log.warning("pair %s: neither system %d nor system %d is primary at epoch %d; run "
                        "'splitmirror pair takeover %s --force' at the site that should be", pair.name,
                        self.system.system_id, pair.peer_id, r.epoch, pair.name)
        if pair.mirror is not None and pair.mirror.row.role.swap and r.primary and r.epoch == pair.row.epoch:
            pair.mirror.row.role.swap = ""  # the swap we began is complete: the other end is primary
            await self.system.save_rows(pair)
        if pair.hold_writes.endswith(FENCING) and pair.primary is not None and decision is not Decision.FENCE:
            pair.hold_writes = ""

    def _conflict(self, pair: Pair, epoch: int) -> None:
        if CONFLICT in pair.hold_writes:
            return  # said once; every keepalive sees it again
        pair.hold_writes = (
            f"pair {pair.name!r}: systems {self.system.system_id} and {pair.peer_id} {CONFLICT} "
            f"at epoch {epoch}; host writes are refused at both until an operator runs "
            f"'splitmirror pair takeover {pair.name} --force' at the site whose data is to be kept")
        log.error("%s", pair.hold_writes)
        self.report(pair, "conflict", "both ends primary at one epoch")

    async def fence(self, pair: Pair, epoch: int) -> None:
        """This end lost the primary role: refuse host writes, keep the divergent tracks pending."""
        end = pair.primary
        if end is None:
            return
        new = pair.peer_id
        pair.hold_writes = f"pair {pair.name!r}: system {new} {FENCING}"
        # Writes the stream holds unacknowledged become pending bits here:
        # they are this end's divergent tracks, saved before any resync.
        if pair.channel is not None:
            channel, pair.channel = pair.channel, None
            await channel.close()
        if pair.copy_task is not None:
            pair.copy_task.cancel()
        end = pair.primary
        if end is None:
            return
        failpoint("fence-closed")
        end.row.epoch = epoch
        end.row.role = RoleRecord(how="fenced", since=utc_now(), fenced_by=new)
        pair.move_end_to(EndRole.MIRROR)
        self.context.set_status(pair, PairOp.FENCE, f"system {new} took over (epoch {epoch})")
        pair.hold_writes = ""
        await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)
        log.warning("pair %s: system %d took the primary role over at epoch %d; volume %s fenced, %d divergent "
                    "tracks kept until a resync from system %d", pair.name, new, epoch, end.volume.name,
                    len(end.bitmap), new)
        self.report(pair, "fenced", f"system {new} took over",
                    f"epoch {epoch}, {len(end.bitmap)} divergent tracks kept; resync from system {new}")
