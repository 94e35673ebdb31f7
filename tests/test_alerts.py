"""The alert rules of deploy/prometheus, checked and unit-tested by the real promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool missing: scripts/install-system-deps.sh installs Debian's prometheus")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The rule tests can fail: a lag threshold moved from 30 s to 50 s breaks them."""
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(RULES / name, tmp_path / name)
    rules = tmp_path / "alerts.yml"
    lag = "splitmirror_pair_lag_seconds > "
    rules.write_text(rules.read_text().replace(lag + "30", lag + "50"))
    result = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "SplitmirrorReplicationLagHigh" in result.stdout + result.stderr
