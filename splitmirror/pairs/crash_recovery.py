"""Recovery at start after an unclean stop: hot write-intent extents become pending."""

from __future__ import annotations

import asyncio
import logging

from ..status import MIRRORING, TRACKING, PairOp
from ..storage.scopes import parse_scope
from .context import PairContext

log = logging.getLogger("splitmirror.pairs")


async def recover_write_intent(context: PairContext) -> None:
    """After an unclean stop: mark the tracks of hot write-intent extents pending.

    A copy source may have missed its mirror in any hot extent.  A remote
    mirror end that was tracking may have taken host writes whose bits
    were not saved, but only in extents its own (not replicated) writes
    made hot: a replicated write was either acknowledged, so the primary
    knows it, or not, so the primary marked it pending.  Marking those
    would fake host writes on the SPVOL, i.e. a split brain.
    """
    system = context.system
    hot = await system.table.load_intent()
    marked: list[tuple[str, str, list[tuple[int, int]]]] = []  # (pair, volume, runs): saved together
    suspended = []
    for scope, extents in hot.items():
        volume, replicated = parse_scope(scope)
        vol = system.volumes.get(volume)
        if vol is None:
            continue
        runs = [(first, stop - first) for e in sorted(extents)
                for first, stop in [system.intent.tracks_of(e, vol.track_size, vol.tracks)]]
        for pair in system.pairs_of(vol):
            ends = [e for e in pair.ends if e.volume is vol and
                    (e is pair.primary or (pair.remote and not replicated and pair.status in TRACKING))]
            for end in ends:
                for first, count in runs:
                    end.bitmap.add_range(first, first + count)
                marked.append((pair.name, vol.name, runs))
            if pair.primary is not None and pair.primary.volume is vol and pair.status in MIRRORING:
                context.set_status(pair, PairOp.FAULT, "crash-recovery")
                suspended.append(pair)
            if ends:
                log.warning("pair %s: unclean stop, %d write-intent extents (%d tracks) of %s marked pending",
                            pair.name, len(extents), sum(c for _, c in runs), vol.name)
    # A thousand pairs: one commit of their bits and one of their rows, not a thousand each.
    await asyncio.gather(*(system.table.add_runs(name, volume, runs) for name, volume, runs in marked))
    if suspended:
        await system.save_rows_of(suspended)
    await system.table.remove_intent_all()
