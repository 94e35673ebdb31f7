"""A real Prometheus (Debian's package) scrapes both daemons through a fault cycle.

The secondary is killed: Prometheus's HTTP API must show the pair SUSPENDED
at the primary and its pending bytes growing while hosts write; the
secondary restarts: DUPLEX again, nothing pending.  Prometheus also loads
deploy/prometheus/alerts.yml, so the rules are evaluated against live series.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitmirror.testing import ROOT, Site, free_port, wait_for

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus missing: scripts/install-system-deps.sh installs Debian's package")


class Prometheus:
    def __init__(self, base: Path, targets: dict[str, Site]) -> None:
        self.port = free_port()
        self.dir = base / "prometheus"
        self.dir.mkdir()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
            "scrape_configs": [{
                "job_name": "splitmirror",
                "static_configs": [{"targets": [f"127.0.0.1:{site.metrics_port}"], "labels": {"site": name}}
                                   for name, site in targets.items()],
            }],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(self.dir / "log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, 0.2, "Prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(self.dir / 'log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        """The value of a query with one series, or None when it has none."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, predicate: Any, timeout: float = 60.0) -> float:
        found: list[float] = wait_for(lambda: (v := self.scalar(expr)) is not None and predicate(v) and [v],
                                      timeout, 0.5, f"Prometheus: {expr}")
        return found[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Site, Site, Prometheus]]:
    primary = Site("primary", 1001, tmp_path, metrics=True, link_timeout=1.0)
    secondary = Site("secondary", 2001, tmp_path, metrics=True, link_timeout=1.0)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    prometheus = Prometheus(tmp_path, {"primary": primary, "secondary": secondary})
    yield primary, secondary, prometheus
    prometheus.stop()
    for site in (primary, secondary):
        site.kill()


def test_prometheus_sees_a_pair_suspended_then_duplex_again(watched: tuple[Site, Site, Prometheus],
                                                            tmp_path: Path) -> None:
    primary, secondary, prometheus = watched
    primary.cli("volume", "create", "db", "--size", "16M")
    primary.cli("pair", "create", "db-m", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    at_primary = 'pair="db-m", site="primary"'
    status = f'splitmirror_pair_status{{{at_primary}, status="%s"}}'
    pending = f"splitmirror_pair_pending_bytes{{{at_primary}}}"
    assert prometheus.wait_value(status % "DUPLEX", lambda v: v == 1) == 1
    assert prometheus.wait_value('count(up{job="splitmirror"} == 1)', lambda v: v == 2) == 2
    assert prometheus.scalar(pending) == 0

    secondary.kill()
    data = tmp_path / "data"
    data.write_bytes(os.urandom(256 << 10))
    primary.cli("write", "db", "--file", str(data))  # suspends (link timeout), then is tracked
    assert prometheus.wait_value(status % "SUSPENDED", lambda v: v == 1) == 1
    assert prometheus.scalar(status % "DUPLEX") == 0
    first = prometheus.wait_value(pending, lambda v: v >= 256 << 10)
    primary.cli("write", "db", "--offset", "4M", "--file", str(data))
    assert prometheus.wait_value(pending, lambda v: v > first) >= first + (256 << 10)  # pending bytes grew
    assert prometheus.wait_value('splitmirror_link_up{site="primary", peer="2001"}', lambda v: v == 0) == 0
    assert prometheus.wait_value('up{site="secondary"}', lambda v: v == 0) == 0
    assert prometheus.wait_value(f"splitmirror_pair_lag_seconds{{{at_primary}}}", lambda v: v > 0) > 0

    secondary.start()  # auto-resync brings the pair back
    assert prometheus.wait_value(status % "DUPLEX", lambda v: v == 1, timeout=90) == 1
    assert prometheus.scalar(status % "SUSPENDED") == 0
    assert prometheus.wait_value(pending, lambda v: v == 0) == 0
    assert prometheus.wait_value(f"splitmirror_pair_lag_seconds{{{at_primary}}}", lambda v: v == 0) == 0
    assert prometheus.wait_value('splitmirror_link_up{site="primary", peer="2001"}', lambda v: v == 1) == 1
    # The resync moved what was written while the secondary was away.
    assert prometheus.wait_value(f"splitmirror_resync_bytes_total{{{at_primary}}}",
                                 lambda v: v >= 512 << 10) >= 512 << 10
    # Prometheus evaluated the rules against these series: they loaded and none is firing now.
    rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{prometheus.port}/api/v1/rules",
                                              timeout=10).read())
    names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
    assert {"SplitmirrorPairNotDuplex", "SplitmirrorLinkDown", "SplitmirrorSplitBrain"} <= names
    assert all(r["health"] == "ok" for g in rules["data"]["groups"] for r in g["rules"]), rules
