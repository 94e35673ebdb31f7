"""Honest pair status with no host writes: a lost link shows within the link
timeout, a peer's clean stop is a goodbye, and ``pair display`` says since when."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.testing import Site, wait_status
from tests.faultproxy import ProxyPair

LINK_TIMEOUT = 2.0
#: A loaded machine (tests in parallel) can take long to start a daemon.
START_TIMEOUT = 60


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[Site, Site, ProxyPair]]:
    primary = Site("primary", 1001, tmp_path, link_timeout=LINK_TIMEOUT)
    secondary = Site("secondary", 2001, tmp_path, link_timeout=LINK_TIMEOUT)
    primary.peer_with(secondary)
    proxies = ProxyPair(primary, secondary)
    try:
        secondary.start(timeout=START_TIMEOUT)
        primary.start(timeout=START_TIMEOUT)
        primary.cli("volume", "create", "v", "--size", "1M")
        secondary.cli("volume", "create", "v-r", "--size", "1M")
        primary.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
        yield primary, secondary, proxies
    finally:
        for site in (primary, secondary):
            site.kill()
        proxies.close()


def _since(row: dict[str, object]) -> float:
    text = str(row["status_since"])
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_idle_pair_shows_a_silent_link_loss_within_the_link_timeout(
        proxied: tuple[Site, Site, ProxyPair]) -> None:
    primary, secondary, proxies = proxied
    before = primary.pair_row("p")
    assert before["status"] == "DUPLEX" and before["status_since"]
    # No FIN, no RST, no write: only the keepalive can notice.
    lost_at = time.time()
    proxies.blackhole()
    for site in (primary, secondary):
        row = wait_status(site, "p", ["SUSPENDED"], timeout=6 * LINK_TIMEOUT)
        assert row["status"] == "SUSPENDED"
        # Since when: the moment of the loss, a link timeout or so after it began.
        assert lost_at - 1 <= _since(row) <= lost_at + 4 * LINK_TIMEOUT, (row, lost_at)
    table = primary.cli("pair", "display").stdout
    header, _, line = table.splitlines()[:3]
    assert "SINCE" in header and "SUSPENDED" in line and " ago)" in line
    proxies.heal()
    row = wait_status(primary, "p", ["DUPLEX"], timeout=10 * LINK_TIMEOUT)
    assert _since(row) > _since(before)


@pytest.mark.parametrize("stopping", ["secondary", "primary"])
def test_a_clean_stop_says_goodbye(proxied: tuple[Site, Site, ProxyPair], stopping: str) -> None:
    primary, secondary, _ = proxied
    gone, staying = (secondary, primary) if stopping == "secondary" else (primary, secondary)
    started = time.monotonic()
    assert gone.stop() == 0
    row = staying.pair_row("p")  # at once: no link timeout to wait for
    assert row["status"] == "SUSPENDED", row
    assert time.monotonic() - started < 20
    log = staying.log()
    goodbye = [line for line in log.splitlines() if "said goodbye" in line]
    assert len(goodbye) == 1 and " INFO " in goodbye[0], goodbye
    assert f"peer {gone.system_id}" in goodbye[0]
    for text in (log, gone.log()):
        assert "Traceback" not in text and " ERROR " not in text
    assert "peer-stopped" in staying.cli("pair", "display", "p").stdout
    gone.start(timeout=START_TIMEOUT)
    wait_status(primary, "p", ["DUPLEX"], timeout=10 * LINK_TIMEOUT)
    wait_status(secondary, "p", ["DUPLEX"], timeout=10 * LINK_TIMEOUT)
