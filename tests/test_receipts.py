"""Backup receipts: incremental per-track digests, signed; verify names a flipped track; restore refuses."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client, ClientError
from splitmirror import tls
from splitmirror.testing import Site, wait_status

MiB = 1 << 20
TRACK = 8192
SIZE = 8 * MiB  # 1024 tracks


@pytest.fixture
def signed_sites(tmp_path: Path) -> Iterator[tuple[Site, Site, Path]]:
    tls_dir = tmp_path / "tls"
    tls.init_dir(tls_dir, [1001, 2001], tls.parse_clients("admin,host,viewer"))
    primary = Site("primary", 1001, tmp_path, tls_dir=tls_dir)
    secondary = Site("secondary", 2001, tmp_path, tls_dir=tls_dir)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary, tls_dir
    primary.kill()
    secondary.kill()


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0x01]))


def tamper_receipt(db: Path, generation: str) -> None:
    with sqlite3.connect(db) as conn:
        (raw,) = conn.execute("SELECT value FROM meta WHERE key = ?", (f"receipt:{generation}",)).fetchone()
        record = json.loads(raw)
        record["root"] = "0" * 32
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(record), f"receipt:{generation}"))


def client(site: Site, tls_dir: Path) -> Client:
    return Client(site.address, tls_dir=str(tls_dir), identity="admin")


async def test_receipts_are_incremental_signed_and_catch_a_flipped_byte(
        signed_sites: tuple[Site, Site, Path]) -> None:
    primary, secondary, tls_dir = signed_sites
    async with client(primary, tls_dir) as c, client(secondary, tls_dir) as s:
        await c.create_volume("db", SIZE)
        await c.create_pair("p", "db", "db-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        for i in (1, 2):
            secondary.cli("pair", "create", f"g{i}", "--pvol", "db-r", "--svol", f"s{i}", "--wait")
        await c.write("db", 0, bytes(range(256)) * (SIZE // 256))
        await c.backup("p", generation="g1", wait=True)
        first = await s.verify_backup("g1")
        assert first.ok and first.signature == "valid" and first.root_ok
        assert first.receipt_changed_tracks == SIZE // TRACK and first.mismatched == 0

        # Five tracks changed, a backup elsewhere, then g1 again: its receipt digests only what changed.
        for track in (3, 200, 201, 700, 1023):
            await c.write("db", track * TRACK + 5, b"changed")
        await c.backup("p", generation="g2", wait=True)
        await c.backup("p", generation="g1", wait=True)
        second = await s.verify_backup("g1")
        assert second.ok and second.sequence == 2 and second.root != first.root
        assert 5 <= second.receipt_changed_tracks < 20, second.receipt_changed_tracks
        svol = secondary.data_dir / "volumes" / "s1.vol"

    # One byte flipped in the SVOL file at rest: verify names exactly that track.
    secondary.stop()
    flip_bit(svol, 417 * TRACK + 1234)
    secondary.start()
    wait_status(primary, "p", ["DUPLEX"], timeout=30)
    async with client(primary, tls_dir) as c, client(secondary, tls_dir) as s:
        bad = await s.verify_backup("g1")
        assert not bad.ok and bad.mismatched == 1 and list(bad.tracks) == [417]
        assert bad.root_ok and bad.signature == "valid"
        out = secondary.cli("backup", "verify", "g1", check=False)
        assert out.returncode == 1 and "1 differ (tracks 417;" in out.stdout
        assert "generation g1 fails verification: 1 track(s) no longer match its receipt" in out.stderr
        ops = [e.op async for e in s.events() if e.kind == "backup"]
        assert ops[-1] == "verify-failed"
        assert (await s.verify_backup("g2")).ok  # the other generation is intact

        # Host reads of the generation are checked track by track: the flipped track is never served.
        assert await s.read("s1", 416 * TRACK, TRACK) == (bytes(range(256)) * (TRACK // 256))
        with pytest.raises(ClientError) as err:
            await s.read("s1", 417 * TRACK + 4096, 100)
        assert err.value.code == "DATA_LOSS"
        assert err.value.message.startswith("generation 'g1' (backup #2 of ")
        assert "fails verification against its receipt: track 417 of SVOL 's1' differs" in err.value.message

        # Restore refuses the generation unless forced.
        with pytest.raises(ClientError) as err:
            await s.restore_volume("p", "g1")
        assert err.value.code == "FAILED_PRECONDITION"
        assert err.value.message.startswith("generation 'g1' fails verification against its receipt: 1 track(s) "
                                            "differ (first: 417)")
        assert "--force" in err.value.message
        assert (await c.display_pairs("p"))[0].status == "DUPLEX"  # nothing was touched
        report = await s.restore_volume("p", "g1", force=True)
        assert report.generation == "g1"
        assert (await c.wait_pair("p", timeout=30)).status == "DUPLEX"

        # After that clean restart the next receipt of g1 is still incremental (the written-tracks mark
        # was kept), and it does not launder the flipped track: nothing rewrote it, so it still differs.
        await c.write("db", 9 * TRACK, b"again")
        await c.backup("p", generation="g1", wait=True)
        third = await s.verify_backup("g1")
        assert third.sequence == 3 and third.receipt_changed_tracks < 50, third.receipt_changed_tracks
        assert list(third.tracks) == [417]

    # A receipt tampered with in the copy table (its root changed): the signature no longer holds.
    secondary.stop()
    tamper_receipt(secondary.data_dir / "copytable.sqlite", "g2")
    secondary.start()
    async with client(secondary, tls_dir) as s:
        forged = await s.verify_backup("g2")
        assert not forged.ok and forged.signature == "invalid" and not forged.root_ok
        # A file restore (which checks tracks as it reads them) refuses it before fencing anything.
        with pytest.raises(ClientError) as err:
            await s.begin_restore("p", "g2")
        assert err.value.code == "FAILED_PRECONDITION"
        assert ("the receipt is damaged (its digests do not hash to its root; its signature is invalid); reads "
                "of SVOL 's2' refused; restore refused (--force restores it anyway)") in err.value.message
        with pytest.raises(ClientError) as err:
            await s.read("s2", 0, 4096)
        assert err.value.code == "DATA_LOSS" and "the receipt is damaged" in err.value.message

    # A deleted generation's receipt goes too (at the next start).
    assert (secondary.data_dir / "receipts" / "g2.digests").exists()
    secondary.cli("pair", "delete", "g2")
    secondary.stop()
    secondary.start()
    assert not (secondary.data_dir / "receipts" / "g2.digests").exists()
    assert (secondary.data_dir / "receipts" / "g1.digests").exists()
