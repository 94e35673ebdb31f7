"""Backups at the remote site: point-in-time correctness, the ring, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client, ClientError
from splitmirror.testing import Site, wait_status

MiB = 1 << 20
BLOCK = 4096
STAMP = struct.Struct(">4sIQI")  # magic, writer, sequence, block
MAGIC = b"SMWR"


@dataclasses.dataclass
class Write:
    writer: int
    seq: int
    block: int
    issued: float
    acked: float = float("inf")


@dataclasses.dataclass
class Writer:
    """Stamps each block it writes with (writer, sequence); QD1."""

    volume: str
    wid: int
    first_block: int
    blocks: int
    log: list[Write] = dataclasses.field(default_factory=list)

    async def run(self, c: Client, stop: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            block = self.first_block + (seq * 7) % self.blocks
            payload = STAMP.pack(MAGIC, self.wid, seq, block).ljust(BLOCK, bytes([seq % 251]))
            w = Write(self.wid, seq, block, time.monotonic())
            self.log.append(w)
            await c.write(self.volume, block * BLOCK, payload)
            w.acked = time.monotonic()


def stamps(image: bytes) -> dict[int, tuple[int, int]]:
    """block -> (writer, seq) for every stamped block of an image."""
    found = {}
    for block in range(len(image) // BLOCK):
        magic, writer, seq, b = STAMP.unpack_from(image, block * BLOCK)
        if magic == MAGIC:
            assert b == block, f"block {block} holds the stamp of block {b}"
            found[block] = (writer, seq)
    return found


def check_point_in_time(images: dict[str, bytes], writers: list[Writer], issued: float, acked: float) -> None:
    """The images are one consistent cut between the command's issue and ack."""
    present = {vol: stamps(img) for vol, img in images.items()}
    by_key = {(w.volume, w.wid): w for w in writers}

    def seq_in_image(volume: str, block: int) -> int:
        entry = present[volume].get(block)
        return entry[1] if entry else 0

    latest_issue = 0.0
    for volume, found in present.items():
        for _block, (wid, seq) in found.items():
            write = by_key[(volume, wid)].log[seq - 1]
            assert write.issued <= acked, f"{volume}: write {wid}/{seq} issued after the backup was acknowledged"
            latest_issue = max(latest_issue, write.issued)
    # Every write acknowledged before the command, or before any write the
    # cut contains, is in the cut (or superseded by a later one of its writer).
    horizon = max(issued, latest_issue)
    for writer in writers:
        for write in writer.log:
            if write.acked < horizon:
                assert seq_in_image(writer.volume, write.block) >= write.seq, (
                    f"{writer.volume}: write {write.writer}/{write.seq} (block {write.block}) acknowledged before "
                    f"the cut is missing from the backup")


async def start_writers(c: Client, volumes: list[str], per_volume: int, size: int) -> tuple[list[Writer], list[
        asyncio.Task[None]], asyncio.Event]:
    stop = asyncio.Event()
    writers = []
    blocks = size // BLOCK // per_volume
    for volume in volumes:
        for i in range(per_volume):
            writers.append(Writer(volume, len(writers) + 1, i * blocks, blocks))
    tasks = [asyncio.create_task(w.run(c, stop)) for w in writers]
    return writers, tasks, stop


def make_generations(secondary: Site, spvol: str, count: int = 3) -> list[str]:
    names = []
    for i in range(1, count + 1):
        secondary.cli("pair", "create", f"{spvol}-gen{i}", "--pvol", spvol, "--svol", f"{spvol}-svol{i}", "--wait")
        names.append(f"{spvol}-gen{i}")
    return names


