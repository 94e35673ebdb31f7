"""A volume entering or leaving a pair, at either end.

The checks on a volume that is to become a mirror end, the tracks an
initial copy needs, and forgetting a deleted pair: its channel, its rows in
the copy table and its place in the storage system.
"""

from __future__ import annotations

import logging

from ..datapath.system import StorageSystem
from ..errors import FailedPrecondition
from ..eventsink import STATUS, Event, current_cause
from ..pairstate.pair import Pair
from ..status import PairOp, PairStatus
from ..storage.bitmap import TrackBitmap
from ..storage.volume import Volume

log = logging.getLogger("splitmirror.pairs")


def check_new_mirror(system: StorageSystem, svol: Volume, size: int, track_size: int) -> None:
    if svol.size != size or svol.track_size != track_size:
        raise FailedPrecondition(
            f"volume {svol.name!r} exists on system {system.system_id} with size {svol.size} and "
            f"track size {svol.track_size}; the pair needs size {size} and track size {track_size}")
    users = system.pairs_of(svol)
    if users:
        raise FailedPrecondition(
            f"volume {svol.name!r} is already in pair {users[0].name!r} on system {system.system_id}")


def initial_bitmap(vol: Volume) -> TrackBitmap:
    """Tracks holding data: only these need the initial copy."""
    bitmap = TrackBitmap(vol.tracks)
    ts = vol.track_size
    for offset, length in vol.allocated_ranges():
        bitmap.add_range(offset // ts, (offset + length + ts - 1) // ts)
    return bitmap


async def forget(system: StorageSystem, pair: Pair) -> None:
    old = pair.status
    if pair.channel is not None:
        channel, pair.channel = pair.channel, None
        await channel.close()
    for end in pair.ends:
        end.row.status = PairStatus.SIMPLEX
        await system.table.remove_pair(end.row.name, end.row.volume)
    system.pairs.pop(pair.name, None)
    log.info("pair %s deleted", pair.name)
    held = pair.primary or pair.mirror
    system.events.emit(Event(STATUS, pair=pair.name, volume=held.volume.name if held else "",
                             peer=pair.peer_id if pair.remote else 0, op=PairOp.DELETE.value, old_status=old.value,
                             status=PairStatus.SIMPLEX.value, reason=current_cause() or "operator"))
