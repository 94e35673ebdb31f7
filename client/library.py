"""Async client for the host API of a splitmirror storage system (grpc.aio).

>>> async with Client("127.0.0.1:7001") as c:
...     await c.create_volume("v1", 1 << 30)
...     await c.write("v1", 0, b"hello")

Every gRPC failure is raised as :class:`ClientError`, whose ``code`` is the
gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``...) and whose ``message``
is the server's details string.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
import grpc.aio

from splitmirror.v1 import host_pb2, host_pb2_grpc

__all__ = ["DEFAULT_CHUNK", "MAX_MESSAGE", "Client", "ClientError", "ProgressCallback"]

#: The name every daemon certificate carries: ``splitmirror.tls.SERVER_NAME``,
#: not imported because that module loads ``cryptography`` for certificate making.
SERVER_NAME = "splitmirror"
#: Largest gRPC message either side accepts.
MAX_MESSAGE = 64 << 20
#: Default payload of one Write/Read RPC.
DEFAULT_CHUNK = 1 << 20
#: Seconds between two DisplayPairs polls in :meth:`Client.wait_pair`.
POLL_INTERVAL = 0.2

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_T = TypeVar("_T")

ProgressCallback = Callable[[host_pb2.PairRow], None]


class ClientError(Exception):
    """A refused or failed request; ``str(err)`` is the server's message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status_code(self) -> grpc.StatusCode | None:
        """The :class:`grpc.StatusCode` named by ``code``, if it names one."""
        return grpc.StatusCode.__members__.get(self.code)

    def __repr__(self) -> str:
        return f"ClientError({self.code!r}, {self.message!r})"


def _from_rpc_error(err: grpc.aio.AioRpcError) -> ClientError:
    code = err.code()
    details = err.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    return ClientError(name, details or name.lower().replace("_", " "))


