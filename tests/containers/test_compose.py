"""The three sites of docker-compose.yml, cut and killed.

- happy path: the compose demo's scenario (ext4 volumes, fan-in pairs, a
  backup, damaged files, restore files, restore volume), data checked at
  every step;
- partition: the secondary leaves the interconnect network while host A
  writes: the sync pair goes SUSPENDED within the link timeout, writes go on
  and are tracked; back on the network: automatic resync, identical volumes;
- node loss: ``docker kill -s KILL`` of the secondary during writes, then
  during a backup; after a restart the pair converges without a full copy
  and the previous backup generation is intact;
- primary loss: primary A killed mid-write, restarted, converges; site C's
  pair never notices;
- TLS: the deployment runs with mutual TLS; clients without a certificate
  (host API, NBD, interconnect) or with one of another CA are refused.

Writers run inside the host containers (the ``client`` library, with the
host's TLS identity from its environment), one 8 KiB write in flight, each
block stamped with (tag, block, sequence) so that the volumes can be checked
for every acknowledged write afterwards.  Watchers poll a pair's status
every 0.1 s and print each change with its time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

from tests.containers import compose_demo
from tests.containers.conftest import LINK_TIMEOUT

Compose = compose_demo.Compose

pytestmark = pytest.mark.timeout(900)

MiB = 1 << 20
BLOCK = 8192                      # = the track size: one stamped block per track
VOLUME = "64M"
VOLUME_TRACKS = 64 * MiB // BLOCK
REGION = 6 * MiB                  # the writers' region: 4 MiB across the 4 MiB extent boundary at 8 MiB
REGION_BLOCKS = 4 * MiB // BLOCK
EXTENT_TRACKS = 4 * MiB // BLOCK  # a write-intent extent
#: Extents a crash may leave marked in the region (hence tracks a resync may copy).
REGION_EXTENT_TRACKS = 2 * EXTENT_TRACKS
#: On top of the link timeout: keepalive period, scheduling on a loaded 2-core machine.
SLACK = 4.0

# -- processes inside the host containers ------------------------------------------------------

WRITER = r"""
import asyncio, hashlib, os, random, struct, sys, time
from client import Client
server, volume, start, blocks, tag, stop, limit = sys.argv[1:8]
start, blocks, tag, limit = int(start), int(blocks), int(tag), float(limit)
HEAD = struct.Struct("<8sQQQ")

def stamp(block, seq):
    head = HEAD.pack(b"SMSTAMP1", tag, block, seq)
    filler = hashlib.blake2b(head, digest_size=64).digest()
    return head + (filler * 128)[: 8192 - len(head)]

TLS = dict(tls_dir=os.environ.get("SPLITMIRROR_TLS_DIR") or None,
           identity=os.environ.get("SPLITMIRROR_IDENTITY") or "admin")

async def main():
    rng = random.Random(tag)
    seq, end = 0, time.time() + limit
    client = Client(server, timeout=60, connect_timeout=3, **TLS)
    while not os.path.exists(stop) and time.time() < end:
        seq += 1
        block = rng.randrange(blocks)
        t0 = time.time()
        try:
            await client.write(volume, start + block * 8192, stamp(block, seq))
            print(f"W {seq} {block} {t0:.6f} {time.time():.6f}", flush=True)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
            print(f"E {seq} {block} {t0:.6f} {time.time():.6f} {why}", flush=True)
            await client.close()
            client = Client(server, timeout=60, connect_timeout=3, **TLS)
            await asyncio.sleep(0.2)
    await client.close()
    print("DONE", flush=True)

asyncio.run(main())
"""

WATCHER = r"""
import asyncio, os, sys, time
from client import Client
server, pair, stop, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
TLS = dict(tls_dir=os.environ.get("SPLITMIRROR_TLS_DIR") or None,
           identity=os.environ.get("SPLITMIRROR_IDENTITY") or "admin")

