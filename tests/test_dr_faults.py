"""kill -9 at every step of a swap and a takeover (issue 18).

Each case arms one crash point (``SPLITMIRROR_FAILPOINT``) in one daemon,
runs the command, restarts the killed daemon and waits for the pair to
settle.  Throughout, a watcher asks both daemons every few milliseconds
whether hosts may write their end: never may both.  At the end exactly one
end is primary, every write acknowledged before the fault (sync mode) is
on both ends, and the ends are identical.  A seeded schedule adds link
cuts and kills of either daemon around a swap and a takeover.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from client import Client
from splitmirror.testing import Site, wait_for, wait_status
from splitmirror.v1 import host_pb2, host_pb2_grpc
from tests.faultproxy import ProxyPair

MiB = 1 << 20
TRACK = 8192
SIZE = 16 * MiB


class Watcher:
    """Polls host_writable of both ends; remembers any moment both were writable."""

    def __init__(self, a: Site, b: Site) -> None:
        self.ends = [(a, "v"), (b, "v-r")]
        self.both: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _writable(self, site: Site, volume: str) -> bool:
        try:
            with grpc.insecure_channel(site.address) as channel:
                reply = host_pb2_grpc.HostApiStub(channel).GetVolume(host_pb2.VolumeRef(name=volume), timeout=0.5)
                return bool(reply.host_writable)
        except grpc.RpcError:
            return False  # down: writes nothing

    def _run(self) -> None:
        deadline = time.monotonic() + 1800
        while not self._stop.is_set() and time.monotonic() < deadline:
            states = [self._writable(site, vol) for site, vol in self.ends]
            self.samples += 1
            if all(states):
                self.both.append(time.strftime("%H:%M:%S"))
            self._stop.wait(0.02)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self.both, f"both ends host-writable at {self.both} ({self.samples} samples)"


#: Generous: on a loaded machine (the suite runs in parallel) a keepalive late
#: by a second must not look like a lost peer in the middle of a swap; each
#: case kills a daemon where it means to and waits for what follows, with no
#: assumption on how fast that goes.
LINK_TIMEOUT = 3.0
#: The longest any one step may take before the test says which step hung.
STEP = 90.0


@pytest.fixture
def dr_sites(tmp_path: Path) -> Iterator[tuple[Site, Site, ProxyPair]]:
    a = Site("primary", 1001, tmp_path, link_timeout=LINK_TIMEOUT)
    b = Site("secondary", 2001, tmp_path, link_timeout=LINK_TIMEOUT)
    a.peer_with(b)
    proxies = ProxyPair(a, b)
    yield a, b, proxies
    for site in (a, b):
        site.kill()
    proxies.close()


def start_armed(site: Site, failpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITMIRROR_FAILPOINT", failpoint)
    try:
        site.start(timeout=STEP)
    finally:
        monkeypatch.delenv("SPLITMIRROR_FAILPOINT")


def wait_killed(site: Site, failpoint: str, command: subprocess.CompletedProcess[str] | None = None) -> None:
    """The armed daemon died at ``failpoint`` (and nowhere else)."""
    assert site.proc is not None
    said = f"; the command said: {command.stderr.strip()!r}" if command is not None else ""
    try:
        site.proc.wait(STEP)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{site.role}d was not killed at failpoint {failpoint} within {STEP:g} s{said}; "
                             f"its log ends: {site.log()[-2000:]}") from None
    assert site.proc.returncode == -9, f"{site.role}d exited with {site.proc.returncode}, not at a failpoint{said}"
    assert f"failpoint {failpoint}: killing" in site.log(), f"{site.role}d was killed elsewhere{said}"


def wait_state(what: str, check: Callable[[], bool], show: Callable[[], object], timeout: float = STEP) -> None:
    """Wait for ``check``; on timeout say what was awaited and what was seen last."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last seen: {show()}")
        time.sleep(0.2)