@pytest.fixture
def backup_sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    primary.kill()
    secondary.kill()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_backup_is_a_point_in_time_under_load(backup_sites: tuple[Site, Site], mode: str) -> None:
    primary, secondary = backup_sites
    size = 4 * MiB
    async with Client(primary.address) as c, Client(secondary.address) as s:
        await c.create_volume("db", size)
        await c.create_pair("db-pair", "db", "db-r", peer=2001, mode=mode)
        await c.wait_pair("db-pair", timeout=30)
        make_generations(secondary, "db-r")
        writers, tasks, stop = await start_writers(c, ["db"], 4, size)
        await asyncio.sleep(0.3)
        for _ in range(4):
            issued = time.monotonic()
            reply = await c.backup("db-pair", wait=True)
            acked = time.monotonic()
            result = reply.backups[0]
            assert result.state == "done"
            image = await s.read(result.svol, 0, size)
            check_point_in_time({"db": image}, writers, issued, acked)
            # The remote mirror never left DUPLEX for the backup.
            assert (await c.display_pairs("db-pair"))[0].status == "DUPLEX"
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        assert sum(len(w.log) for w in writers) > 50
        await c.flush("db")
        await asyncio.sleep(0.5 if mode == "async" else 0)
        row = await c.wait_pair("db-pair", timeout=20)
        assert row.status == "DUPLEX"
        assert await c.checksum("db") == await s.checksum("db-r")


async def test_consistency_group_backup_is_one_cut(backup_sites: tuple[Site, Site]) -> None:
    primary, secondary = backup_sites
    size = 2 * MiB
    volumes = ["v1", "v2", "v3"]
    async with Client(primary.address) as c, Client(secondary.address) as s:
        for v in volumes:
            await c.create_volume(v, size)
            await c.create_pair(f"{v}-pair", v, f"{v}-r", peer=2001, group="db")
        for v in volumes:
            await c.wait_pair(f"{v}-pair", timeout=30)
            make_generations(secondary, f"{v}-r", 2)
        writers, tasks, stop = await start_writers(c, volumes, 2, size)
        await asyncio.sleep(0.3)
        for _ in range(3):
            issued = time.monotonic()
            reply = await c.backup(group="db", wait=True)
            acked = time.monotonic()
            assert {b.pair for b in reply.backups} == {f"{v}-pair" for v in volumes}
            assert len({b.backup_time for b in reply.backups}) == 1
            images = {}
            for b in reply.backups:
                assert b.state == "done"
                images[b.pair.removesuffix("-pair")] = await s.read(b.svol, 0, size)
            check_point_in_time(images, writers, issued, acked)
        stop.set()
        await asyncio.gather(*tasks)