async def main():
    last, end = None, time.time() + limit
    client = Client(server, timeout=5, connect_timeout=2, **TLS)
    while not os.path.exists(stop) and time.time() < end:
        try:
            rows = await client.display_pairs(pair)
            status = ",".join(sorted(f"{'P' if r.primary else 'S'}:{r.status}" for r in rows if r.pair == pair))
        except Exception as exc:
            status = f"ERROR:{type(exc).__name__}"
            await client.close()
            client = Client(server, timeout=5, connect_timeout=2, **TLS)
        if status != last:
            print(f"{time.time():.6f} {status}", flush=True)
            last = status
        await asyncio.sleep(0.1)
    await client.close()
    print("DONE", flush=True)

asyncio.run(main())
"""


_instances = itertools.count(1)


class Background:
    """A script running in a host container until its stop file appears; stdout lines collected live."""

    def __init__(self, compose: Compose, host: str, name: str, script: str, *args: str,
                 limit: float = 300) -> None:
        self.compose = compose
        self.host = host
        self.stop_file = f"/tmp/stop-{name}-{next(_instances)}"
        server = "{}:{}".format(*compose_demo.SITES[host])
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by stop()
        self.proc = compose.popen(host, "python3", "-c", script, server, *args, self.stop_file, str(limit),
                                  stderr=self._stderr)
        self.lines: list[str] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.compose.exec(self.host, "touch", self.stop_file, check=False)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        self._stderr.seek(0)
        self.stderr = self._stderr.read()
        self._stderr.close()
        assert self.lines and self.lines[-1] == "DONE", (
            f"{self.host}: background script did not finish cleanly: {self.lines[-3:]} {self.stderr[-2000:]}")


@dataclasses.dataclass
class Write:
    seq: int
    block: int
    issued: float
    done: float
    error: str = ""


class Writer(Background):
    def __init__(self, compose: Compose, host: str, volume: str, tag: int, region: int = REGION) -> None:
        self.tag = tag
        self.volume = volume
        self.region = region
        super().__init__(compose, host, f"writer-{tag}", WRITER, volume, str(region), str(REGION_BLOCKS), str(tag))

    def writes(self) -> list[Write]:
        out = []
        for line in list(self.lines):
            parts = line.split(" ", 5)
            if parts[0] in ("W", "E"):
                out.append(Write(int(parts[1]), int(parts[2]), float(parts[3]), float(parts[4]),
                                 parts[5] if parts[0] == "E" else ""))
        return out

    def acked(self) -> list[Write]:
        return [w for w in self.writes() if not w.error]

    def errors(self) -> list[Write]:
        return [w for w in self.writes() if w.error]

    def acked_during(self, start: float, end: float) -> int:
        return sum(1 for w in self.acked() if start < w.done < end)

    def max_latency(self) -> float:
        return max((w.done - w.issued for w in self.acked()), default=0.0)

    def wait_acked(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked()) < count:
            assert time.monotonic() < deadline, f"writer {self.tag}: only {len(self.acked())} writes acknowledged"
            time.sleep(0.1)

    def check_volume(self, host: str, volume: str) -> int:
        """Every block of the region holds its latest acknowledged write (or a
        newer one that was issued), untorn.  Returns the number of blocks checked."""
        image = self.compose.cli(host, "read", volume, "--offset", str(self.region),
                                 "--length", str(REGION_BLOCKS * BLOCK)).stdout
        assert len(image) == REGION_BLOCKS * BLOCK, f"{volume} at {host}: short read"
        latest: dict[int, int] = {}
        issued: dict[int, set[int]] = {}
        for w in self.writes():
            issued.setdefault(w.block, set()).add(w.seq)
            if not w.error:
                latest[w.block] = max(latest.get(w.block, 0), w.seq)
        head = struct.Struct("<8sQQQ")
        for block in range(REGION_BLOCKS):
            data = image[block * BLOCK:(block + 1) * BLOCK]
            if data == bytes(BLOCK):
                seq = 0
            else:
                magic, tag, bblock, seq = head.unpack_from(data)
                assert (magic, tag, bblock) == (b"SMSTAMP1", self.tag, block), (
                    f"{volume} at {host}: block {block} holds a foreign stamp {(magic, tag, bblock, seq)}")
                filler = hashlib.blake2b(data[:head.size], digest_size=64).digest()
                assert data[head.size:] == (filler * 128)[: BLOCK - head.size], (
                    f"{volume} at {host}: block {block} is torn (seq {seq})")
            assert seq >= latest.get(block, 0), (
                f"{volume} at {host}: block {block} holds seq {seq}, older than the acknowledged "
                f"seq {latest[block]}: an acknowledged write was lost")
            assert seq == 0 or seq in issued.get(block, set()), (
                f"{volume} at {host}: block {block} holds seq {seq}, which was never issued")
        return REGION_BLOCKS


class Watcher(Background):
    def __init__(self, compose: Compose, host: str, pair: str) -> None:
        self.pair = pair
        super().__init__(compose, host, f"watch-{pair}", WATCHER, pair)

    def changes(self) -> list[tuple[float, str]]:
        out = []
        for line in list(self.lines):
            t, _, status = line.partition(" ")
            if status:
                out.append((float(t), status))
        return out

    def statuses(self) -> set[str]:
        return {status for _, status in self.changes()}

    def wait_for(self, status: str, after: float, timeout: float) -> float:
        """The time at which the pair turned ``status`` after ``after``; fails past the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for t, seen in self.changes():
                if t >= after and status in seen.split(","):
                    return t
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.host}: pair {self.pair} not {status} {timeout:g}s after the event: "
                                     f"{self.changes()[-5:]}")
            time.sleep(0.05)


