"""Runtime objects of a pair: its ends, the role this system plays, copy progress."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Callable
from typing import ClassVar

from ..errors import FailedPrecondition
from ..replication.link import Counters, PeerLink
from ..status import PairStatus
from ..storage.bitmap import TrackBitmap
from ..storage.copytable import PairRow
from ..storage.volume import Volume
from .channel import MirrorChannel

#: How a pair's writes cross to its mirror end.
MODES = ("sync", "async")


class EndRole(enum.Enum):
    """The role of a pair end: the end copied from, or the end copied into.

    This system holds one end of a remote pair, and its role says which
    commands the system answers for the pair; it holds both ends of a local
    pair, which is driven from its primary end.
    """

    PRIMARY = "primary"
    MIRROR = "mirror"


@dataclasses.dataclass
class PairEnd:
    row: PairRow
    volume: Volume
    bitmap: TrackBitmap


@dataclasses.dataclass
class CopyProgress:
    """Progress of an initial copy or resync (done %, rate, ETA)."""

    direction: str
    total_tracks: int
    track_size: int
    done_tracks: int = 0
    bytes_moved: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def percent(self) -> float:
        return 100.0 if not self.total_tracks else 100.0 * self.done_tracks / self.total_tracks

    @property
    def rate(self) -> float:
        """Tracks' bytes per second (what the volume gained, holes included)."""
        elapsed = time.monotonic() - self.started
        return self.done_tracks * self.track_size / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        rate = self.rate
        remaining = (self.total_tracks - self.done_tracks) * self.track_size
        return remaining / rate if rate > 0 else 0.0


@dataclasses.dataclass
class RetryBackoff:
    """When a failed automatic resync may be tried again: after the link
    timeout, then twice as long each time, at most :attr:`MAX_DELAY`."""

    MAX_DELAY: ClassVar[float] = 30.0
    delay: float = 0.0
    not_before: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.not_before

    def failed(self, now: float, first_delay: float) -> None:
        self.delay = min(self.MAX_DELAY, self.delay * 2 if self.delay else first_delay)
        self.not_before = now + self.delay

    def reset(self) -> None:
        self.delay = self.not_before = 0.0


