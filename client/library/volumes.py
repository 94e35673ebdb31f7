"""Volume and host I/O calls: create, list, show and delete volumes; write, read, flush, checksum."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from splitmirror.v1 import host_pb2

from .connection import MAX_IO, Connection
from .errors import ClientError

__all__ = ["DEFAULT_CHUNK", "VolumeCalls"]

#: Default payload of one Write/Read RPC.
DEFAULT_CHUNK = 1 << 20

_T = TypeVar("_T")


class VolumeCalls(Connection):
    """Volumes and host I/O."""

    async def create_volume(self, name: str, size: int, track_size: int = 0) -> host_pb2.Volume:
        """Create a sparse volume of ``size`` bytes (``track_size`` 0: server default)."""
        req = host_pb2.CreateVolumeRequest(name=name, size=size, track_size=track_size)
        return await self._call(lambda s: s.CreateVolume, req)

    async def list_volumes(self) -> list[host_pb2.Volume]:
        reply = await self._call(lambda s: s.ListVolumes, host_pb2.ListVolumesRequest())
        return list(reply.volumes)

    async def get_volume(self, name: str) -> host_pb2.Volume:
        return await self._call(lambda s: s.GetVolume, host_pb2.VolumeRef(name=name))

    async def delete_volume(self, name: str) -> None:
        await self._call(lambda s: s.DeleteVolume, host_pb2.VolumeRef(name=name))

    # ------------------------------------------------------------------ host I/O

    async def write(
        self,
        volume: str,
        offset: int,
        data: bytes | bytearray | memoryview,
        fua: bool = False,
        chunk: int = DEFAULT_CHUNK,
        depth: int = 4,
    ) -> int:
        """Write ``data`` at ``offset``, split into ``chunk``-byte RPCs with up
        to ``depth`` in flight. Returns the number of bytes written."""
        _check_chunking(chunk, depth)
        view = memoryview(data).cast("B")
        if len(view) == 0:
            # Let the server judge a zero-length write (it refuses it).
            reply = await self._call(
                lambda s: s.Write, host_pb2.WriteRequest(volume=volume, offset=offset, data=b"", fua=fua)
            )
            return reply.written

        async def one(start: int) -> int:
            piece = bytes(view[start:start + chunk])
            req = host_pb2.WriteRequest(volume=volume, offset=offset + start, data=piece, fua=fua)
            reply = await self._call(lambda s: s.Write, req)
            return reply.written

        results = await _bounded([one(start) for start in range(0, len(view), chunk)], depth)
        return sum(results)

    async def read(
        self, volume: str, offset: int, length: int, chunk: int = DEFAULT_CHUNK, depth: int = 4
    ) -> bytes:
        """Read ``length`` bytes at ``offset`` in ``chunk``-byte RPCs (up to
        ``depth`` in flight)."""
        _check_chunking(chunk, depth)
        if length <= 0:
            reply = await self._call(
                lambda s: s.Read, host_pb2.ReadRequest(volume=volume, offset=offset, length=length)
            )
            return reply.data

        async def one(start: int) -> bytes:
            n = min(chunk, length - start)
            req = host_pb2.ReadRequest(volume=volume, offset=offset + start, length=n)
            reply = await self._call(lambda s: s.Read, req)
            if len(reply.data) != n:
                raise ClientError(
                    "DATA_LOSS",
                    f"short read from volume {volume!r} at offset {offset + start}: "
                    f"{len(reply.data)} of {n} bytes",
                )
            return reply.data

        parts = await _bounded([one(start) for start in range(0, length, chunk)], depth)
        return b"".join(parts)

    async def flush(self, volume: str) -> None:
        """Make every acknowledged write durable (on both sides of a sync pair)."""
        await self._call(lambda s: s.Flush, host_pb2.VolumeRef(name=volume))

    async def checksum_reply(self, volume: str, offset: int = 0, length: int = 0) -> host_pb2.ChecksumReply:
        """Algorithm and digest of a byte range (``length`` 0: to the end)."""
        req = host_pb2.ChecksumRequest(volume=volume, offset=offset, length=length)
        return await self._call(lambda s: s.Checksum, req)

    async def checksum(self, volume: str, offset: int = 0, length: int = 0) -> str:
        """Digest (hex string) of a byte range (``length`` 0: to the end)."""
        return (await self.checksum_reply(volume, offset, length)).digest


def _check_chunking(chunk: int, depth: int) -> None:
    if chunk <= 0 or chunk > MAX_IO:
        raise ValueError(f"chunk must be between 1 byte and {MAX_IO >> 20} MiB (the host API's limit per request)")
    if depth <= 0:
        raise ValueError("depth must be at least 1")


async def _bounded(jobs: list[Awaitable[_T]], depth: int) -> list[_T]:
    """Run ``jobs`` with at most ``depth`` in flight; results in job order.
    On the first failure the jobs still running are cancelled and it is raised."""
    results: dict[int, _T] = {}
    running: dict[asyncio.Future[_T], int] = {}
    pending = iter(enumerate(jobs))

    async def fill() -> None:
        while len(running) < depth:
            try:
                index, job = next(pending)
            except StopIteration:
                return
            running[asyncio.ensure_future(job)] = index

    try:
        await fill()
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                index = running.pop(fut)
                results[index] = fut.result()
            await fill()
    finally:
        for fut in running:
            fut.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        for _, job in pending:  # close coroutines that never started
            close = getattr(job, "close", None)
            if close is not None:
                close()
    return [results[i] for i in range(len(jobs))]