@contextmanager
def background(*procs: Background) -> Iterator[None]:
    """Stop the scripts when the block ends (also on failure)."""
    try:
        yield
    except BaseException:
        for proc in procs:
            with suppress(Exception):
                proc.stop()
        raise
    for proc in procs:
        proc.stop()


def remote_pair(c: Compose, host: str, volume: str, pair: str, size: str = VOLUME) -> None:
    c.cli(host, "volume", "create", volume, "--size", size)
    c.cli(host, "pair", "create", pair, "--pvol", volume, "--svol", f"{volume}-r", "--peer", "2001", "--wait",
          "--timeout", "60")


def resync_tracks(c: Compose, host: str, pair: str) -> int:
    return int(c.pair_stats(host, pair).get("resync_tracks_sent", 0))


def assert_identical(c: Compose, host: str, pvol: str, writer: Writer | None = None) -> str:
    """PVOL (at the primary) and SPVOL (at the secondary) have the same checksum, and hold every acknowledged write."""
    c.wait_status(host, f"{pvol}-mirror", ["DUPLEX"], timeout=60)
    c.wait_status("host-b", f"{pvol}-mirror", ["DUPLEX"], timeout=30, primary=None)
    digest = c.checksum(host, pvol)
    assert c.checksum("host-b", f"{pvol}-r") == digest, f"{pvol}: PVOL and SPVOL differ after convergence"
    if writer is not None:
        writer.check_volume(host, pvol)
        writer.check_volume("host-b", f"{pvol}-r")
    return digest


