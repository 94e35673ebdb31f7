"""Host reads of a backup generation, each track checked against the backup's receipt as it is read.

A file restore reads a few tracks of a large generation (the filesystem
metadata it walks and the files it copies): checking only those, when they
are read, costs O(bytes read), where ``backup verify`` re-reads the whole
volume.  For what a restore copies the guarantee is the same: a host (the
restore agent's mount, over NBD or the gRPC host API) is never served a track
of a SPLIT generation whose xxh3-64 no longer matches the receipt taken when
the backup was split.  Such a read is refused (EIO over NBD, DATA_LOSS over
gRPC) with one message naming the generation and its backup, the track and
the SVOL; the first refusal of each track is logged and is an event
(``verify-failed``), and ``backups`` shows the count and the newest refusal,
which the restore agent turns into its error.  A damaged track that no read
touches stops nothing: ``backup verify`` is the full check.

Before the first checked read of a receipt, the receipt itself is checked:
its digest file must hash to the root kept in the copy table (reading the
file once: 8 bytes per track, 1/1024 of a volume of 8 KiB tracks) and its
signature, if any, must hold.  A generation without a receipt of the backup
it holds (split before receipts existed, or its receipt still being taken
when a read arrives is waited for) is served unchecked, as before; so is a
generation while a restore begun with ``--force`` reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from typing import IO, Any

import xxhash

from ..errors import DataLoss
from ..eventsink import BACKUP, Event
from ..pairstate.pair import Pair
from ..status import PairStatus
from ..storage.volume import Volume
from .receipts import DIGEST, Receipts

log = logging.getLogger("splitmirror.receipts")

ROOT_STEP = 4 << 20  # bytes of the digest file hashed at once


@dataclasses.dataclass(eq=False)
class _Receipt:
    """A receipt whose digest file hashed to its root, kept open for the reads that check against it.

    The file is closed when the last reference goes (a read in flight keeps it open
    while a newer receipt replaces this one).
    """

    key: tuple[str, str]  # the record's time and root
    file: IO[bytes] | None
    problem: str  # why the receipt itself cannot be trusted, or ""
    refused: set[int] = dataclasses.field(default_factory=set)  # tracks refused (logged once each)


class VerifiedReads:
    """The storage system's :class:`~splitmirror.datapath.writes.ReadCheck` for backup generations."""

    def __init__(self, receipts: Receipts) -> None:
        self.receipts = receipts
        self.backups = receipts.backups
        self.system = receipts.system
        #: Generations a restore begun with --force reads unchecked, until it ends.
        self.forced: set[str] = set()
        self._checked: dict[str, _Receipt] = {}
        self._lock = asyncio.Lock()

    def covers(self, vol: Volume) -> bool:
        if not self.receipts.records:
            return False
        gen = self.system.pair_into(vol)
        return gen is not None and not gen.remote and gen.name in self.receipts.records

    async def read(self, vol: Volume, offset: int, length: int) -> bytes:
        gen = self.system.pair_into(vol)
        if gen is None or gen.name in self.forced or length == 0:
            return await vol.read(offset, length)
        await self.receipts.settled(gen.name)
        try:
            receipt = await self.receipt(gen)
        except DataLoss as exc:
            self._count(gen, exc.message)
            raise
        if receipt is None or receipt.file is None:
            return await vol.read(offset, length)
        ts = vol.track_size
        first = offset // ts
        count = (offset + length + ts - 1) // ts - first
        data, bad = await vol.run(functools.partial(_read_checked, vol, receipt.file, first, count))
        if bad >= 0:
            raise self._refuse(gen, vol, receipt, first + bad)
        skip = offset - first * ts
        return data if skip == 0 and len(data) == length else data[skip:skip + length]

    async def receipt(self, gen: Pair) -> _Receipt | None:
        """The checked receipt of the backup ``gen`` holds (None: not SPLIT, or no receipt of that backup);
        raises :class:`DataLoss` when the receipt itself is damaged."""
        if gen.status is not PairStatus.SPLIT:
            return None
        record = self.receipts.of_backup(gen)
        if record is None:
            return None
        key = (str(record["time"]), str(record["root"]))
        checked = self._checked.get(gen.name)
        if checked is None or checked.key != key:
            async with self._lock:  # many reads arrive at once: one of them checks the receipt
                checked = self._checked.get(gen.name)
                if checked is None or checked.key != key:
                    checked = self._checked[gen.name] = await self._check(gen, record, key)
        if checked.problem:
            raise DataLoss(checked.problem)
        return checked

    async def _check(self, gen: Pair, record: dict[str, Any], key: tuple[str, str]) -> _Receipt:
        assert gen.mirror is not None
        svol = gen.mirror.volume
        path = self.receipts.digest_file(gen.name)
        file, root, size = await asyncio.to_thread(_open_and_hash, str(path))
        problems = []
        if file is None:
            problems.append("its digest file is missing")
        elif size != svol.tracks * DIGEST or root != record["root"]:
            problems.append("its digests do not hash to its root")
        if self.receipts.signature_state(record) == "invalid":
            problems.append("its signature is invalid")
        problem = ""
        if problems:
            problem = (f"generation {gen.name!r} (backup #{gen.row.backup_seq} of {gen.row.backup_time}): the "
                       f"receipt is damaged ({'; '.join(problems)}); reads of SVOL {svol.name!r} refused")
            log.error("%s", problem)
            self._emit(gen, problem, 0)
            if file is not None:
                file.close()
            file = None
        return _Receipt(key, file, problem)

    def _refuse(self, gen: Pair, vol: Volume, receipt: _Receipt, track: int) -> DataLoss:
        why = (f"generation {gen.name!r} (backup #{gen.row.backup_seq} of {gen.row.backup_time}) fails verification "
               f"against its receipt: track {track} of SVOL {vol.name!r} differs; read refused")
        if track not in receipt.refused:
            receipt.refused.add(track)
            log.error("%s", why)
            self._emit(gen, why, 1)
        self._count(gen, why)
        return DataLoss(why)

    def _count(self, gen: Pair, why: str) -> None:
        count, _ = self.backups.read_refusals.get(gen.name, (0, ""))
        self.backups.read_refusals[gen.name] = (count + 1, why)

    def _emit(self, gen: Pair, why: str, tracks: int) -> None:
        remote = self.system.pair_into(gen.primary.volume) if gen.primary is not None else None
        self.system.events.emit(Event(BACKUP, pair=remote.name if remote else "", generation=gen.name,
                                      op="verify-failed", reason=why, tracks=tracks))


def _open_and_hash(path: str) -> tuple[IO[bytes] | None, str, int]:
    """In a worker thread: the digest file opened, the xxh3-128 of its content and its size."""
    try:
        file = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open by the checked receipt
    except FileNotFoundError:
        return None, "", 0
    h = xxhash.xxh3_128()
    size = 0
    while chunk := os.pread(file.fileno(), ROOT_STEP, size):
        h.update(chunk)
        size += len(chunk)
    return file, h.hexdigest(), size


def _read_checked(vol: Volume, digests: IO[bytes], first: int, count: int) -> tuple[bytes, int]:
    """In a worker thread: tracks ``first`` .. ``first + count`` of ``vol`` and the index of the first
    whose digest differs from the receipt's (-1: none)."""
    ts = vol.track_size
    data = vol.pread(first * ts, count * ts)
    expected = os.pread(digests.fileno(), count * DIGEST, first * DIGEST)
    view = memoryview(data)
    for i in range(count):
        if xxhash.xxh3_64_digest(view[i * ts:(i + 1) * ts]) != expected[i * DIGEST:(i + 1) * DIGEST]:
            return data, i
    return data, -1