async def setup_pair(a: Site, b: Site) -> bytes:
    a.cli("volume", "create", "v", "--size", "16M")
    a.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
    acked = os.urandom(2 * MiB)
    async with Client(a.address) as c:
        await c.write("v", MiB, acked)  # sync: on both ends once acknowledged
    return acked


async def settle(a: Site, b: Site, primary: Site, acked: bytes) -> None:
    """Exactly one primary; both DUPLEX (resync if an operator must); the data is there and identical."""
    mirror = b if primary is a else a
    pvol, mvol = ("v", "v-r") if primary is a else ("v-r", "v")

    def rows() -> object:
        return {site.system_id: (r["primary"], r["status"], r["epoch"], r.get("role_change"))
                for site in (a, b) for r in (site.pair_row("p"),)}

    def one_primary() -> bool:
        return primary.pair_row("p")["primary"] is True and mirror.pair_row("p")["primary"] is False

    wait_state(f"system {primary.system_id} to be the only primary", one_primary, rows)
    def resyncing() -> bool:
        # After a link cut or a restarted mirror the automatic resync may start
        # (and finish) while we look: a pair in COPY or DUPLEX needs no operator.
        if primary.pair_row("p")["status"] in ("COPY", "DUPLEX"):
            return True
        return primary.cli("pair", "resync", "p", check=False).returncode == 0

    if primary.pair_row("p")["status"] in ("SPLIT", "SUSPENDED"):
        wait_state("a resync to be accepted or to run by itself", resyncing, rows)
    wait_state("both ends DUPLEX", lambda: primary.pair_row("p")["status"] == mirror.pair_row("p")["status"]
               == "DUPLEX", rows)
    after = os.urandom(TRACK)
    async with Client(primary.address) as pc, Client(mirror.address) as mc:
        await pc.write(pvol, 10 * MiB, after)
        assert await mc.read(mvol, 10 * MiB, TRACK) == after
        assert await pc.read(pvol, MiB, len(acked)) == acked, "an acknowledged sync write was lost"
        assert await pc.checksum(pvol) == await mc.checksum(mvol)
        assert "being swapped" not in await _refusal(mc, mvol), "a finished swap still named"


def fenced(site: Site) -> bool:
    return bool(site.pair_row("p").get("fenced_by"))


async def _refusal(c: Client, volume: str) -> str:
    try:
        await c.write(volume, 0, b"x" * 512)
    except Exception as exc:
        return str(exc)
    raise AssertionError(f"the mirror end {volume} took a host write")


@pytest.mark.parametrize(("failpoint", "killed", "winner"), [
    ("swap-drained", "a", "a"),    # before anything changed: A stays primary
    ("swap-demoted", "a", "b"),    # A gave the role up (persisted): B takes it on contact
    ("swap-promote", "b", "b"),    # B died before taking it: takes it on restart
    ("swap-promoted", "b", "b"),   # B took it, A never heard: A learns on contact
])
async def test_kill_at_every_step_of_a_swap(dr_sites: tuple[Site, Site, ProxyPair], monkeypatch: pytest.MonkeyPatch,
                                            failpoint: str, killed: str, winner: str) -> None:
    a, b, _ = dr_sites
    sites = {"a": a, "b": b}
    for name in ("b", "a"):
        if name == killed:
            start_armed(sites[name], failpoint, monkeypatch)
        else:
            sites[name].start(timeout=STEP)
    acked = await setup_pair(a, b)
    with Watcher(a, b):
        cli = a.cli("pair", "swap", "p", check=False)
        assert cli.returncode == 1, f"the swap did not fail as a kill at {failpoint} makes it: {cli.stdout}"
        wait_killed(sites[killed], failpoint, cli)
        # Nobody learnt of a role change before the step that tells it: no
        # keepalive caught one in memory (the schedule is the same every run).
        survivor = b if killed == "a" else a
        assert survivor.pair_row("p")["primary"] is False, f"system {survivor.system_id} primary before the restart"
        sites[killed].start(timeout=STEP)
        await settle(a, b, sites[winner], acked)


