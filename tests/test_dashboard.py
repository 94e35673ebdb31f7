"""deploy/grafana/splitmirror.json: every query parses (promtool) and names only metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from splitmirror.observe.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "splitmirror.json"
#: What the issue asks the dashboard to show, by the metric that shows it.
SHOWN = ("splitmirror_pair_status", "splitmirror_pair_lag_seconds", "splitmirror_pair_pending_bytes",
         "splitmirror_resync_remaining_bytes", "splitmirror_backup_last_success_timestamp_seconds",
         "splitmirror_host_io_seconds_bucket")


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_dashboard_shows_what_the_issue_asks_with_metrics_that_exist() -> None:
    exprs = queries()
    used = {name for e in exprs for name in re.findall(r"\bsplitmirror_[a-z_]+", e)}
    exposed = set()
    for name, (kind, _, _) in METRICS.items():
        exposed |= {f"{name}_total"} if kind == "counter" else {f"{name}_bucket", f"{name}_sum", f"{name}_count"} \
            if kind == "histogram" else {name}
    assert used <= exposed, used - exposed
    assert set(SHOWN) <= used


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (Debian prometheus)")
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                        for i, e in enumerate(queries())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
