"""The interconnect servicer: what a peer storage system may ask of us."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from ..errors import InvalidArgument, PermissionDenied, SplitmirrorError, Unavailable
from ..pairs.manager import PairManager
from ..procedures.backup import BackupManager
from ..procedures.check import GenerationChecker
from ..procedures.restore import RestoreManager
from ..replication.framing import SequenceCheck
from ..replication.link import SYSTEM_ID_KEY
from ..status import MIRRORING
from ..tls import SYSTEM_OU, cert_subject
from ..v1 import interconnect_pb2 as ic
from ..v1 import interconnect_pb2_grpc as ic_grpc
from .malformed import MalformedInStream

#: Bytes of a HelloRequest.roles_digest (ours are 16).
MAX_ROLES_DIGEST = 32

log = logging.getLogger("splitmirror.interconnect")

Context = grpc.aio.ServicerContext[object, object]


def peer_id(context: Context, allowed: set[int], own: int,
            tls: bool = False) -> int:
    """The calling system's id, refused unless it is a configured peer.

    With TLS the id is the one the verified certificate names; a metadata
    claim that differs from it is refused too.
    """
    metadata = dict(context.invocation_metadata() or ())
    raw = metadata.get(SYSTEM_ID_KEY, "")
    if tls:
        subject = cert_subject(context)
        cert_id = subject.name if subject is not None and subject.kind == SYSTEM_OU else ""
        if not cert_id or (raw and raw != cert_id):
            who = f"certificate {subject.kind} {subject.name!r}" if subject else "no system certificate"
            log.warning("refused interconnect call from %s (%s) claiming system id %r", context.peer(), who, raw)
            raise PermissionDenied(f"caller ({who}) is not a configured peer of system {own}")
        raw = cert_id
    try:
        caller = int(raw)
    except (TypeError, ValueError):
        caller = -1
    if caller not in allowed:
        log.warning("refused interconnect call from %s claiming system id %r: not a configured peer",
                    context.peer(), raw)
        raise PermissionDenied(f"system {raw or '(none)'} is not a configured peer of system {own}")
    return caller


#: Integers a peer sends end up in the copy table (SQLite: signed 64 bits) and
#: in arithmetic on volumes of at most 16 TiB: larger ones are refused whole.
INT64_MAX = (1 << 63) - 1


def check_integers(message: Message) -> None:
    """INVALID_ARGUMENT naming the field and the limit for a uint64 above
    INT64_MAX anywhere in ``message`` (nested messages included)."""
    for field, value in message.ListFields():
        values = value if getattr(field, "is_repeated", False) or getattr(field, "label", 1) == 3 else [value]
        for item in values:
            if field.type == field.TYPE_MESSAGE:
                check_integers(item)
            elif field.type == field.TYPE_UINT64 and item > INT64_MAX:
                raise InvalidArgument(f"{message.DESCRIPTOR.name}.{field.name} = {item} exceeds the limit "
                                      f"{INT64_MAX} (2^63-1)")


TAKEOVER_GRACE = 2.0  # seconds an older Replicate stream has to finish its batch


@dataclasses.dataclass(eq=False)
class ServedStream:
    """One write stream being served for a pair (a Replicate call or a data channel)."""

    #: Stops taking its messages in (the Replicate call's reader task is cancelled).
    stop: Callable[[], object]
    handler: asyncio.Task[Any] | None
    superseded: bool = False


Req = TypeVar("Req")
Rep = TypeVar("Rep")


@contextlib.asynccontextmanager
async def refusals(context: Context, method: str = "") -> AsyncIterator[None]:
    """A user error raised inside ends the call with its status; anything else
    is logged with its traceback and answered INTERNAL without its text (no
    exception text reaches a peer)."""
    try:
        yield
    except SplitmirrorError as exc:
        await context.abort(exc.code, exc.message)
        raise
    except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit, MalformedInStream):
        raise
    except Exception:
        log.exception("interconnect %s failed for %s", method or "call", context.peer())
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method or 'the call'}; "
                                                      "see the daemon log")
        raise


def peer_call(method: Callable[[Any, Req, Context, int], Awaitable[Rep]]
              ) -> Callable[[Any, Req, Context], Awaitable[Rep]]:
    """Identify the calling peer (refusing strangers) and turn user errors into their status."""

    @functools.wraps(method)
    async def wrapper(self: InterconnectServicer, request: Req, context: Context) -> Rep:
        async with refusals(context, method.__name__):
            peer = self._peer(context)
            self._heard(peer, method.__name__)
            check_integers(request)  # type: ignore[arg-type]
            return await method(self, request, context, peer)

    return wrapper


class InterconnectServicer(ic_grpc.InterconnectServicer):
    def __init__(self, manager: PairManager, backups: BackupManager, restores: RestoreManager, role: str,
                 tls: bool = False, checker: GenerationChecker | None = None) -> None:
        self.manager = manager
        self.checker = checker or GenerationChecker(backups)
        self.backups = backups
        self.restores = restores
        self.tls = tls
        self.system = manager.system
        self.role = role
        self._streams: dict[str, ServedStream] = {}  # pair -> the stream allowed to apply
        #: The port of the replication data connection advertised to peers (0: none).
        self.data_port = 0
        #: Set once this system said goodbye to its peers: keepalives are refused from then on.
        self.stopping = False

    def _peer(self, context: Context) -> int:
        return peer_id(context, set(self.manager.links), self.system.system_id, self.tls)

    def _heard(self, peer: int, method: str) -> None:
        """A call from ``peer`` arrived: count it, and it shows the peer alive."""
        self.system.calls_received[peer, method] += 1
        link = self.manager.links.get(peer)
        if link is not None:
            link.heard_from()

    @peer_call
    async def Hello(self, request: ic.HelloRequest, context: Context, peer: int) -> ic.HelloReply:
        if self.stopping:
            raise Unavailable(f"system {self.system.system_id} is stopping")
        if request.goodbye:
            link = self.manager.links.get(peer)
            if link is not None:
                link.peer_left()
            return ic.HelloReply(system_id=self.system.system_id, role=self.role)
        reply = ic.HelloReply(system_id=self.system.system_id, role=self.role, data_port=self.data_port)
        for pair in self.manager.pairs_with(peer):
            # Only the mirror ends that stopped mirroring: what the primary
            # acts on (a keepalive's size does not follow the pair count).
            if pair.mirror is not None and pair.status not in MIRRORING:
                reply.mirrors.append(ic.MirrorState(pair=pair.name, status=pair.status.value))
        if len(request.roles_digest) > MAX_ROLES_DIGEST:
            raise InvalidArgument(f"Hello from system {peer}: roles_digest of {len(request.roles_digest)} bytes "
                                  f"exceeds the limit of {MAX_ROLES_DIGEST}")
        self.manager.roles.fill_hello(peer, request.roles_digest, reply)
        return reply

    @peer_call
    async def AttachMirror(self, request: ic.AttachMirrorRequest, context: Context, peer: int) -> ic.MirrorState:
        return await self.manager.mirror_attach(peer, request)

    @peer_call
    async def PairCommand(self, request: ic.PairCommandRequest, context: Context, peer: int) -> ic.MirrorState:
        return await self.manager.mirror_command(peer, request)

    @peer_call
    async def PairCommands(self, request: ic.PairCommandsRequest, context: Context,
                           peer: int) -> ic.PairCommandsReply:
        return await self.manager.mirror_commands(peer, request)

    async def Replicate(self, request_iterator: AsyncIterator[ic.ReplicateBatch],
                        context: Context) -> AsyncIterator[ic.ReplicateAck]:
        async with refusals(context, "Replicate"):
            async for ack in self._replicate(request_iterator, context):
                yield ack

    async def _replicate(self, request_iterator: AsyncIterator[ic.ReplicateBatch],
                         context: Context) -> AsyncIterator[ic.ReplicateAck]:
        async with refusals(context):
            peer = self._peer(context)
        self._heard(peer, "Replicate")
        batches: asyncio.Queue[ic.ReplicateBatch | None] = asyncio.Queue(maxsize=8)

        async def reader() -> None:
            try:
                async for batch in request_iterator:
                    check_integers(batch)
                    await batches.put(batch)
            finally:
                await batches.put(None)

        reading = asyncio.create_task(reader())
        stream = ServedStream(reading.cancel, asyncio.current_task())
        ending = False  # by an exception (an abort, say): a bad message read meanwhile must not replace it
        try:
            first = await batches.get()
            if first is None:
                return
            async with refusals(context):
                pair = self.manager.mirror_pair(peer, first.pair)
            await self.take_over(pair.name, stream, pair.apply_lock)
            try:
                batch: ic.ReplicateBatch | None = first
                sequence = SequenceCheck()
                applied = acked = 0
                while batch is not None and not stream.superseded:
                    try:
                        applied = await self.manager.mirror_apply(pair, batch, sequence) or applied
                    except SplitmirrorError as exc:
                        log.warning("pair %s: refused replicated writes: %s", pair.name, exc.message)
                        await context.abort(exc.code, exc.message)
                        raise
                    # Cumulative, at once: the primary's send window gathers
                    # writes into the next batch meanwhile, and this ack opens it.
                    if applied != acked:
                        acked = applied
                        yield ic.ReplicateAck(seq=applied)
                    batch = await batches.get()
            finally:
                self.release(pair.name, stream, pair.apply_lock)
        except BaseException:
            ending = True
            raise
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await reading
                except (MalformedInStream, SplitmirrorError):
                    if not ending:
                        raise

    async def take_over(self, pair: str, stream: ServedStream, lock: asyncio.Lock) -> None:
        """Make ``stream`` the pair's only Replicate stream.

        The primary opens a new stream only after giving up on the previous
        one (whose unacknowledged writes it marked pending), so an older
        stream still open here belongs to a primary that vanished without
        closing its connection: it is told to stop after the batch it is
        applying, and cancelled if it cannot even do that in time.
        """
        old = self._streams.get(pair)
        self._streams[pair] = stream
        if old is not None:
            log.warning("pair %s: a newer replication stream takes over from a stale one", pair)
            old.superseded = True
            old.stop()
        try:
            await asyncio.wait_for(lock.acquire(), TAKEOVER_GRACE)
        except TimeoutError:
            if old is not None and old.handler is not None:
                old.handler.cancel()
            await lock.acquire()

    def release(self, pair: str, stream: ServedStream, lock: asyncio.Lock) -> None:
        """``stream`` stops applying: the next one may take over."""
        lock.release()
        if self._streams.get(pair) is stream:
            del self._streams[pair]

    @peer_call
    async def TrackDigests(self, request: ic.TrackDigestsRequest, context: Context, peer: int) -> ic.TrackDigestsReply:
        return await self.manager.mirror_digests(peer, request)

    @peer_call
    async def PrepareBackup(self, request: ic.PrepareBackupRequest, context: Context,
                            peer: int) -> ic.PrepareBackupReply:
        return await self.backups.prepare(peer, request)

    @peer_call
    async def FinishBackup(self, request: ic.FinishBackupRequest, context: Context, peer: int) -> ic.FinishBackupReply:
        return await self.backups.finish(peer, request)

    @peer_call
    async def ListGenerations(self, request: ic.ListGenerationsRequest, context: Context,
                              peer: int) -> ic.ListGenerationsReply:
        return await self.backups.list_generations(peer, request)

    @peer_call
    async def CheckGeneration(self, request: ic.CheckGenerationRequest, context: Context,
                              peer: int) -> ic.CheckGenerationReply:
        return await self.checker.check_for_peer(peer, request)

    @peer_call
    async def RestoreControl(self, request: ic.RestoreControlRequest, context: Context,
                             peer: int) -> ic.RestoreControlReply:
        return await self.restores.control(peer, request)

    async def ReadTracks(self, request: ic.ReadTracksRequest,
                         context: Context) -> AsyncIterator[ic.TrackData]:
        async with refusals(context, "ReadTracks"):
            peer = self._peer(context)
            self._heard(peer, "ReadTracks")
            check_integers(request)
            tracks = self.manager.mirror_read_tracks(peer, request.pair, request.tracks)
            async for first, count, data in tracks:
                self.system.bytes_sent += len(data)
                yield ic.TrackData(track=first, count=count, data=data)
