"""Disaster recovery across containers (issue 18): docker-compose.yml's three sites.

Site A's container is killed; site B takes A's pair over while site C's
pair keeps mirroring into the same secondary (fan-in); hosts at B write;
site A is started again and fences itself; B resyncs A by bitmap; a swap
(issued at site A) brings production home.  Each host reaches only its own
site's daemon, over mutual TLS, as in production.
"""

from __future__ import annotations

import pytest

from tests.containers import compose_demo
from tests.containers.test_compose import remote_pair

Compose = compose_demo.Compose

pytestmark = pytest.mark.timeout(900)

MiB = 1 << 20


def write_random(c: Compose, host: str, volume: str, offset: int, length: int, seed: int) -> str:
    """Write ``length`` seeded bytes at ``offset`` from inside ``host``; returns their sha256."""
    script = (f"python3 -c \"import random,sys; sys.stdout.buffer.write(random.Random({seed}).randbytes({length}))\" "
              f"> /tmp/w{seed} && splitmirror write {volume} --offset {offset} --file /tmp/w{seed} >/dev/null "
              f"&& sha256sum < /tmp/w{seed}")
    return c.exec(host, "sh", "-c", script).stdout.decode().split()[0]


def read_sha(c: Compose, host: str, volume: str, offset: int, length: int) -> str:
    script = f"splitmirror read {volume} --offset {offset} --length {length} | sha256sum"
    return c.exec(host, "sh", "-c", script).stdout.decode().split()[0]


def test_takeover_at_site_b_then_failback_by_swap(sites: Compose) -> None:
    c = sites
    remote_pair(c, "host-a", "db", "db-mirror")
    remote_pair(c, "host-c", "cdb", "cdb-mirror")
    before = write_random(c, "host-a", "db", 0, MiB, 1)

    c.kill("primary-a")
    c.wait_status("host-b", "db-mirror", ["SUSPENDED"], timeout=60, primary=False)
    refused = c.cli("host-b", "pair", "takeover", "cdb-mirror", check=False)
    assert refused.returncode == 1 and b"reachable" in refused.stderr, refused.stderr
    rows = c.cli_json("host-b", "pair", "takeover", "db-mirror")
    assert rows[0]["primary"] is True and rows[0]["epoch"] == 2, rows

    at_b = write_random(c, "host-b", "db-r", 4 * MiB, MiB, 2)
    at_c = write_random(c, "host-c", "cdb", 0, MiB, 3)  # site C mirrors on into the same secondary
    assert read_sha(c, "host-b", "cdb-r", 0, MiB) == at_c
    assert c.pair_row("host-c", "cdb-mirror")["status"] == "DUPLEX"

    c.start("primary-a")
    row = c.pair_row("host-a", "db-mirror")
    assert row["primary"] is False and row.get("fenced_by") == 2001, row
    denied = c.cli("host-a", "write", "db", "--file", "/etc/hostname", check=False)
    assert denied.returncode == 1 and b"fenced" in denied.stderr and b"2001" in denied.stderr, denied.stderr
    assert read_sha(c, "host-a", "db", 0, MiB) == before  # reads still served

    c.cli("host-b", "pair", "resync", "db-mirror", "--wait", "--timeout", "120")
    copied = int(c.pair_stats("host-b", "db-mirror").get("resync_tracks_sent", 0))
    print(f"resync home copied {copied} tracks of {64 * MiB // 8192}")
    assert copied < 64 * MiB // 8192 // 4, f"{copied} tracks copied: not a bitmap resync"
    c.wait_status("host-a", "db-mirror", ["DUPLEX"], timeout=60, primary=False)

    c.cli("host-a", "pair", "swap", "db-mirror")  # failback, issued at site A
    assert c.pair_row("host-a", "db-mirror")["primary"] is True
    assert read_sha(c, "host-a", "db", 4 * MiB, MiB) == at_b
    assert read_sha(c, "host-a", "db", 0, MiB) == before
    after = write_random(c, "host-a", "db", 8 * MiB, MiB, 4)
    assert read_sha(c, "host-b", "db-r", 8 * MiB, MiB) == after
    assert c.checksum("host-a", "db") == c.checksum("host-b", "db-r")
    assert c.checksum("host-c", "cdb") == c.checksum("host-b", "cdb-r")
