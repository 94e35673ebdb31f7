"""Write-intent extents: which parts of a volume may differ after a crash.

Before the first mirrored write into a coarse extent (4 MiB by default) the
extent is recorded durably in the copy table; it is cleared lazily once no
write into it has been in flight for a while.  After an unclean stop the
recorded extents are exactly the places where a mirror may have missed a
write, so recovery re-copies those tracks instead of the whole volume (the
same idea as DRBD's activity log).

Extents are recorded per *scope*: a volume's own writes (from hosts, or
copies into it) use the volume's name; the writes a remote mirror end
applies for its primary use :func:`~splitmirror.storage.scopes.replicated_scope`.
They mean different things after a crash: a mirror end's hot host extents
may hold writes its primary never saw, while its replicated writes were
either acknowledged (the primary knows them) or not (the primary marked
them pending).  This module owns that policy; the copy table only persists
the extents.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from .copytable import CopyTable
from .scopes import intent_scopes

log = logging.getLogger("splitmirror.intent")

DEFAULT_EXTENT = 4 << 20


@dataclasses.dataclass(slots=True)
class _Extent:
    recorded: asyncio.Future[None]  # done once the extent is durable
    inflight: int = 0
    last_use: float = dataclasses.field(default_factory=time.monotonic)


class IntentLog:
    def __init__(self, table: CopyTable, extent_size: int = DEFAULT_EXTENT, idle_seconds: float = 2.0,
                 before_clear: Callable[[], Awaitable[None]] | None = None) -> None:
        self.table = table
        #: Runs before extents are forgotten: what they protect must be durable.
        self.before_clear = before_clear
        self.extent_size = extent_size
        self.idle_seconds = idle_seconds
        # volume -> extent -> its state while hot
        self._hot: dict[str, dict[int, _Extent]] = {}
        self._task: asyncio.Task[None] | None = None

    def extents(self, offset: int, length: int) -> range:
        return range(offset // self.extent_size, (offset + length - 1) // self.extent_size + 1)

    def tracks_of(self, extent: int, track_size: int, tracks: int) -> tuple[int, int]:
        per = self.extent_size // track_size
        first = extent * per
        return first, min(tracks, first + per)

    @contextlib.asynccontextmanager
    async def covering(self, volume: str, offset: int, length: int) -> AsyncIterator[None]:
        """Hold the extents of a write durable while it is in flight."""
        hot = self._hot.setdefault(volume, {})
        wanted = self.extents(offset, length)
        new = [e for e in wanted if e not in hot]
        recorded: asyncio.Future[None] | None = None
        if new:
            recorded = asyncio.get_running_loop().create_future()
            for e in new:
                hot[e] = _Extent(recorded)
        slots = [hot[e] for e in wanted]
        for slot in slots:
            slot.inflight += 1
        try:
            if recorded is not None:
                try:
                    await self.table.add_intent(volume, new)
                except BaseException as exc:
                    for e in new:  # not durable: the next write must try again
                        if hot.get(e) is not None and hot[e].recorded is recorded:
                            del hot[e]
                    recorded.set_exception(exc)
                    recorded.exception()
                    raise
                recorded.set_result(None)
            for slot in slots:  # extents another write is still recording
                if not slot.recorded.done():
                    await asyncio.shield(slot.recorded)
                elif slot.recorded.exception() is not None:
                    raise slot.recorded.exception()  # type: ignore[misc]
            yield
        finally:
            now = time.monotonic()
            for slot in slots:
                slot.inflight -= 1
                slot.last_use = now

    def pin(self, volume: str, offset: int, length: int) -> Callable[[], None]:
        """Keep the (already recorded) extents of a write hot until released.

        Used for async mirrors: the write is acknowledged before the mirror
        applied it, and its extents must stay recorded until then.
        """
        hot = self._hot.setdefault(volume, {})
        slots = [hot[e] for e in self.extents(offset, length)]
        for slot in slots:
            slot.inflight += 1

        def release() -> None:
            now = time.monotonic()
            for slot in slots:
                slot.inflight -= 1
                slot.last_use = now

        return release

    def start(self) -> None:
        self._task = asyncio.create_task(self._cool(), name="intent-cooler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def clear_idle(self, idle_seconds: float | None = None) -> int:
        """Forget extents idle for ``idle_seconds``; returns how many."""
        limit = self.idle_seconds if idle_seconds is None else idle_seconds
        now = time.monotonic()
        if self.before_clear is not None and any(
                s.inflight == 0 and now - s.last_use >= limit and s.recorded.done()
                for hot in self._hot.values() for s in hot.values()):
            await self.before_clear()
        rows = []
        for volume, hot in list(self._hot.items()):
            cold = [e for e, s in hot.items()
                    if s.inflight == 0 and now - s.last_use >= limit and s.recorded.done()]
            for e in cold:
                del hot[e]
                rows.append((volume, e))
        if rows:
            await self.table.remove_intents(rows)  # every volume's in one commit
        return len(rows)

    async def _cool(self) -> None:
        while True:
            await asyncio.sleep(self.idle_seconds / 2)
            try:
                await self.clear_idle()
            except Exception:
                log.exception("clearing idle write-intent extents failed")

    def forget_volume(self, volume: str) -> None:
        for scope in intent_scopes(volume):
            self._hot.pop(scope, None)
