"""The copy task of a pair: initial copy or resync, saved as it goes.

One task per pair runs the copy engine (:mod:`splitmirror.datapath.copyengine`)
in the pair's direction while a checkpoint task saves the shrinking pending
bitmap.  A copy that completes tells the mirror end and takes the pair from
COPY to DUPLEX; one that fails suspends the pair with its tracks still
pending, so the next resync goes on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from ..datapath.copyengine import WINDOW_BYTES, CopyFailed, MirrorDigests, Run, copy_forward, copy_reverse, read_tracks
from ..errors import InvalidArgument, SplitmirrorError
from ..eventsink import RESYNC_FINISH, RESYNC_PROGRESS, RESYNC_START, Event
from ..pairstate.pair import Pair
from ..status import PairOp, PairStatus
from ..storage.bitmap import TrackBitmap
from ..v1 import interconnect_pb2 as ic
from .context import PairContext
from .peer import command

log = logging.getLogger("splitmirror.pairs")

#: Copy bytes in flight over one link, shared by its copies (each gets at least MIN_WINDOW_BYTES).
LINK_WINDOW_BYTES = 64 << 20
MIN_WINDOW_BYTES = 1 << 20
CHECKPOINT_SECONDS = 1.0  # how often a running copy saves its pending bitmap
PROGRESS_EVENT_SECONDS = 10.0  # how often a running copy reports its progress as an event


class CopySlots:
    """At most ``per_link`` copies at once over one link (local pairs: link 0)
    and ``total`` in all; the others wait their turn, first come first served,
    so every link gets its share and a mass recovery does not run a thousand
    copies at once."""

    def __init__(self, per_link: int, total: int) -> None:
        self.per_link = max(1, per_link)
        self._total = asyncio.Semaphore(max(1, total))
        self._links: dict[int, asyncio.Semaphore] = {}
        self.running = 0
        self.waiting = 0
        self._running: dict[int, int] = {}

    def window(self, link: int) -> int:
        """Bytes in flight one copy of ``link`` may have: the link's share, split between its copies."""
        share = LINK_WINDOW_BYTES // max(1, self._running.get(link, 1))
        return max(MIN_WINDOW_BYTES, min(WINDOW_BYTES, share))

    @contextlib.asynccontextmanager
    async def held(self, link: int) -> AsyncIterator[None]:
        gate = self._links.setdefault(link, asyncio.Semaphore(self.per_link))
        self.waiting += 1
        try:
            await gate.acquire()
            try:
                await self._total.acquire()
            except BaseException:
                gate.release()
                raise
        finally:
            self.waiting -= 1
        self.running += 1
        self._running[link] = self._running.get(link, 0) + 1
        try:
            yield
        finally:
            self.running -= 1
            self._running[link] -= 1
            self._total.release()
            gate.release()


