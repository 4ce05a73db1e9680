"""The README's main job runs to the end and tells the truth about what it saw."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_reports(sandbox_run_dir):
    # sandbox_run_dir only for its skip/fail rule on missing OVS/OVN; the demo makes its own.
    proc = subprocess.run(
        [sys.executable, "-m", "statelesslb.sandbox.demo", "--connections", "40"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "not delivered: 0" in out
    assert "conntrack entries for the VIP: gateways 0, backend chassis 40" in out
    assert "moved anyway (collateral): 0" in out
