"""Progress of long operations through the real CLI: a line every few seconds
when stderr is not a terminal (tests set the interval lower), progress objects
with --json; rate and ETA in both."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.testing import ROOT, Site
from tests.faultproxy import ProxyPair

MiB = 1 << 20
START_TIMEOUT = 60
#: ``pair p: COPY 37.5% 12.0 MiB/s ETA 0:00:05``
LINE = re.compile(r"^pair (\S+): (COPY|verify) \d+(\.\d+)?% \d+(\.\d)? ?(B|KiB|MiB|GiB)/s ETA (-|\d+:\d\d:\d\d)$")


def run(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SPLITMIRROR_SERVER=site.address, SPLITMIRROR_PROGRESS_INTERVAL="0.1")
    result = subprocess.run([sys.executable, "-m", "client", *args], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def slow_link(tmp_path: Path) -> Iterator[tuple[Site, Site, ProxyPair]]:
    """Two sites whose interconnect adds latency, so that copies and verifies take a while."""
    primary = Site("primary", 1001, tmp_path, link_timeout=5.0)
    secondary = Site("secondary", 2001, tmp_path, link_timeout=5.0)
    primary.peer_with(secondary)
    proxies = ProxyPair(primary, secondary)
    try:
        secondary.start(timeout=START_TIMEOUT)
        primary.start(timeout=START_TIMEOUT)
        yield primary, secondary, proxies
    finally:
        for site in (primary, secondary):
            site.kill()
        proxies.close()


def test_copy_and_verify_progress(slow_link: tuple[Site, Site, ProxyPair], tmp_path: Path) -> None:
    primary, secondary, proxies = slow_link
    for site, name in ((primary, "v"), (secondary, "v-r"), (primary, "w"), (secondary, "w-r")):
        site.cli("volume", "create", name, "--size", "512M")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(24 * MiB))
    primary.cli("write", "v", "--file", str(data))
    primary.cli("write", "w", "--file", str(data))
    proxies.delay(0.05)

    created = run(primary, "pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
    lines = created.stderr.splitlines()
    copying = [line for line in lines if LINE.match(line)]
    assert copying and all("pair p: COPY" in line for line in copying), created.stderr
    assert lines[-1] == "pair p: DUPLEX 100.0%", created.stderr
    assert "DUPLEX" in created.stdout  # the result itself still goes to stdout

    # --json: progress objects on stderr, the result on stdout.
    waited = run(primary, "--json", "pair", "create", "q", "--pvol", "w", "--svol", "w-r", "--peer", "2001", "--wait")
    objects = [json.loads(line) for line in waited.stderr.splitlines()]
    assert objects and all(set(o) >= {"pair", "progress", "rate_bytes_per_s", "eta_seconds"} for o in objects)
    assert any(o["progress"] is not None and 0 <= o["progress"] < 100 and o["rate_bytes_per_s"] >= 0
               for o in objects), objects
    assert json.loads(waited.stdout)[0]["status"] == "DUPLEX"

    proxies.delay(0.3)  # each 64 MiB step asks the mirror for its digests across the slow link
    verified = run(primary, "verify", "p")
    steps = [line for line in verified.stderr.splitlines() if LINE.match(line)]
    assert steps and all(line.startswith("pair p: verify ") for line in steps), verified.stderr
    assert "0 mismatching" in verified.stdout
    objects = [json.loads(line) for line in run(primary, "--json", "verify", "p").stderr.splitlines()]
    assert objects and all(o["activity"] == "verify" for o in objects), objects
    # Idle again: no activity left behind.
    assert "activity" not in primary.pair_row("p")


def test_backup_progress(tmp_path: Path) -> None:
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    try:
        secondary.start(timeout=START_TIMEOUT)
        primary.start(timeout=START_TIMEOUT)
        primary.cli("volume", "create", "v", "--size", "512M")
        primary.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
        secondary.cli("pair", "create", "g1", "--pvol", "v-r", "--svol", "v-s1", "--wait")
        run(primary, "backup", "p", "--wait")
        # The next backup into g1 first copies every track written since into it, at the secondary.
        data = tmp_path / "data"
        data.write_bytes(os.urandom(128 * MiB))
        (tmp_path / "small").write_bytes(os.urandom(8192))
        primary.cli("write", "v", "--file", str(data))
        result = run(primary, "backup", "p", "--wait")
        steps = [line for line in result.stderr.splitlines() if line.startswith("pair g1: backup ")]
        assert steps, result.stderr
        assert all(re.match(r"^pair g1: backup \d+\.\d+% .*/s ETA (-|\d+:\d\d:\d\d)$", line) for line in steps), steps
        assert "pair p: backup done in generation g1" in result.stdout
        # Restore the volume from g1 after a small change: the report speaks in sizes and a percentage
        # that is not rounded to 0.
        primary.cli("write", "v", "--offset", "300M", "--file", str(tmp_path / "small"))
        restored = run(secondary, "restore", "volume", "p", "--generation", "g1", "--yes")
        report = restored.stdout.splitlines()
        assert report[0] == "restored from g1 into pair p: /", restored.stdout
        found = re.match(r"^crossed the interconnect: (\d+) tracks \(([\d.]+ [KMG]iB), ([\d.]+)% of the "
                         r"512\.0 MiB volume\) in [\d.]+ [KMG]?i?B of data$", report[1])
        assert found, report
        assert int(found[1]) >= 1 and float(found[3]) > 0, report
    finally:
        for site in (primary, secondary):
            site.kill()


def test_terminal_shows_a_live_bar(slow_link: tuple[Site, Site, ProxyPair], tmp_path: Path) -> None:
    """stderr on a terminal: a bar redrawn in place with the rate and ETA, the result on stdout."""
    primary, _, proxies = slow_link
    primary.cli("volume", "create", "v", "--size", "256M")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(16 * MiB))
    primary.cli("write", "v", "--file", str(data))
    proxies.delay(0.05)
    leader, follower = pty.openpty()
    try:
        env = dict(os.environ, SPLITMIRROR_SERVER=primary.address, COLUMNS="120", TERM="xterm")
        proc = subprocess.Popen([sys.executable, "-m", "client", "pair", "create", "p", "--pvol", "v", "--svol",
                                 "v-r", "--peer", "2001", "--wait"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=follower, text=True)
        os.close(follower)
        follower = -1
        screen = b""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the other end closed
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0
    text = screen.decode(errors="replace")
    assert "\r" in text or "\x1b[" in text  # redrawn in place
    assert "pair p" in text, text
    assert re.search(r" \d+\.\d% .*\d+\.\d [KMG]iB/s ETA \d+:\d\d:\d\d", text), text
    assert "DUPLEX" in stdout
