"""`make demo` as CI runs it: `flashmesh lab demo` brings up its own control plane and four
VMs, runs the TrainingWorkload whose pods write and read the dataset over NVMe/TCP, prints
what they said and `flashmesh status`, and tears everything down; it exits 0 only when
the data check passed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Scenario

# Its own lab and network: `make test` runs it beside the session lab's scenarios.
pytestmark = [pytest.mark.kernel, pytest.mark.own_lab]


def test_the_demo_runs_end_to_end_with_its_data_check(tmp_path: Path, scenario: Scenario) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flashmesh.cli", "lab", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, f"{out[-6000:]}\n{result.stderr[-6000:]}"
    assert "Data check passed" in out
    assert "ETL on gpu-" in out and out.count("sha256 OK") == 2
    assert "inference on gpu-" in out and "serving replica-0" in out
    for table in ("Pools", "Storage nodes", "Volumes", "Paths (segment exports)"):
        assert table in out
    # Progress on stderr, the teardown included: nothing of the demo is left running.
    assert "booting 4 VMs" in result.stderr
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True)
    assert left.returncode != 0, left.stdout
    scenario.done("make demo: " + " | ".join(
        line.strip() for line in out.splitlines() if "sha256" in line or "serving" in line
    ))  # fmt: skip