class Pair:
    """One pair as held by this storage system: one or both of its ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: Told when the ends change (the storage system's pair index).
        self.on_ends_changed: Callable[[Pair], None] | None = None
        self._primary: PairEnd | None = None
        self._mirror: PairEnd | None = None
        self.link: PeerLink | None = None    # remote pairs: the peer
        self.channel: MirrorChannel | None = None  # primary end: towards the mirror end
        self.progress: CopyProgress | None = None
        #: A verify running (its tracks compared so far), shown like a copy's progress.
        self.verify_progress: CopyProgress | None = None
        self.counters = Counters()
        self.copy_task: asyncio.Task[None] | None = None
        self.apply_lock = asyncio.Lock()     # mirror end: one Replicate stream at a time
        self.backup_running = False
        self.reconciling = False
        self.retry = RetryBackoff()           # primary end: automatic resync attempts
        #: Times the status changed: a copy checks it still runs in the COPY it began in.
        self.status_changes = 0
        #: Primary end: why host writes wait for a role decision (its first
        #: contact after a start, a swap draining), empty when they need not.
        self.hold_writes = ""

    @property
    def primary(self) -> PairEnd | None:
        """The end this system copies from."""
        return self._primary

    @primary.setter
    def primary(self, end: PairEnd | None) -> None:
        self._primary = end
        if self.on_ends_changed is not None:
            self.on_ends_changed(self)

    @property
    def mirror(self) -> PairEnd | None:
        """The end this system copies into."""
        return self._mirror

    @mirror.setter
    def mirror(self, end: PairEnd | None) -> None:
        self._mirror = end
        if self.on_ends_changed is not None:
            self.on_ends_changed(self)

    @property
    def ends(self) -> list[PairEnd]:
        return [e for e in (self.primary, self.mirror) if e is not None]

    @property
    def row(self) -> PairRow:
        # Read on every lookup of a pair's status, peer or epoch (keepalives
        # walk every pair): no list built per read.
        end = self._primary if self._primary is not None else self._mirror
        if end is None:
            raise IndexError(f"pair {self.name!r} holds no end")
        return end.row

    @property
    def applied_seq(self) -> int:
        """Mirror end: the last sequence of the write stream applied here (kept in its row)."""
        return self.row.applied_seq

    @applied_seq.setter
    def applied_seq(self, seq: int) -> None:
        self.row.applied_seq = seq

    @property
    def status(self) -> PairStatus:
        return self.row.status

    @property
    def remote(self) -> bool:
        return self.row.copy_type == "REMOTE"

    @property
    def peer_id(self) -> int:
        return self.row.pair_system_id

    @property
    def role(self) -> EndRole:
        """The role this system plays for the pair: PRIMARY while it holds the
        primary end (a local pair: both ends), MIRROR while it holds only the
        mirror end.  It picks the module that answers the pair's commands."""
        return EndRole.PRIMARY if self.primary is not None else EndRole.MIRROR

    def move_end_to(self, role: EndRole) -> None:
        """Hold this system's end of a remote pair in ``role`` from now on.

        The end keeps its row, volume and bitmap; only which end it is
        changes (``row.primary`` too), in memory: the caller persists the
        row.  The seam of a takeover or swap, which reverse the roles of a
        pair's two ends.  A local pair holds both ends and has no other role.
        """
        if self.primary is not None and self.mirror is not None:
            raise FailedPrecondition(f"pair {self.name!r} is a local pair: this system holds both of its ends")
        end = self.primary or self.mirror
        if end is None:
            raise FailedPrecondition(f"pair {self.name!r} has no end on this system")
        end.row.primary = role is EndRole.PRIMARY
        if role is EndRole.PRIMARY:
            self.primary, self.mirror = end, None
        else:
            self.primary, self.mirror = None, end

    def queued_bytes(self) -> int:
        """Payload bytes queued to the mirror and not yet acknowledged."""
        return self.channel.queued_bytes() if self.channel is not None else 0

    def lag_seconds(self) -> float:
        return self.channel.lag_seconds() if self.channel is not None else 0.0


def spvol_refusal(vol: Volume, pair: Pair) -> str | None:
    """Why hosts may not write ``vol``, the mirror end of remote ``pair``, or None.

    An SPVOL is host-writable only while an operator's split holds its pair
    SPLIT (or after a takeover, which makes it a primary end): never merely
    because the link dropped.  An old primary that learnt it lost the role
    is fenced: the message names the new primary.
    """
    end = pair.mirror
    if end is None:
        return None
    role = end.row.role
    if pair.status in (PairStatus.SPLIT, PairStatus.SIMPLEX) and not role.fenced_by:
        return None
    if role.fenced_by:
        return (f"volume {vol.name!r} is fenced: system {role.fenced_by} took over pair {pair.name!r} and is its "
                f"primary (epoch {end.row.epoch}); reads are allowed; 'splitmirror pair resync {pair.name}' at "
                f"system {role.fenced_by} mirrors it back (divergent tracks are saved first)")
    if role.swap:
        return (f"volume {vol.name!r}: pair {pair.name!r} is being swapped to system {pair.peer_id}, which becomes "
                "its primary when it answers; write there")
    if pair.status is PairStatus.SUSPENDED:
        return (f"volume {vol.name!r} is the SPVOL of pair {pair.name!r} (SUSPENDED: {end.row.reason or 'fault'}); "
                f"hosts may write it only after 'splitmirror pair takeover {pair.name}' here (the primary, system "
                f"{pair.peer_id}, is lost) or a split issued at the primary")
    return (f"volume {vol.name!r} is the SPVOL of pair {pair.name!r} ({pair.status.value}); hosts may write it "
            "only after a split issued at the primary or a takeover here")
