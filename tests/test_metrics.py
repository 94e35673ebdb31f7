"""Prometheus metrics of real daemons: the contract's names and values, promtool, TLS.

Both daemons serve ``--metrics``; the exposition is read over HTTP(S) like a
scraper would, parsed with ``prometheus_client``'s parser, and checked with
the real ``promtool check metrics``.  Host I/O goes through the CLI (gRPC)
and through ``qemu-io`` (NBD).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitmirror import tls
from splitmirror.testing import Site, wait_for

#: The metric names issue 17 makes a contract (samples as exposed).
CONTRACT = (
    "splitmirror_pair_status", "splitmirror_pair_pending_bytes", "splitmirror_pair_lag_seconds",
    "splitmirror_pair_queue_bytes", "splitmirror_resync_remaining_bytes", "splitmirror_resync_bytes_total",
    "splitmirror_replicated_bytes_total", "splitmirror_link_up", "splitmirror_link_rtt_seconds",
    "splitmirror_backup_last_success_timestamp_seconds", "splitmirror_generation_split_timestamp_seconds",
    "splitmirror_host_io_seconds_bucket", "splitmirror_host_io_bytes_total", "splitmirror_nbd_connections",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(site: Site, context: ssl.SSLContext | None = None) -> str:
    scheme = "https" if context is not None else "http"
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{site.metrics_port}/metrics", timeout=10,
                                context=context) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(reply.read().decode())


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def promtool_accepts(text: str) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (Debian prometheus)")


@pytest.fixture
def metric_sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    primary = Site("primary", 1001, tmp_path, nbd=True, metrics=True)
    secondary = Site("secondary", 2001, tmp_path, metrics=True)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    for site in (primary, secondary):
        site.kill()


@needs_promtool
def test_both_daemons_serve_the_contract_with_the_right_values(metric_sites: tuple[Site, Site],
                                                               tmp_path: Path) -> None:
    primary, secondary = metric_sites
    data = tmp_path / "data"
    data.write_bytes(os.urandom(64 << 10))
    primary.cli("volume", "create", "db", "--size", "16M")
    primary.cli("pair", "create", "db-m", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    secondary.cli("pair", "create", "gen1", "--pvol", "db-r", "--svol", "db-s1", "--wait")
    for i in range(3):
        primary.cli("write", "db", "--offset", f"{i}M", "--file", str(data))
    primary.cli("read", "db", "--offset", "0", "--length", "4K", "--out", str(tmp_path / "out"))
    nbd = f"nbd://127.0.0.1:{primary.nbd_port}/db"
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4M 1M", nbd], check=True, capture_output=True,
                   timeout=60)
    before = time.time()
    primary.cli("backup", "db-m", "--generation", "gen1", "--wait")
    # An NBD client attached while the daemons are scraped (qemu-io waits for commands on stdin).
    holder = subprocess.Popen(["qemu-io", "-f", "raw", nbd], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        def attached() -> Samples | None:
            found = samples(scrape(primary))
            return found if value(found, "splitmirror_nbd_connections", export="db") == 1 else None

        p = wait_for(attached, 20, 0.2, "the NBD client to show in splitmirror_nbd_connections")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # end of commands: qemu-io disconnects
        holder.wait(10)
    p_text, s_text = scrape(primary), scrape(secondary)
    for text in (p_text, s_text):
        promtool_accepts(text)
    s = samples(s_text)
    names = {name for name, _ in p} | {name for name, _ in s}
    assert set(CONTRACT) <= names, set(CONTRACT) - names

    status = {dict(k)["status"]: v for (name, k), v in p.items()
              if name == "splitmirror_pair_status" and dict(k)["pair"] == "db-m"}
    assert status == {"SIMPLEX": 0, "COPY": 0, "DUPLEX": 1, "SPLIT": 0, "SUSPENDED": 0}
    assert value(p, "splitmirror_pair_status", pair="db-m", role="primary", peer="2001", mode="sync",
                 status="DUPLEX") == 1
    assert value(s, "splitmirror_pair_status", pair="db-m", role="mirror", peer="1001", mode="sync",
                 status="DUPLEX") == 1
    assert value(s, "splitmirror_pair_status", pair="gen1", role="primary", peer="local", mode="sync",
                 status="SPLIT") == 1
    replicated = 3 * (64 << 10) + (1 << 20)  # gRPC and NBD writes while DUPLEX
    assert value(p, "splitmirror_replicated_bytes_total", pair="db-m") == replicated
    assert value(s, "splitmirror_replicated_bytes_total", pair="db-m") == replicated
    for found in (p, s):
        assert value(found, "splitmirror_pair_pending_bytes", pair="db-m") == 0
        assert value(found, "splitmirror_resync_remaining_bytes", pair="db-m") == 0
        assert value(found, "splitmirror_link_up", peer="2001" if found is p else "1001") == 1
        assert 0 < value(found, "splitmirror_link_rtt_seconds", peer="2001" if found is p else "1001") < 5
        stamp = value(found, "splitmirror_backup_last_success_timestamp_seconds", pair="db-m")
        assert before - 1 <= stamp <= time.time() + 1
    assert value(p, "splitmirror_pair_lag_seconds", pair="db-m") == 0
    assert value(p, "splitmirror_pair_queue_bytes", pair="db-m") == 0
    assert value(s, "splitmirror_generation_split_timestamp_seconds", generation="gen1", pair="db-m") == \
        value(p, "splitmirror_backup_last_success_timestamp_seconds", pair="db-m")
    # Host I/O: three gRPC writes and one qemu-io write (NBD), one read.
    writes = value(p, "splitmirror_host_io_seconds_count", volume="db", op="write")
    assert writes >= 4
    assert value(p, "splitmirror_host_io_seconds_bucket", volume="db", op="write", le="+Inf") == writes
    assert value(p, "splitmirror_host_io_bytes_total", volume="db", op="write") == replicated
    assert value(p, "splitmirror_host_io_bytes_total", volume="db", op="read") >= 4096
    assert value(p, "splitmirror_host_io_errors_total", volume="db", op="write") == 0
    assert 0 < value(p, "splitmirror_host_io_seconds_sum", volume="db", op="write") < 60
    wait_for(lambda: value(samples(scrape(primary)), "splitmirror_nbd_connections", export="db") == 0, 20, 0.2,
             "the NBD client to be gone from splitmirror_nbd_connections")


def test_refused_host_io_is_counted_only_for_existing_volumes(metric_sites: tuple[Site, Site],
                                                              tmp_path: Path) -> None:
    primary, _ = metric_sites
    primary.cli("volume", "create", "small", "--size", "1M")
    data = tmp_path / "data"
    data.write_bytes(b"x" * 8192)
    # From stdin: the CLI cannot check the length first, the server refuses it.
    assert primary.cli("write", "small", "--offset", "1M", "--file", "-", input="x" * 8192,
                       check=False).returncode == 1
    for i in range(5):  # names of volumes that do not exist add no series
        primary.cli("write", f"nothing{i}", "--file", str(data), check=False)
    found = samples(scrape(primary))
    assert value(found, "splitmirror_host_io_errors_total", volume="small", op="write") == 1
    assert not [k for k in found if dict(k[1]).get("volume", "").startswith("nothing")]


def test_metrics_are_off_by_default_and_bind_loopback_for_a_bare_port(tmp_path: Path) -> None:
    site = Site("primary", 1001, tmp_path)
    site.start()
    try:
        assert "metrics port" not in site.log()
    finally:
        site.stop()
    site.extra_args += ["--metrics", "0"]
    site.start()
    try:
        line = next(x for x in site.log().splitlines() if "metrics port" in x and "ready" in x)
        port = int(line.split("metrics port ")[-1].split(",")[0].split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert b"splitmirror_info" in reply.read()
    finally:
        site.stop()


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    tls.init_dir(directory, [1001, 2001], tls.parse_clients("admin,host,viewer"))
    return directory


def client_context(tls_dir: Path, stem: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    context.check_hostname = False  # the daemon's certificate names the system, not 127.0.0.1
    if stem is not None:
        context.load_cert_chain(tls_dir / f"{stem}.pem", tls_dir / f"{stem}.key")
    return context


def test_metrics_over_tls_need_a_client_certificate_viewer_is_enough(tmp_path: Path, tls_dir: Path) -> None:
    site = Site("primary", 1001, tmp_path, tls_dir=tls_dir, metrics=True, identity="viewer")
    site.start()
    try:
        text = scrape(site, client_context(tls_dir, "client-viewer"))
        assert 'splitmirror_info{role="primary",system_id="1001"} 1.0' in text
        with pytest.raises(urllib.error.HTTPError) as refused:  # a peer's system certificate is no client
            scrape(site, client_context(tls_dir, "2001"))
        assert refused.value.code == 403
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            scrape(site, client_context(tls_dir, None))  # no certificate: the handshake fails
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(site)  # plaintext HTTP to the HTTPS port
        assert "audit: denied who=2001 (system, cert) what=metrics" in site.log()
        # The viewer reads the event stream too.
        assert site.cli("events").returncode == 0
    finally:
        site.kill()


def test_a_group_backup_shows_in_pair_display_and_metrics(metric_sites: tuple[Site, Site]) -> None:
    primary, secondary = metric_sites
    for name in ("a", "b"):
        primary.cli("volume", "create", name, "--size", "4M")
        primary.cli("pair", "create", f"{name}-m", "--pvol", name, "--svol", f"{name}-r", "--peer", "2001",
                    "--group", "orders", "--wait")
        secondary.cli("pair", "create", f"{name}-gen1", "--pvol", f"{name}-r", "--svol", f"{name}-s1", "--wait")
    before = time.time()
    primary.cli("backup", "--group", "orders", "--wait")
    shown = primary.cli_json("pair", "display")
    rows = {r["pair"]: r for r in shown if "pair" in r}
    groups = [g for g in shown if "group" in g and "pair" not in g]
    assert [g["group"] for g in groups] == ["orders"]
    assert rows["a-m"]["backup_time"] == rows["b-m"]["backup_time"] == groups[0]["backup_time"]  # one cut
    assert "group orders: newest backup" in primary.cli("pair", "display").stdout
    found = samples(scrape(primary))
    stamp = value(found, "splitmirror_group_backup_last_success_timestamp_seconds", group="orders")
    assert before - 1 <= stamp <= time.time() + 1
    assert value(found, "splitmirror_backup_last_success_timestamp_seconds", pair="a-m") == stamp
