"""FlashMesh's nvmet planner and writer on the real kernel's configfs, in a storage VM: the
kernel accepts every plan, and a second plan after each has nothing left to do."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import GPU0, STORAGE1, Scenario, sh

from flashmesh.lab.vm import Lab, host_nqn

pytestmark = pytest.mark.kernel

WALK = Path(__file__).resolve().parent / "guest" / "target_walk.py"


def test_the_planner_converges_on_real_configfs(lab: Lab, scenario: Scenario) -> None:
    vm = STORAGE1.name
    drives = sh(
        lab,
        vm,
        f"lvm_volume $(drive_by_serial {lab.drive_serial(vm, 0)}) walk-a 16M\n"
        f"lvm_volume $(drive_by_serial {lab.drive_serial(vm, 0)}) walk-b 16M",
    ).split()
    args = [
        host_nqn(GPU0.name),
        host_nqn("another-host"),
        *drives,
        STORAGE1.address(0),
        "127.0.0.1",
    ]
    out = sh(
        lab,
        vm,
        f"modprobe nvmet nvmet-tcp 2>/dev/null || modprobe -a nvmet nvmet-tcp\n"
        f"{sys.executable} {WALK} {' '.join(args)}",
    )
    report = json.loads(out[out.index("{") :])
    left = report.pop("left")
    for name, result in report.items():
        assert result["actions"] > 0, name
        assert result["again"] == [], f"{name}: the kernel did not end where planned"
    assert not [p for p in left if "flashmesh" in p or p.startswith("ports/")], left
    scenario.done(f"{len(report)} states applied to real configfs, each converged in one pass")