async def test_generation_ring_reuses_the_oldest(backup_sites: tuple[Site, Site]) -> None:
    primary, secondary = backup_sites
    size = 2 * MiB
    async with Client(primary.address) as c, Client(secondary.address) as s:
        await c.create_volume("db", size)
        await c.create_pair("p", "db", "db-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        gens = make_generations(secondary, "db-r")
        used = []
        images = {}
        for i in range(4):
            await c.write("db", i * 64 * 1024, bytes([i + 1]) * 64 * 1024)
            reply = await c.backup("p", wait=True)
            b = reply.backups[0]
            used.append(b.generation)
            images[b.generation] = await c.read("db", 0, size)
            if i < 3:  # a generation reused later is checked before it is overwritten
                assert await s.read(b.svol, 0, size) == images[b.generation]
        assert used == [gens[0], gens[1], gens[2], gens[0]]
        listing = {g.local_pair: g for g in await c.list_backups("p")}
        assert listing[gens[0]].sequence == 2 and listing[gens[1]].sequence == 1
        for gen in gens:
            svol = listing[gen].svol
            assert await s.read(svol, 0, size) == images[gen], gen
        # Tracks changed since each backup are counted per generation.
        await c.write("db", MiB, b"z" * 8192)
        await asyncio.sleep(0.2)
        listing = {g.local_pair: g for g in await s.list_backups("p")}
        assert all(listing[g].changed_tracks >= 1 for g in gens)
        # An explicit generation is honoured.
        reply = await c.backup("p", generation=gens[2], wait=True)
        assert reply.backups[0].generation == gens[2]


async def test_backup_failures_and_restarts(backup_sites: tuple[Site, Site]) -> None:
    primary, secondary = backup_sites
    size = 2 * MiB
    async with Client(primary.address) as c:
        await c.create_volume("db", size)
        await c.create_pair("p", "db", "db-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        with pytest.raises(ClientError) as err:
            await c.backup("p", wait=True)
        assert err.value.code == "FAILED_PRECONDITION" and "no backup generation" in err.value.message
        gens = make_generations(secondary, "db-r", 2)
        with pytest.raises(ClientError) as err:
            await c.backup("p", generation="nope", wait=True)
        assert err.value.code == "NOT_FOUND" and "'nope'" in err.value.message
        await c.write("db", 0, b"1" * 8192)
        first = (await c.backup("p", wait=True)).backups[0]
        assert first.generation == gens[0]

    # Restart each daemon between backups: generations and times survive.
    primary.stop()
    primary.start()
    secondary.stop()
    secondary.start()
    wait_status(primary, "p", ["DUPLEX"])
    async with Client(primary.address) as c, Client(secondary.address) as s:
        listing = {g.local_pair: g for g in await c.list_backups("p")}
        assert listing[gens[0]].backup_time == first.backup_time and listing[gens[0]].sequence == 1
        await c.write("db", 0, b"2" * 8192)
        second = (await c.backup("p", wait=True)).backups[0]
        assert second.generation == gens[1]

        # Secondary down: a clear error, the previous generation intact, and
        # the remote pair keeps tracking writes.
        secondary.kill()
        await c.write("db", 0, b"3" * 8192)
        with pytest.raises(ClientError) as err:
            await c.backup("p", wait=True)
        assert err.value.code in ("UNAVAILABLE", "FAILED_PRECONDITION")
        row = (await c.display_pairs("p"))[0]
        assert row.status == "SUSPENDED" and row.pending_tracks >= 1
        secondary.start()
        wait_status(primary, "p", ["DUPLEX"], timeout=30)
        assert (await s.read(second.svol, 0, 8192)) == b"2" * 8192
        listing = {g.local_pair: g for g in await s.list_backups("p")}
        assert listing[gens[1]].backup_time == second.backup_time

        # A backup needs a DUPLEX remote pair.
        await c.split_pair("p")
        with pytest.raises(ClientError) as err:
            await c.backup("p", wait=True)
        assert err.value.code == "FAILED_PRECONDITION" and "SPLIT" in err.value.message


def test_point_in_time_checker_catches_bad_cuts() -> None:
    """The checker above fails on images that are not a consistent cut."""

    def image(blocks: dict[int, tuple[int, int]], count: int = 4) -> bytes:
        out = bytearray(count * BLOCK)
        for block, (wid, seq) in blocks.items():
            STAMP.pack_into(out, block * BLOCK, MAGIC, wid, seq, block)
        return bytes(out)

    w = Writer("v", 1, 0, 4)
    w.log = [Write(1, 1, 0, 1.0, 2.0), Write(1, 2, 1, 3.0, 4.0), Write(1, 3, 2, 5.0, 6.0)]
    check_point_in_time({"v": image({0: (1, 1), 1: (1, 2)})}, [w], issued=4.5, acked=7.0)
    with pytest.raises(AssertionError, match="missing"):  # acknowledged before the command
        check_point_in_time({"v": image({0: (1, 1)})}, [w], issued=4.5, acked=7.0)
    with pytest.raises(AssertionError, match="issued after"):  # issued after the command's ack
        check_point_in_time({"v": image({0: (1, 1), 1: (1, 2), 2: (1, 3)})}, [w], issued=4.5, acked=4.8)
    with pytest.raises(AssertionError, match="missing"):  # a later write without its predecessor
        check_point_in_time({"v": image({0: (1, 1), 2: (1, 3)})}, [w], issued=0.5, acked=7.0)
