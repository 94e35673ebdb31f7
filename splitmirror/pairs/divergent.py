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
from ..eventsink import ROLE, Event
from ..pairstate.pair import Pair

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
