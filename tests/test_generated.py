"""The committed protobuf/gRPC modules match proto/ (``make proto`` regenerates)."""

from __future__ import annotations

import subprocess
import sys

from splitmirror.testing import ROOT


def test_generated_modules_are_fresh() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
