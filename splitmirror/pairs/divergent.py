"""Keeping an old primary's divergent tracks before a resync overwrites them.

After a takeover the old primary may hold writes the new primary never saw
(taken while cut off, or acknowledged in async mode and never shipped):
its pending bitmap.  Before the new primary's resync copies over them,
they are saved into a sparse volume of this system, ``VOLUME-divergent-TIME``
(listed by ``volume list``, readable over gRPC and NBD), so nothing written
on the losing side is thrown away silently.
"""

from __future__ import annotations

import logging
import time

from ..datapath.system import StorageSystem
from ..datapath.writes import WriteOp
from ..errors import InvalidArgument
from ..eventsink import ROLE, Event
from ..pairstate.pair import Pair
from ..storage.bitmap import TrackBitmap

log = logging.getLogger("splitmirror.pairs")

SAVE_CHUNK_TRACKS = 128  # tracks read and written per step


def divergent_name(volume: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{volume[:40]}-divergent-{stamp}"


async def save_divergent(system: StorageSystem, pair: Pair) -> str:
    """Copy the pending tracks of this (mirror) end into a new sparse volume; its name."""
    end = pair.mirror
    assert end is not None
    vol = end.volume
    name = divergent_name(vol.name)
    suffix = 1
    while name in system.volumes:
        suffix += 1
        name = f"{divergent_name(vol.name)}.{suffix}"
    saved = await system.create_volume(name, vol.size, vol.track_size)
    ts = vol.track_size
    tracks = 0
    for first, count in end.bitmap.runs(SAVE_CHUNK_TRACKS):
        data = await vol.read(first * ts, count * ts)
        await system.write_ops(saved, [WriteOp(first * ts, data)])
        tracks += count
    await saved.flush()
    end.row.role.divergent = name
    await system.save_rows(pair)
    log.warning("pair %s: %d divergent tracks of %s saved into volume %s before the resync overwrites them",
                pair.name, tracks, vol.name, name)
    system.events.emit(Event(ROLE, pair=pair.name, volume=vol.name, peer=pair.peer_id, op="divergent-saved",
                             status=pair.status.value, reason=f"kept before the resync from system {pair.peer_id}",
                             detail=name, tracks=tracks, bytes=tracks * ts))
    return name


def rolled_back_tracks(pair: Pair, peer: int, tracks: bytes) -> TrackBitmap:
    """The tracks a new primary rolled back at its takeover, as it sent them (checked: hostile input)."""
    assert pair.mirror is not None
    size = pair.mirror.volume.tracks
    try:
        kept = TrackBitmap.from_bytes(size, tracks)
    except ValueError as exc:
        raise InvalidArgument(f"pair {pair.name!r}: the rolled-back tracks from system {peer} do not parse "
                              f"({exc})") from None
    if sum(count for _, count in kept.runs()) != len(kept):  # runs() stops at the last track
        raise InvalidArgument(f"pair {pair.name!r}: the rolled-back tracks from system {peer} go beyond volume "
                              f"{pair.mirror.volume.name!r} ({size} tracks)")
    return kept