def follow_log(c: Compose, service: str, needle: tuple[str, ...]) -> tuple[threading.Event, subprocess.Popen[str]]:
    """An event set as soon as a new log line of ``service`` contains every string of ``needle``."""
    event = threading.Event()
    proc = subprocess.Popen(["docker", "logs", "-f", "--tail", "0", c.container(service)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def scan() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if all(n in line for n in needle):
                event.set()

    threading.Thread(target=scan, daemon=True).start()
    time.sleep(0.5)  # attached before what it waits for starts
    return event, proc


# -- the tests ------------------------------------------------------------------------------------


def test_happy_path(sites: Compose) -> None:
    timings = compose_demo.run_scenario(sites, out=sys.stdout)
    print("scenario steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def test_partition_suspends_then_resyncs(sites: Compose) -> None:
    c = sites
    remote_pair(c, "host-a", "db", "db-mirror")
    writer = Writer(c, "host-a", "db", tag=11)
    watcher = Watcher(c, "host-a", "db-mirror")
    with background(writer, watcher):
        writer.wait_acked(50)
        before = resync_tracks(c, "host-a", "db-mirror")
        cut = time.time()
        network = c.disconnect("secondary", "interconnect")
        try:
            suspended = watcher.wait_for("P:SUSPENDED", cut, LINK_TIMEOUT + SLACK)
            print(f"SUSPENDED {suspended - cut:.2f}s after the cut (link timeout {LINK_TIMEOUT:g}s)")
            time.sleep(3)
            row = c.pair_row("host-a", "db-mirror")
            assert row["status"] == "SUSPENDED" and row["pending_tracks"] > 0, row
            mirror = c.pair_row("host-b", "db-mirror")
            assert mirror["pending_tracks"] == 0, f"the SPVOL took no host write, yet: {mirror}"
            during = writer.acked_during(suspended, time.time())
            assert during > 10, f"only {during} writes acknowledged while the pair was SUSPENDED"
            assert not writer.errors(), writer.errors()[:3]
        finally:
            healed = time.time()
            c.connect("secondary", network)
        try:
            duplex = watcher.wait_for("P:DUPLEX", healed, 60)
        except AssertionError as exc:
            why = [line for line in c.logs("primary-a").splitlines() if "db-mirror" in line][-3:]
            raise AssertionError(f"{exc}\nprimary-a: " + "\nprimary-a: ".join(why)) from None
        print(f"DUPLEX again {duplex - healed:.2f}s after reconnecting; {during} writes while SUSPENDED; "
              f"longest write {writer.max_latency():.2f}s")
        writer.wait_acked(len(writer.acked()) + 20)
    assert writer.max_latency() <= LINK_TIMEOUT + SLACK, f"a write blocked {writer.max_latency():.2f}s"
    assert not writer.errors(), writer.errors()[:3]
    assert_identical(c, "host-a", "db", writer)
    copied = resync_tracks(c, "host-a", "db-mirror") - before
    print(f"resync after the partition copied {copied} tracks of {VOLUME_TRACKS}")
    assert 0 < copied <= REGION_BLOCKS, f"the resync copied {copied} tracks; only the writers' region changed"


def test_secondary_loss_during_writes_and_backup(sites: Compose) -> None:
    c = sites
    remote_pair(c, "host-a", "db", "db-mirror", size="256M")
    for gen in ("db-gen1", "db-gen2"):
        c.cli("host-b", "pair", "create", gen, "--pvol", "db-r", "--svol", gen.replace("gen", "svol"), "--wait")
    c.exec("host-a", "sh", "-c", "head -c 32M /dev/urandom > /root/bulk1 && head -c 160M /dev/urandom > /root/bulk2")
    c.cli("host-a", "write", "db", "--offset", "16M", "--file", "/root/bulk1")
    c.cli("host-a", "backup", "db-mirror", "--generation", "db-gen1", "--wait")
    gen1 = c.checksum("host-b", "db-svol1")
    assert gen1 == c.checksum("host-a", "db")

    # 1. kill -9 of the secondary while host A writes
    writer = Writer(c, "host-a", "db", tag=21)
    watcher = Watcher(c, "host-a", "db-mirror")
    with background(writer, watcher):
        writer.wait_acked(50)
        before = resync_tracks(c, "host-a", "db-mirror")
        killed = time.time()
        c.kill("secondary")
        suspended = watcher.wait_for("P:SUSPENDED", killed, LINK_TIMEOUT + SLACK)
        time.sleep(2)
        restarted = time.time()
        healthy = c.start("secondary")
        duplex = watcher.wait_for("P:DUPLEX", restarted, 90)
        print(f"secondary killed: SUSPENDED after {suspended - killed:.2f}s, healthy {healthy:.1f}s after "
              f"docker start, DUPLEX {duplex - restarted:.2f}s after it; "
              f"{writer.acked_during(suspended, restarted)} writes while it was down")
        assert writer.acked_during(suspended, restarted) > 10, "writes did not go on while the secondary was down"
        writer.wait_acked(len(writer.acked()) + 20)
    assert not writer.errors(), writer.errors()[:3]
    assert writer.max_latency() <= LINK_TIMEOUT + SLACK, f"a write blocked {writer.max_latency():.2f}s"
    assert_identical(c, "host-a", "db", writer)
    copied = resync_tracks(c, "host-a", "db-mirror") - before
    print(f"resync after the secondary's crash copied {copied} tracks of {4 * VOLUME_TRACKS}")
    assert 0 < copied <= REGION_EXTENT_TRACKS, f"the resync copied {copied} tracks: more than the written extents"
    assert c.checksum("host-b", "db-svol1") == gen1, "backup generation db-gen1 changed"

    # 2. kill -9 of the secondary in the middle of a backup: db-gen1 is the
    # generation with the oldest backup, so the backup uses it, and must
    # first resync the 160 MiB written since (bulk2: a window of ~1 s for the
    # kill); db-gen2 is the previous backup, which must come out intact.
    c.cli("host-a", "backup", "db-mirror", "--generation", "db-gen2", "--wait")
    gen2 = c.checksum("host-b", "db-svol2")
    gen2_row = {g["local_pair"]: g for g in c.cli_json("host-b", "backups", "db-mirror")}["db-gen2"]
    c.cli("host-a", "write", "db", "--offset", "64M", "--file", "/root/bulk2")
    time.sleep(3)  # the write-intent extents of bulk2 go idle and are cleared
    writer = Writer(c, "host-a", "db", tag=22, region=REGION + 4 * MiB)  # 10-14 MiB: two extents again
    watcher = Watcher(c, "host-a", "db-mirror")
    with background(writer, watcher):
        writer.wait_acked(50)
        before = resync_tracks(c, "host-a", "db-mirror")
        copying, logs = follow_log(c, "secondary", ("db-gen1", "-> COPY"))
        try:
            backup = c.popen("host-a", "splitmirror", "backup", "db-mirror", "--wait")
            caught = copying.wait(30)
            killed = time.time()
            c.kill("secondary")
        finally:
            logs.kill()
            logs.wait()
        out, err = backup.communicate(timeout=60)
        print(f"backup during the crash: exit {backup.returncode}: {(out + err).strip()[-300:]}; killed "
              f"{'while db-gen1 was copying' if caught else 'after 30s without seeing the copy start'}")
        assert caught, "the backup never started to bring db-gen1 in sync"
        assert backup.returncode != 0, "the backup finished before the secondary was killed"
        watcher.wait_for("P:SUSPENDED", killed, LINK_TIMEOUT + SLACK)
        restarted = time.time()
        c.start("secondary")
        watcher.wait_for("P:DUPLEX", restarted, 90)
        writer.wait_acked(len(writer.acked()) + 20)
    assert not writer.errors(), writer.errors()[:3]
    assert_identical(c, "host-a", "db", writer)
    copied = resync_tracks(c, "host-a", "db-mirror") - before
    print(f"resync after the crash during the backup copied {copied} tracks of {4 * VOLUME_TRACKS}")
    assert 0 < copied <= REGION_EXTENT_TRACKS, f"the resync copied {copied} tracks: more than the written extents"
    gens = {g["local_pair"]: g for g in c.cli_json("host-b", "backups", "db-mirror")}
    assert c.checksum("host-b", "db-svol2") == gen2, "the previous backup generation db-gen2 changed"
    assert gens["db-gen2"]["status"] == "SPLIT" and gens["db-gen2"]["backup_time"] == gen2_row["backup_time"], gens

    # A backup after the recovery holds exactly the volume (no writer now).
    result = c.cli_json("host-a", "backup", "db-mirror", "--wait")["backups"][0]
    svol = result["svol"]
    assert c.checksum("host-b", svol) == c.checksum("host-a", "db"), f"{svol} is not the volume as of the backup"
    if result["generation"] != "db-gen2":
        assert c.checksum("host-b", "db-svol2") == gen2


def test_primary_loss_leaves_other_primary_alone(sites: Compose) -> None:
    c = sites
    remote_pair(c, "host-a", "db", "db-mirror")
    remote_pair(c, "host-c", "cdb", "cdb-mirror")
    writer_a = Writer(c, "host-a", "db", tag=31)
    writer_c = Writer(c, "host-c", "cdb", tag=32)
    watch_a = Watcher(c, "host-b", "db-mirror")       # site A's pair, seen from the secondary
    watch_c = Watcher(c, "host-c", "cdb-mirror")      # site C's pair, at its primary
    watch_cb = Watcher(c, "host-b", "cdb-mirror")     # ... and at the secondary
    with background(writer_a, writer_c, watch_a, watch_c, watch_cb):
        writer_a.wait_acked(50)
        writer_c.wait_acked(50)
        killed = time.time()
        c.kill("primary-a")
        lost = watch_a.wait_for("S:SUSPENDED", killed, LINK_TIMEOUT + SLACK)
        time.sleep(2)
        restarted = time.time()
        healthy = c.start("primary-a")
        c.wait_status("host-a", "db-mirror", ["DUPLEX"], timeout=90)
        back = time.time()
        print(f"primary-a killed: the secondary saw it lost after {lost - killed:.2f}s; healthy {healthy:.1f}s "
              f"after docker start; DUPLEX {back - restarted:.1f}s after it")
        writer_a.wait_acked(len(writer_a.acked()) + 20, timeout=60)
        writer_c.wait_acked(len(writer_c.acked()) + 20)
    acked_before_kill = [w for w in writer_a.acked() if w.done < killed]
    assert acked_before_kill and writer_a.acked_during(back, time.time() + 1), "host A's writes did not resume"
    assert_identical(c, "host-a", "db", writer_a)
    copied = resync_tracks(c, "host-a", "db-mirror")  # counters of the restarted primaryd
    print(f"after the primary's crash the resync copied {copied} tracks of {VOLUME_TRACKS}")
    assert copied <= REGION_EXTENT_TRACKS, f"the resync copied {copied} tracks: more than the written extents"

    print(f"site C meanwhile: {len(writer_c.acked())} writes, none failed, longest {writer_c.max_latency():.3f}s")
    assert watch_c.statuses() == {"P:DUPLEX"}, f"site C's pair changed status: {watch_c.changes()}"
    assert watch_cb.statuses() == {"S:DUPLEX"}, f"site C's pair changed at the secondary: {watch_cb.changes()}"
    assert not writer_c.errors(), writer_c.errors()[:3]
    assert writer_c.acked_during(killed, back) > 10, "site C's writes stalled while primary-a was down"
    assert writer_c.max_latency() < LINK_TIMEOUT, f"a site C write took {writer_c.max_latency():.2f}s"
    assert_identical(c, "host-c", "cdb", writer_c)


def test_tls_refuses_plaintext_and_foreign_clients(sites: Compose) -> None:
    """The deployment is TLS by default: every daemon runs with --tls-dir /tls,
    and a client without a certificate of the deployment's CA gets nothing,
    on the host API, on NBD and on the interconnect."""
    c = sites
    for daemon in ("primary-a", "primary-c", "secondary"):
        assert "mutual TLS from /tls" in c.logs(daemon), f"{daemon} does not run with --tls-dir /tls"
    assert c.exec("host-a", "test", "-e", "/tls/ca.key", check=False).returncode != 0, (
        "the CA's private key is visible in a host container")

    # Host API: the host's own identity works, no certificate or a foreign CA's does not.
    c.cli("host-a", "volume", "create", "v", "--size", "16M")
    for host, server in (("host-a", "primary-a:7001"), ("host-b", "secondary:7101")):
        proc = c.exec(host, "splitmirror", "volume", "list", env=compose_demo.PLAINTEXT, check=False)
        assert proc.returncode != 0, f"{server} answered a host API client without TLS: {proc.stdout!r}"
        print(f"[{host}] plaintext host API client: {proc.stderr.decode().strip()}")
    # A client certificate of another CA (the client trusts the deployment's
    # CA, so it is the server that must say no).
    c.exec("host-a", "sh", "-ec", "splitmirror certs init /root/other-ca --systems 1001 --clients admin >/dev/null"
           " && mkdir /root/foreign && cp /tls/ca.pem /root/other-ca/client-admin.* /root/foreign/")
    proc = c.exec("host-a", "splitmirror", "volume", "list", env={"SPLITMIRROR_TLS_DIR": "/root/foreign"},
                  check=False)
    assert proc.returncode != 0, f"primary-a answered a client certificate of another CA: {proc.stdout!r}"
    print(f"[host-a] client certificate of another CA: {proc.stderr.decode().strip()}")

    # NBD: STARTTLS with a host or admin certificate, nothing else.
    tls_url = compose_demo.nbd_url("host-a", "v")
    assert tls_url.startswith("nbds://")
    size = c.exec("host-a", "nbdinfo", "--size", tls_url).stdout.decode().strip()
    assert size == str(16 << 20), f"nbdinfo over TLS: {size!r}"
    for url, who in (("nbd://primary-a:10809/v", "a plaintext NBD client"),
                     ("nbds://primary-a:10809/v?tls-certificates=/tls/nbd-viewer", "a viewer certificate")):
        proc = c.exec("host-a", "nbdinfo", "--size", url, check=False)
        assert proc.returncode != 0, f"primary-a let {who} attach an export: {proc.stdout!r}"
        print(f"[host-a] NBD, {who}: {proc.stderr.decode().strip().splitlines()[0]}")

    # Interconnect (reached from the secondary, the only other member of that
    # network) and the health service: plaintext is refused, the healthcheck's
    # TLS probe and grpcio agree.
    for service, address, tls in (("secondary", "primary-a:7002", False), ("secondary", "primary-c:7002", False),
                                  ("primary-a", "127.0.0.1:7001", False), ("primary-a", "127.0.0.1:7001", True)):
        for grpc in (False, True):
            argv = ["splitmirror-healthcheck", address, "--timeout", "4",
                    *(["--tls-dir", "/tls"] if tls else []), *(["--grpc"] if grpc else [])]
            proc = c.exec(service, *argv, check=False)
            answer = proc.stdout.decode().strip()
            print(f"[{service}] {' '.join(argv[1:])}: {answer}")
            if tls:
                assert proc.returncode == 0 and answer.endswith("SERVING"), answer
            else:
                assert proc.returncode != 0 and "unhealthy" in answer, f"{address} answered in plaintext: {answer}"

    # tls-init again (as a second `up` does): it keeps the certificates.
    ca = c.exec("host-a", "sha256sum", "/tls/ca.pem").stdout
    rerun = compose_demo.run(["docker", "start", "-a", c.container("tls-init")], stderr_too=True)
    assert "keeping" in rerun, rerun
    assert c.exec("host-a", "sha256sum", "/tls/ca.pem").stdout == ca, "tls-init replaced the CA"
    c.cli("host-a", "volume", "show", "v")