class Copier:
    def __init__(self, context: PairContext) -> None:
        self.context = context
        self.system = context.system
        settings = context.settings
        self.slots = CopySlots(settings.copies_per_link, settings.copies_at_once)

    def start(self, pair: Pair) -> None:
        if pair.copy_task is not None and not pair.copy_task.done():
            return
        pair.copy_task = asyncio.create_task(self._copy_in_turn(pair), name=f"copy-{pair.name}")

    async def _copy_in_turn(self, pair: Pair) -> None:
        link = pair.peer_id if pair.remote else 0
        while pair.status is PairStatus.COPY and pair.primary is not None:
            began = pair.status_changes
            # The slot is held while tracks move, not while the mirror end is
            # told the copy is done: the next copy moves its tracks meanwhile,
            # and the resync-done commands of many copies travel together.
            async with self.slots.held(link):
                copied = await self._move(pair, self.slots.window(link))
            if copied:
                await self._done(pair)
            if pair.status is not PairStatus.COPY or pair.status_changes == began:
                break
            # The pair left COPY and a resync brought it back while this
            # copy ran (which then stopped): copy again, from the bitmap.

    async def _move(self, pair: Pair, window: int = 0) -> bool:
        """Copy the pair's pending tracks; True when every one was copied and the pair is still in COPY.

        Reports resync-start and resync-finish ("done": every track copied;
        the status event that follows says whether the pair became DUPLEX).
        """
        assert pair.primary is not None
        reverse = pair.row.direction == "reverse"
        end = pair.primary
        tracks = len(end.bitmap) + (len(pair.mirror.bitmap) if pair.mirror is not None and not pair.remote else 0)
        direction = pair.row.direction
        self._report(pair, RESYNC_START, direction, tracks=tracks, bytes=tracks * end.volume.track_size)
        outcome = "stopped"  # cancelled: the daemon stops or the pair is deleted
        checkpoints = asyncio.create_task(self._checkpoint_copy(pair), name=f"checkpoint-{pair.name}")
        try:
            if reverse:
                await copy_reverse(self.system, pair, lambda tracks: self._track_source(pair, tracks))
            else:
                await copy_forward(self.system, pair, self._mirror_digests(pair), window)
            outcome = "done" if pair.status is PairStatus.COPY else "interrupted"
        except CopyFailed as exc:
            outcome = "interrupted"
            log.warning("%s; %d tracks still pending", exc, len(pair.primary.bitmap))
            await self.system.save_bitmaps(pair)
        except (grpc.aio.AioRpcError, SplitmirrorError) as exc:
            outcome = "interrupted"
            await self._interrupted(pair, exc)
        except asyncio.CancelledError:
            await asyncio.shield(self.system.save_bitmaps(pair))
            raise
        except Exception:
            outcome = "failed"
            await self._failed(pair)
        finally:
            checkpoints.cancel()
            self._finished(pair, direction, outcome)
            if outcome != "done":
                pair.progress = None if pair.status is not PairStatus.COPY else pair.progress
        return outcome == "done"

    async def _done(self, pair: Pair) -> None:
        """Every track copied: the mirror end (told over the interconnect), then the pair, leave COPY for DUPLEX."""
        try:
            if pair.remote:
                await command(pair, ic.PAIR_OP_RESYNC_DONE)
            self.context.set_status(pair, PairOp.COPY_DONE)
            for end in pair.ends:
                end.row.direction = "forward"
            await self.system.save_rows(pair)
            await self.system.save_bitmaps(pair)
        except (grpc.aio.AioRpcError, SplitmirrorError) as exc:
            await self._interrupted(pair, exc)
        except asyncio.CancelledError:
            await asyncio.shield(self.system.save_bitmaps(pair))
            raise
        except Exception:
            await self._failed(pair)
        finally:
            pair.progress = None if pair.status is not PairStatus.COPY else pair.progress

    async def _interrupted(self, pair: Pair, exc: grpc.aio.AioRpcError | SplitmirrorError) -> None:
        reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc.message
        log.warning("pair %s: copy interrupted: %s", pair.name, reason)
        if pair.status is PairStatus.COPY:
            self.context.set_status(pair, PairOp.FAULT, "copy-interrupted")
            await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)

    async def _failed(self, pair: Pair) -> None:
        log.exception("pair %s: copy failed", pair.name)
        if pair.status is PairStatus.COPY:
            self.context.set_status(pair, PairOp.FAULT, "copy-error")
            await self.system.save_rows(pair)
        await self.system.save_bitmaps(pair)

    def _finished(self, pair: Pair, direction: str, outcome: str) -> None:
        progress = pair.progress
        self._report(pair, RESYNC_FINISH, direction, reason=outcome, tracks=progress.done_tracks if progress else 0,
                     bytes=progress.bytes_moved if progress else 0, progress=progress.percent if progress else 0.0)

    def _report(self, pair: Pair, kind: str, direction: str, *, reason: str = "", tracks: int = 0, bytes: int = 0,
                progress: float = 0.0) -> None:
        self.system.events.emit(Event(kind, pair=pair.name, volume=pair.primary.volume.name if pair.primary else "",
                                      peer=pair.peer_id if pair.remote else 0, op=direction, reason=reason,
                                      tracks=tracks, bytes=bytes, progress=progress))

    async def _checkpoint_copy(self, pair: Pair) -> None:
        """Save the shrinking bitmap while a copy runs, so that a copy cut
        short by kill -9 resumes near where it stopped, not from its start.
        Bits are cleared only for acknowledged tracks, so what is saved
        always covers what is still to copy."""
        saved = -1
        reported = time.monotonic()
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            progress = pair.progress
            if progress is not None and progress.done_tracks != saved:
                saved = progress.done_tracks
                await self.system.save_bitmaps(pair)
                if time.monotonic() - reported >= PROGRESS_EVENT_SECONDS:
                    reported = time.monotonic()
                    self._report(pair, RESYNC_PROGRESS, pair.row.direction, tracks=progress.done_tracks,
                                 bytes=progress.bytes_moved, progress=progress.percent)

    @staticmethod
    def _mirror_digests(pair: Pair) -> MirrorDigests:
        """The mirror end's digests of some tracks: what a resync compares before it sends."""
        if not pair.remote:
            assert pair.mirror is not None
            svol = pair.mirror.volume

            async def local(runs: list[Run]) -> bytes:
                return await svol.run(lambda: b"".join(svol.track_digests(f, c) for f, c in runs))

            return local
        assert pair.link is not None and pair.primary is not None
        link = pair.link
        tracks = pair.primary.volume.tracks

        async def remote(runs: list[Run]) -> bytes:
            wanted = TrackBitmap(tracks)
            for first, count in runs:
                wanted.add_range(first, first + count)
            reply = await link.stub.TrackDigests(ic.TrackDigestsRequest(pair=pair.name, tracks=wanted.to_bytes()),
                                                 metadata=link.metadata, timeout=link.timeout)
            return bytes(reply.digests)

        return remote

    def _track_source(self, pair: Pair, tracks: bytes) -> AsyncIterator[tuple[int, int, bytes]]:
        if not pair.remote:
            return read_tracks(self.system, pair, tracks)
        assert pair.link is not None
        link = pair.link

        assert pair.primary is not None
        vol = pair.primary.volume

        async def remote() -> AsyncIterator[tuple[int, int, bytes]]:
            # Every run the peer returns must be tracks we asked for and
            # have not received yet, of the right length, inside the volume.
            asked = TrackBitmap.from_bytes(vol.tracks, tracks)
            async for td in link.read_tracks(pair.name, tracks):
                why = returned_run_error(asked, td.track, td.count, len(td.data), vol.track_size)
                if why:
                    raise InvalidArgument(f"pair {pair.name!r}: system {pair.peer_id} returned {why} "
                                          f"to the reverse copy; the copy stops")
                asked.remove_range(td.track, td.track + td.count)
                yield td.track, td.count, td.data

        return remote()


def returned_run_error(asked: TrackBitmap, first: int, count: int, data_bytes: int, track_size: int) -> str:
    """Why a run of tracks returned to a reverse copy is not acceptable ('' if it is)."""
    if count <= 0:
        return f"an empty run at track {first}"
    if first + count > asked.tracks:
        return f"tracks {first}-{first + count - 1}, beyond the volume's {asked.tracks} tracks"
    if asked.count_range(first, first + count) != count:
        return f"tracks {first}-{first + count - 1}, not all asked for (or sent twice)"
    if data_bytes not in (0, count * track_size):
        return f"{data_bytes} bytes for {count} tracks of {track_size} bytes"
    return ""