@pytest.mark.parametrize("failpoint", ["takeover-decided", "takeover-saved"])
async def test_kill_during_a_takeover(dr_sites: tuple[Site, Site, ProxyPair], monkeypatch: pytest.MonkeyPatch,
                                      failpoint: str) -> None:
    a, b, _ = dr_sites
    start_armed(b, failpoint, monkeypatch)
    a.start(timeout=STEP)
    acked = await setup_pair(a, b)
    with Watcher(a, b):
        a.kill()  # site A lost
        wait_status(b, "p", ["SUSPENDED"], timeout=STEP)
        cli = b.cli("pair", "takeover", "p", check=False)
        assert cli.returncode == 1, f"the takeover did not fail as a kill at {failpoint} makes it: {cli.stdout}"
        wait_killed(b, failpoint, cli)
        b.start(timeout=STEP)
        if b.pair_row("p")["primary"] is False:  # nothing was persisted: take over again
            assert "takeover" in await _refusal(Client(b.address), "v-r")
            b.cli("pair", "takeover", "p")
        assert b.pair_row("p")["epoch"] == 2
        a.start(timeout=STEP)
        wait_for(lambda: a.pair_row("p").get("fenced_by") == 2001, STEP, 0.2, "the old primary to fence itself")
        await settle(a, b, b, acked)


async def test_kill_while_the_old_primary_fences(dr_sites: tuple[Site, Site, ProxyPair],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, _ = dr_sites
    b.start(timeout=STEP)
    a.start(timeout=STEP)
    acked = await setup_pair(a, b)
    with Watcher(a, b):
        a.kill()
        wait_status(b, "p", ["SUSPENDED"], timeout=STEP)
        b.cli("pair", "takeover", "p")
        with pytest.raises(RuntimeError):
            start_armed(a, "fence-closed", monkeypatch)  # fences at start, before serving: killed there
        wait_killed(a, "fence-closed")
        a.start(timeout=STEP)
        assert a.pair_row("p")["fenced_by"] == 2001 and a.pair_row("p")["primary"] is False
        await settle(a, b, b, acked)


@pytest.mark.parametrize("seed", [1801, 1802, 1803])
async def test_seeded_fault_schedule(dr_sites: tuple[Site, Site, ProxyPair], seed: int) -> None:
    """A bounded random schedule: writes, link cuts, kill -9 of either daemon, swaps and a takeover."""
    a, b, proxies = dr_sites
    rng = random.Random(seed)
    b.start(timeout=STEP)
    a.start(timeout=STEP)
    acked = await setup_pair(a, b)
    primary, mirror = a, b
    pvol = "v"
    with Watcher(a, b):
        for _step in range(4):
            action = rng.choice(["swap", "swap", "kill-mirror", "cut", "takeover"])
            data = rng.randbytes(TRACK)
            offset = rng.randrange(0, 8) * TRACK  # below the acknowledged region at 1 MiB
            async with Client(primary.address) as c:
                await c.write(pvol, offset, data)
            if action == "swap":
                primary.cli("pair", "swap", "p")
                primary, mirror = mirror, primary
            elif action == "kill-mirror":
                mirror.kill()
                mirror.start(timeout=STEP)
            elif action == "cut":
                proxies.cut()
                await asyncio.sleep(rng.uniform(0.2, 2.5) * LINK_TIMEOUT)  # often long enough to lose the peer
                proxies.heal()
            else:  # the primary site is lost; the mirror takes over; the old one comes back fenced
                primary.kill()
                wait_status(mirror, "p", ["SUSPENDED"], timeout=STEP)
                mirror.cli("pair", "takeover", "p")
                primary.start(timeout=STEP)
                wait_for(functools.partial(fenced, primary), STEP, 0.2, "the fence")
                primary, mirror = mirror, primary
            pvol = "v" if primary is a else "v-r"
            await settle(a, b, primary, acked)
            async with Client(primary.address) as c:
                assert await c.read(pvol, offset, TRACK) == data, f"step {_step} ({action}): a write was lost"
