"""Backup receipts: what a generation held when it was split, track by track.

When a generation is split for a backup, the secondary records the xxh3-64
digest of every track of its SVOL (``receipts/GEN.digests``, 8 bytes per
track) and a root digest (xxh3-128 over them), signed with the system's TLS
key when TLS is configured (``receipt:GEN`` in the copy table).

Incremental: from the first receipt on, the SVOL marks the tracks written
to it (:attr:`Volume.written`: the resync before a backup, the writes
mirrored while DUPLEX); the next receipt re-digests only those and rewrites
their 8-byte slots in place, so it costs O(changed tracks), not a full read.
The mark lives in memory and is kept by a clean stop: the first receipt
after a crash of the daemon is a full read again.

``verify`` (``backup verify``) re-reads the whole generation and names every
track that no longer matches its receipt (bit rot, tampering, a host that
wrote where it should not); a volume restore refuses a generation that fails
it unless forced.  A file restore reads only its files: it checks the tracks
it reads as it reads them (:mod:`.verified_reads`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import xxhash

from ..clock import utc_now
from ..errors import FailedPrecondition, NotFound
from ..eventsink import BACKUP, Event
from ..names import check_name
from ..pairstate.pair import CopyProgress, Pair
from ..storage.bitmap import TrackBitmap
from ..storage.volume import Volume
from ..v1 import host_pb2 as pb
from .backup import BackupManager

log = logging.getLogger("splitmirror.receipts")

KEY = "receipt:"
MARK_KEY = "receipt-mark:"
DIGEST = 8  # bytes of one track's xxh3-64
MAX_LISTED = 1000
COMPARE_STEP = 1 << 20  # bytes of digests compared at once
REREAD_STEP = 256 << 20  # bytes re-read between progress updates


class Receipts:
    def __init__(self, backups: BackupManager, key_pem: bytes | None = None, cert_pem: bytes | None = None) -> None:
        self.backups = backups
        self.system = backups.system
        self.dir = self.system.data_dir / "receipts"
        self.records: dict[str, dict[str, Any]] = {}
        self._key = _load_key(key_pem) if key_pem else None
        self._cert = cert_pem
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def load(self) -> None:
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        for key, raw in (await self.system.table.meta_items(KEY)).items():
            name = key.removeprefix(KEY)
            if name not in self.system.pairs:  # the generation was deleted: so is its receipt
                await self.system.table.delete_meta(key)
                await asyncio.to_thread(self._path(name).unlink, missing_ok=True)
                log.info("receipt of deleted generation %s removed", name)
                continue
            try:
                self.records[name] = dict(json.loads(raw))
            except ValueError:
                log.error("receipt %s in the copy table cannot be read; ignored", key)
        await self._load_marks()

    async def save_marks(self) -> None:
        """At a clean stop (nothing writes the SVOLs any more): keep each generation's
        written-tracks mark, so the first receipt after the restart stays incremental."""
        for name in self.records:
            gen = self.system.pairs.get(name)
            if gen is not None and gen.mirror is not None and gen.mirror.volume.written is not None:
                await self.system.table.set_meta(MARK_KEY + name, gen.mirror.volume.written.to_bytes().hex())

    async def _load_marks(self) -> None:
        """Marks kept by a clean stop, used only after a clean start; read once (a crash later loses them)."""
        for key, raw in (await self.system.table.meta_items(MARK_KEY)).items():
            await self.system.table.delete_meta(key)
            gen = self.system.pairs.get(key.removeprefix(MARK_KEY))
            if not self.system.clean_start or gen is None or gen.mirror is None:
                continue
            svol = gen.mirror.volume
            with contextlib.suppress(ValueError):
                svol.written = TrackBitmap.from_bytes(svol.tracks, bytes.fromhex(raw))
        await self.system.table.sync()

    # -- taking receipts ----------------------------------------------------------
    def split(self, gen: Pair) -> None:
        """A generation was split for a backup (its SVOL flushed): take its receipt in the background."""
        previous = self._tasks.get(gen.name)
        self._tasks[gen.name] = asyncio.create_task(self._after(previous, gen), name=f"receipt-{gen.name}")

    async def _after(self, previous: asyncio.Task[None] | None, gen: Pair) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        try:
            await self.take(gen)
        except Exception:
            log.exception("receipt of generation %s failed", gen.name)

    async def settled(self, name: str) -> None:
        """Wait for the receipt of ``name`` being taken, if any (before reusing or reading the generation)."""
        task = self._tasks.get(name)
        if task is not None:
            await asyncio.shield(task)

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.digests"

    def digest_file(self, name: str) -> Path:
        """Where the per-track digests of generation ``name``'s receipt are kept."""
        return self._path(name)

    def of_backup(self, gen: Pair) -> dict[str, Any] | None:
        """The receipt of the backup ``gen`` holds now, or None (none taken, or one of an older backup)."""
        record = self.records.get(gen.name)
        if record is None or record.get("sequence") != gen.row.backup_seq or not gen.row.backup_time \
                or record.get("backup_time") != gen.row.backup_time:
            return None
        return record

    def signature_state(self, record: dict[str, Any]) -> str:
        """``unsigned``, ``valid`` or ``invalid``: does the receipt's signature hold for this system's certificate?"""
        if "signature" not in record:
            return "unsigned"
        valid = self._cert is not None and _verify(self._cert, base64.b64decode(record["signature"]),
                                                   _signed_text(record))
        return "valid" if valid else "invalid"

    async def take(self, gen: Pair) -> dict[str, Any]:
        assert gen.mirror is not None
        svol = gen.mirror.volume
        started = time.monotonic()
        old = self.records.get(gen.name)
        path = self._path(gen.name)
        dirty = svol.written
        full = (old is None or dirty is None or old.get("svol") != svol.name or old.get("tracks") != svol.tracks
                or old.get("track_size") != svol.track_size or not await asyncio.to_thread(path.exists))
        # Writes from here on are marked for the next receipt (re-read then if they race this one).
        svol.written = TrackBitmap(svol.tracks)
        changed, root = await update_digests(svol, path, None if full else dirty)
        record: dict[str, Any] = {
            "generation": gen.name, "svol": svol.name, "tracks": svol.tracks, "track_size": svol.track_size,
            "algorithm": "xxh3-64 per track, xxh3-128 root", "root": root, "sequence": gen.row.backup_seq,
            "backup_time": gen.row.backup_time or "", "time": utc_now(), "changed_tracks": changed, "full": full,
            "seconds": round(time.monotonic() - started, 6)}
        if self._key is not None:
            record["signature"] = base64.b64encode(_sign(self._key, _signed_text(record))).decode()
            record["signer"] = f"system {self.system.system_id}"
        self.records[gen.name] = record
        await self.system.table.set_meta(KEY + gen.name, json.dumps(record))
        await self.system.table.sync()
        log.info("receipt of generation %s (#%d): %d of %d tracks digested%s in %.3fs, root %s", gen.name,
                 record["sequence"], changed, svol.tracks, " (full read)" if full else "", record["seconds"], root)
        return record

    # -- verifying ------------------------------------------------------------------
    def _generation(self, name: str) -> Pair:
        check_name("generation", name)
        gen = self.system.pairs.get(name)
        if gen is None or gen.remote or gen.mirror is None:
            raise NotFound(f"generation {name!r} is not a local pair with its SVOL on system {self.system.system_id}")
        return gen

    async def verify(self, name: str) -> pb.VerifyBackupReply:
        gen = self._generation(name)
        await self.settled(name)
        record = self.of_backup(gen)
        if record is None:
            raise FailedPrecondition(f"generation {name!r} has no receipt of the backup it holds (backups split "
                                     "before receipts existed, or none yet)")
        if name in self.backups.checking:
            raise FailedPrecondition(f"generation {name!r} is being checked or verified already")
        self.backups.checking.add(name)  # not reused by a backup while it is read
        try:
            return await self._verify(gen, record)
        finally:
            self.backups.checking.discard(name)

    async def _verify(self, gen: Pair, record: dict[str, Any]) -> pb.VerifyBackupReply:
        name = gen.name
        assert gen.mirror is not None
        svol = gen.mirror.volume
        started = time.monotonic()
        path = self._path(name)
        receipt = await asyncio.to_thread(_read_file, path)
        reply = pb.VerifyBackupReply(
            generation=name, svol=svol.name, sequence=record["sequence"], backup_time=record["backup_time"],
            root=record["root"], track_size=record["track_size"], receipt_time=record["time"],
            receipt_changed_tracks=record["changed_tracks"], signer=record.get("signer", ""))
        reply.root_ok = receipt is not None and xxhash.xxh3_128_hexdigest(receipt) == record["root"]
        reply.signature = self.signature_state(record)
        current = await self._reread(gen)
        reply.tracks_checked = svol.tracks
        bad = _mismatches(receipt or b"", current) if receipt is not None and len(receipt) == len(current) \
            else range(svol.tracks)
        reply.mismatched = len(bad)
        reply.tracks.extend(bad[:MAX_LISTED])
        reply.seconds = time.monotonic() - started
        reply.ok = reply.root_ok and reply.signature != "invalid" and not reply.mismatched
        remote = self.system.pair_into(gen.primary.volume) if gen.primary is not None else None
        if not reply.ok:
            why = (f"{reply.mismatched} of {svol.tracks} tracks no longer match the receipt" if reply.root_ok
                   else "the receipt's digests do not hash to its root")
            if reply.signature == "invalid":
                why += "; the receipt's signature is invalid"
            log.error("generation %s fails verification: %s", name, why)
            self.system.events.emit(Event(BACKUP, pair=remote.name if remote else "", generation=name,
                                          op="verify-failed", reason=why, tracks=reply.mismatched))
        return reply

    async def _reread(self, gen: Pair) -> bytes:
        """Every track's digest, shown as the generation's verify progress (pair display, the CLI's bar)."""
        assert gen.mirror is not None
        svol = gen.mirror.volume
        progress = gen.verify_progress = CopyProgress("verify", svol.tracks, svol.track_size)
        step = max(1, REREAD_STEP // svol.track_size)
        out = bytearray()
        try:
            for first in range(0, svol.tracks, step):
                count = min(step, svol.tracks - first)
                out += await svol.verify_digests(first, count)
                progress.done_tracks += count
        finally:
            gen.verify_progress = None
        return bytes(out)

    async def refusal(self, name: str) -> str:
        """Why a restore from ``name`` must not go ahead (verification failed), or ""."""
        try:
            reply = await self.verify(name)
        except FailedPrecondition as exc:
            if "being checked" in exc.message:
                raise
            return ""  # no receipt to hold it against
        if reply.ok:
            return ""
        first = ", ".join(str(t) for t in reply.tracks[:8])
        return (f"generation {name!r} fails verification against its receipt: {reply.mismatched} track(s) differ"
                f"{f' (first: {first})' if first else ''}{'' if reply.root_ok else ', receipt damaged'}"
                f"{'; signature invalid' if reply.signature == 'invalid' else ''}")


async def update_digests(svol: Volume, path: Path, dirty: TrackBitmap | None) -> tuple[int, str]:
    """Digest the ``dirty`` tracks of ``svol`` into the digest file ``path`` (all of them when None);
    returns how many tracks were digested and the new root."""
    if dirty is None:
        blob = await svol.verify_digests(0, svol.tracks)
        await asyncio.to_thread(_write_file, path, blob)
        changed = svol.tracks
    else:
        changed = len(dirty)
        await asyncio.to_thread(_digest_runs, svol, path, list(dirty.runs()))
    return changed, await asyncio.to_thread(_root_of, path)


def _digest_runs(svol: Volume, path: Path, runs: list[tuple[int, int]]) -> None:
    """In a worker thread: digest each run of tracks into its slots of the digest file, then fsync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for start, count in runs:
            os.pwrite(fd, svol.track_digests(start, count), start * DIGEST)
        os.fsync(fd)
    finally:
        os.close(fd)


def _mismatches(receipt: bytes, current: bytes) -> list[int]:
    bad: list[int] = []
    a, b = memoryview(receipt), memoryview(current)
    for base in range(0, len(a), COMPARE_STEP):
        if a[base:base + COMPARE_STEP] == b[base:base + COMPARE_STEP]:
            continue
        for off in range(base, min(base + COMPARE_STEP, len(a)), DIGEST):
            if a[off:off + DIGEST] != b[off:off + DIGEST]:
                bad.append(off // DIGEST)
    return bad


def _signed_text(record: dict[str, Any]) -> bytes:
    fields = ("generation", "svol", "tracks", "track_size", "root", "sequence", "backup_time", "time")
    return json.dumps({k: record[k] for k in fields}, sort_keys=True).encode()


def _load_key(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(pem, password=None)


def _sign(key: Any, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    signature: bytes = key.sign(data)  # Ed25519/Ed448
    return signature


def _verify(cert_pem: bytes, signature: bytes, data: bytes) -> bool:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    public = x509.load_pem_x509_certificate(cert_pem).public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            public.verify(signature, data)  # type: ignore[call-arg, union-attr]
    except InvalidSignature:
        return False
    return True


def _write_file(path: Path, blob: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _root_of(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
