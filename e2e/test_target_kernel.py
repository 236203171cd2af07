"""FlashMesh's nvmet planner and writer on the real kernel's configfs, in a storage VM: the
kernel accepts every plan, and a second plan after each has nothing left to do."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from agents import stop_agent
from helpers import GPU0, STORAGE0, STORAGE1, Scenario, sh

from flashmesh.lab.vm import Lab, host_nqn

pytestmark = pytest.mark.kernel

WALK = Path(__file__).resolve().parent / "guest" / "target_walk.py"


def test_the_planner_converges_on_real_configfs(lab: Lab, scenario: Scenario) -> None:
    vm = STORAGE1.name
    # The walk must be configfs's only writer: an agent left running by the scenarios
    # before would make its port again. The next scenario that needs it starts it again.
    stop_agent(lab, STORAGE1)
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


LVM_WALK = Path(__file__).resolve().parent / "guest" / "lvm_walk.py"


def test_inventory_selection_and_thin_volumes_on_a_real_drive(lab: Lab, scenario: Scenario) -> None:
    vm = STORAGE0.name
    drive = sh(lab, vm, f"drive_by_serial {lab.drive_serial(vm, 3)}").strip()
    hand_made = sh(lab, vm, f"drive_by_serial {lab.drive_serial(vm, 2)}").strip()
    sh(lab, vm, f"lvm_volume {hand_made} scratch 8M")  # a volume group FlashMesh must not take
    out = sh(lab, vm, f"{sys.executable} {LVM_WALK} {drive} flashmesh-e2e")
    seen = json.loads(out[out.index("{") :])
    assert seen["devices"][drive]["serial"] == lab.drive_serial(vm, 3)
    assert seen["devices"][drive]["size"] == 256 << 20
    assert drive in seen["selected"]
    assert seen["refused"][hand_made] == "belongs to volume group fmlab: exclude it by path"
    assert seen["pool"]["segtype"] == "thin-pool"
    assert seen["sizes"] == [32 << 20, 48 << 20, 48 << 20]  # grown, never shrunk
    assert seen["snapshot"] == {"origin": "fm-0000000000e2-s0r0", "active": True}
    assert {"fm-0000000000e2-s0r0", "fs-0000000000e2-s0r0", "thin"} <= set(seen["listed"])
    assert seen["removed"] == [True, True, False]
    assert seen["left"] == ["thin"]
    scenario.done("inventory, selection, VG, thin pool, grow, snapshot and removal on real LVM")
