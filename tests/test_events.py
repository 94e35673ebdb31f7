"""The event stream of real daemons, through the real CLI.

The exact events of a split / resync / backup cycle at both ends, ``events
--follow`` showing a backup as it happens, and ``--since`` resuming without a
gap across a restart of the daemon (clean and ``kill -9``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitmirror.testing import ROOT, Site, wait_for

#: What identifies an event in these tests (time, seq and sizes vary).
FIELDS = ("kind", "pair", "op", "old_status", "status", "reason", "generation")


def events(site: Site, since: int = 0) -> list[dict[str, Any]]:
    out = site.cli("--json", "events", "--since", str(since)).stdout
    return [json.loads(line) for line in out.splitlines()]


def last_seq(site: Site) -> int:
    found = events(site)
    return int(found[-1]["seq"]) if found else 0


def brief(found: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The events without progress reports, as tuples of FIELDS."""
    return [tuple(str(e.get(f, "")) for f in FIELDS) for e in found if e["kind"] != "resync-progress"]


@pytest.fixture
def cycle_sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    for site in (primary, secondary):
        site.kill()


def test_split_resync_backup_cycle_emits_exactly_these_events(cycle_sites: tuple[Site, Site], tmp_path: Path) -> None:
    primary, secondary = cycle_sites
    data = tmp_path / "data"
    data.write_bytes(os.urandom(64 << 10))
    primary.cli("volume", "create", "db", "--size", "16M")
    primary.cli("pair", "create", "db-m", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    secondary.cli("pair", "create", "gen1", "--pvol", "db-r", "--svol", "db-s1", "--wait")
    p0, s0 = last_seq(primary), last_seq(secondary)

    primary.cli("write", "db", "--file", str(data))
    primary.cli("pair", "split", "db-m")
    primary.cli("write", "db", "--offset", "1M", "--file", str(data))
    primary.cli("pair", "resync", "db-m", "--wait")
    primary.cli("backup", "db-m", "--generation", "gen1", "--wait")
    primary.cli("write", "db", "--offset", "2M", "--file", str(data))
    primary.cli("backup", "db-m", "--generation", "gen1", "--wait")  # gen1 needs a resync first now

    at_primary = events(primary, p0)
    at_secondary = events(secondary, s0)
    assert [e["seq"] for e in at_primary] == list(range(p0 + 1, p0 + 1 + len(at_primary)))
    op = "operator"
    assert brief(at_primary) == [
        ("status", "db-m", "split", "DUPLEX", "SPLIT", op, ""),
        ("status", "db-m", "resync", "SPLIT", "COPY", op, ""),
        ("resync-start", "db-m", "forward", "", "", "", ""),
        ("resync-finish", "db-m", "forward", "", "", "done", ""),
        ("status", "db-m", "copy-done", "COPY", "DUPLEX", "copy complete", ""),
        ("backup", "db-m", "point", "", "", "", "gen1"),
        ("backup", "db-m", "done", "", "", "", "gen1"),
        ("backup", "db-m", "point", "", "", "", "gen1"),
        ("backup", "db-m", "done", "", "", "", "gen1"),
    ]
    start = next(e for e in at_primary if e["kind"] == "resync-start")
    assert start["tracks"] == 8 and start["peer"] == 2001  # the 64 KiB written while split
    by_backup = "backup of pair db-m"
    assert brief(at_secondary) == [
        ("status", "db-m", "split", "DUPLEX", "SPLIT", op, ""),
        ("status", "db-m", "resync", "SPLIT", "COPY", op, ""),
        ("status", "db-m", "copy-done", "COPY", "DUPLEX", "copy complete", ""),
        ("status", "gen1", "split", "DUPLEX", "SPLIT", by_backup, ""),
        ("backup", "db-m", "taken", "", "", "", "gen1"),
        ("status", "gen1", "resync", "SPLIT", "COPY", by_backup, ""),
        ("resync-start", "gen1", "forward", "", "", "", ""),
        ("resync-finish", "gen1", "forward", "", "", "done", ""),
        ("status", "gen1", "copy-done", "COPY", "DUPLEX", "copy complete", ""),
        ("status", "gen1", "split", "DUPLEX", "SPLIT", by_backup, ""),
        ("backup", "db-m", "taken", "", "", "", "gen1"),
    ]
    # pair display shows the newest backup of the remote pair at both ends.
    for site in (primary, secondary):
        row = site.pair_row("db-m")
        assert row["backup_time"] and 0 <= row["backup_age_seconds"] < 60, row
    assert "NEWEST BACKUP" in primary.cli("pair", "display").stdout


class Follower:
    """``splitmirror events --follow --json`` in the background, lines collected as they come."""

    def __init__(self, site: Site, since: int = 0) -> None:
        env = dict(os.environ, SPLITMIRROR_SERVER=site.address)
        self.proc = subprocess.Popen([sys.executable, "-m", "client", "events", "--follow", "--json", "--since",
                                      str(since)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        found: dict[str, Any] = wait_for(lambda: next((e for e in self.lines if predicate(e)), None), timeout,
                                         what="an event in the follower's output")
        return found

    def end(self, timeout: float = 20.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        return code


def test_follow_shows_a_backup_as_it_happens(cycle_sites: tuple[Site, Site]) -> None:
    primary, secondary = cycle_sites
    primary.cli("volume", "create", "db", "--size", "8M")
    primary.cli("pair", "create", "db-m", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    secondary.cli("pair", "create", "gen1", "--pvol", "db-r", "--svol", "db-s1", "--wait")
    follower = Follower(primary, last_seq(primary))
    try:
        time.sleep(0.5)  # attached before the backup starts
        started = time.monotonic()
        primary.cli("backup", "db-m", "--wait")
        done = follower.wait_for(lambda e: e["kind"] == "backup" and e["op"] == "done")
        point = follower.wait_for(lambda e: e["kind"] == "backup" and e["op"] == "point")
        assert point["seq"] < done["seq"] and done["generation"] == "gen1"
        assert done["timestamp"] >= time.time() - (time.monotonic() - started) - 1
    finally:
        follower.proc.terminate()
        follower.end()


@pytest.mark.parametrize("how", ["clean", "kill"])
def test_since_resumes_without_a_gap_across_a_restart(cycle_sites: tuple[Site, Site], how: str) -> None:
    primary, _secondary = cycle_sites
    primary.cli("volume", "create", "db", "--size", "8M")
    primary.cli("pair", "create", "db-m", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    follower = Follower(primary)
    follower.wait_for(lambda e: e.get("status") == "DUPLEX")
    primary.cli("pair", "split", "db-m")
    follower.wait_for(lambda e: e.get("status") == "SPLIT")
    if how == "clean":
        primary.stop()
        assert follower.end() == 0  # the stream ends with the daemon
    else:
        primary.kill()
        assert follower.end() != 0  # the stream broke
    seen = follower.lines
    last = seen[-1]["seq"]
    primary.start()
    primary.cli("pair", "resync", "db-m", "--wait")
    after = events(primary, last)
    assert after, "no event after the restart"
    assert [e["seq"] for e in after] == list(range(last + 1, last + 1 + len(after)))  # no gap, no reuse
    assert any(e["kind"] == "link-up" for e in after)
    assert brief(after)[-3:] == [("resync-start", "db-m", "forward", "", "", "", ""),
                                 ("resync-finish", "db-m", "forward", "", "", "done", ""),
                                 ("status", "db-m", "copy-done", "COPY", "DUPLEX", "copy complete", "")]
    # What the follower was shown is exactly what the copy table kept.
    assert events(primary)[:len(seen)] == seen