class Client:
    """Host API client. Use ``async with Client(server) as c`` (or
    :meth:`connect` / :meth:`close`); methods also connect lazily.

    ``timeout`` is the deadline in seconds of each RPC (``None``: no deadline).
    ``tls_dir`` (made by ``splitmirror certs init``) turns on mutual TLS with
    the certificate ``client-<identity>.pem``; ``token`` is sent as a bearer
    token (for servers that take tokens instead of client certificates).
    ``connect_timeout`` bounds how long the first connection attempt may take
    (a refused connection fails at once with ``UNAVAILABLE``).
    """

    def __init__(self, server: str, *, timeout: float | None = None, connect_timeout: float = 10.0,
                 tls_dir: str | os.PathLike[str] | None = None, identity: str = "admin",
                 token: str | None = None) -> None:
        self.server = server
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.identity = identity
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: host_pb2_grpc.HostApiAsyncStub | None = None
        self._connected = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the channel and wait (at most ``connect_timeout``) for the
        connection to be established or to fail."""
        self._get_stub()
        if self._connected:
            return
        channel = self._channel
        assert channel is not None
        deadline = time.monotonic() + self.connect_timeout
        state = channel.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                # Let the next RPC (wait_for_ready=False) fail with gRPC's own
                # explanation (connection refused, DNS failure...).
                break
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                raise ClientError("UNAVAILABLE", f"channel to {self.server} is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(
                    "UNAVAILABLE",
                    f"cannot connect to {self.server}: no answer within {self.connect_timeout:g}s",
                )
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
            except TimeoutError:
                continue
            state = channel.get_state(try_to_connect=True)
        self._connected = True

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        self._connected = False
        if channel is not None:
            await channel.close(None)

    def _get_stub(self) -> host_pb2_grpc.HostApiAsyncStub:
        if self._stub is None:
            options = [
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ]
            if self.tls_dir is None:
                self._channel = grpc.aio.insecure_channel(self.server, options=options)
            else:
                self._channel = grpc.aio.secure_channel(self.server, self._credentials(), options=[
                    *options, ("grpc.ssl_target_name_override", SERVER_NAME)])
            self._stub = host_pb2_grpc.HostApiStub(self._channel)
        return self._stub

    def _credentials(self) -> grpc.ChannelCredentials:
        assert self.tls_dir is not None
        d = self.tls_dir
        files = [d / "ca.pem", d / f"client-{self.identity}.key", d / f"client-{self.identity}.pem"]
        try:
            ca, key, cert = (f.read_bytes() for f in files)
        except OSError as exc:
            raise ClientError("INVALID_ARGUMENT", f"TLS identity {self.identity!r}: {exc.filename}: "
                                                  f"{exc.strerror}") from None
        return grpc.ssl_channel_credentials(ca, key, cert)

    async def _call(
        self,
        method: Callable[[host_pb2_grpc.HostApiAsyncStub], grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp]],
        request: _Req,
    ) -> _Resp:
        if not self._connected:
            await self.connect()
        stub = self._get_stub()
        try:
            return await method(stub)(request, timeout=self.timeout, wait_for_ready=False,
                                      metadata=self._metadata or None)
        except grpc.aio.AioRpcError as err:
            raise _from_rpc_error(err) from None

    # ------------------------------------------------------------------ volumes

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

    # ------------------------------------------------------------------ pairs

    async def create_pair(
        self,
        name: str,
        pvol: str,
        svol: str,
        peer: int = 0,
        mode: str = "sync",
        group: str = "",
    ) -> list[host_pb2.PairRow]:
        """Create a pair (``peer`` 0: local pair) and start its initial copy."""
        req = host_pb2.CreatePairRequest(name=name, pvol=pvol, svol=svol, peer=peer, mode=mode, group=group)
        reply = await self._call(lambda s: s.CreatePair, req)
        return list(reply.rows)

    async def display_pairs(self, name: str = "") -> list[host_pb2.PairRow]:
        """Rows of the copy management table (all pairs when ``name`` is empty)."""
        reply = await self._call(lambda s: s.DisplayPairs, host_pb2.DisplayPairsRequest(name=name))
        return list(reply.rows)

    async def split_pair(self, name: str) -> list[host_pb2.PairRow]:
        reply = await self._call(lambda s: s.SplitPair, host_pb2.PairRef(name=name))
        return list(reply.rows)

    async def resync_pair(
        self, name: str, reverse: bool = False, force: bool = False
    ) -> list[host_pb2.PairRow]:
        req = host_pb2.ResyncPairRequest(name=name, reverse=reverse, force=force)
        reply = await self._call(lambda s: s.ResyncPair, req)
        return list(reply.rows)

    async def set_pair_mode(self, name: str, mode: str) -> list[host_pb2.PairRow]:
        req = host_pb2.SetPairModeRequest(name=name, mode=mode)
        reply = await self._call(lambda s: s.SetPairMode, req)
        return list(reply.rows)

    async def verify_pair(self, name: str, repair: bool = False) -> host_pb2.VerifyReply:
        req = host_pb2.VerifyPairRequest(name=name, repair=repair)
        reply: host_pb2.VerifyReply = await self._call(lambda s: s.VerifyPair, req)
        return reply

    async def backup(self, pair: str = "", *, group: str = "", generation: str = "",
                     wait: bool = True) -> host_pb2.BackupReply:
        req = host_pb2.BackupRequest(pair=pair, group=group, generation=generation, wait=wait)
        reply: host_pb2.BackupReply = await self._call(lambda s: s.Backup, req)
        return reply

    async def list_backups(self, pair: str) -> list[host_pb2.Generation]:
        reply = await self._call(lambda s: s.ListBackups, host_pb2.PairRef(name=pair))
        return list(reply.generations)

    async def begin_restore(self, pair: str, generation: str) -> host_pb2.RestoreSession:
        reply: host_pb2.RestoreSession = await self._call(
            lambda s: s.BeginRestore, host_pb2.RestoreRequest(pair=pair, generation=generation))
        return reply

    async def finish_restore(self, pair: str) -> host_pb2.RestoreReport:
        reply: host_pb2.RestoreReport = await self._call(lambda s: s.FinishRestore, host_pb2.PairRef(name=pair))
        return reply

    async def abort_restore(self, pair: str) -> host_pb2.RestoreReport:
        reply: host_pb2.RestoreReport = await self._call(lambda s: s.AbortRestore, host_pb2.PairRef(name=pair))
        return reply

    async def restore_volume(self, pair: str, generation: str) -> host_pb2.RestoreReport:
        reply: host_pb2.RestoreReport = await self._call(
            lambda s: s.RestoreVolume, host_pb2.RestoreRequest(pair=pair, generation=generation))
        return reply

    async def delete_pair(self, name: str) -> None:
        await self._call(lambda s: s.DeletePair, host_pb2.PairRef(name=name))

    async def wait_pair(
        self,
        name: str,
        statuses: Collection[str] = frozenset({"DUPLEX"}),
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        interval: float = POLL_INTERVAL,
    ) -> host_pb2.PairRow:
        """Poll the pair until its primary-end row has a status in ``statuses``
        and return that row. ``on_progress`` is called with the row after each
        poll. Raises ClientError when the pair turns SUSPENDED while waiting
        for DUPLEX, when it disappears, or on timeout (``DEADLINE_EXCEEDED``)."""
        wanted = {s.upper() for s in statuses}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            row = primary_row(name, await self.display_pairs(name))
            if on_progress is not None:
                on_progress(row)
            if row.status in wanted:
                return row
            if row.status == "SUSPENDED" and "DUPLEX" in wanted:
                reason = f": {row.reason}" if row.reason else ""
                raise ClientError("ABORTED", f"pair {name!r} is SUSPENDED{reason}")
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    want = "/".join(sorted(wanted))
                    raise ClientError(
                        "DEADLINE_EXCEEDED",
                        f"pair {name!r} is still {row.status}, not {want}, after {timeout:g}s",
                    )
                await asyncio.sleep(min(interval, remaining))
            else:
                await asyncio.sleep(interval)

    # ------------------------------------------------------------------ stats

    async def stats(self) -> host_pb2.Stats:
        return await self._call(lambda s: s.GetStats, host_pb2.StatsRequest())


def primary_row(name: str, rows: Sequence[host_pb2.PairRow]) -> host_pb2.PairRow:
    """The row of pair ``name`` kept at its primary end (or the only end shown)."""
    mine = [r for r in rows if r.pair == name] or list(rows)
    if not mine:
        raise ClientError("NOT_FOUND", f"pair {name!r} not found")
    for row in mine:
        if row.primary:
            return row
    return mine[0]


def _check_chunking(chunk: int, depth: int) -> None:
    if chunk <= 0 or chunk > MAX_MESSAGE - (64 << 10):
        raise ValueError(f"chunk must be between 1 byte and {MAX_MESSAGE >> 20} MiB minus headers")
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
