"""The lab's names and identities are derived, never random: a VM restarted is the same node."""

from __future__ import annotations

import re

from flashmesh.lab.commands import lab_specs
from flashmesh.lab.netns import bridge_address, tap_name, vm_address
from flashmesh.lab.vm import host_nqn, vm_uuid


def test_a_vm_identity_is_stable_and_distinct_per_name() -> None:
    assert vm_uuid("storage-0") == vm_uuid("storage-0")
    assert vm_uuid("storage-0") != vm_uuid("storage-1")
    assert host_nqn("gpu-0") == f"nqn.2014-08.org.nvmexpress:uuid:{vm_uuid('gpu-0')}"
    assert vm_uuid("gpu-0") != "00000000-0000-0000-0000-000000000000"


def test_addresses_and_taps_fit_the_kernel_limits() -> None:
    assert vm_address(1, 7) == "10.77.1.7"
    assert bridge_address(0) == "10.77.0.254"
    assert all(len(tap_name(i, link)) <= 15 for i in (1, 199) for link in (0, 1))


def test_the_default_lab_has_storage_with_drives_and_gpu_vms_with_room_for_python() -> None:
    specs = lab_specs(storage=2, gpus=1)
    assert [s.name for s in specs] == ["storage-0", "storage-1", "gpu-0"]
    assert all(s.drives for s in specs[:2]) and not specs[2].drives
    assert specs[2].memory_mib == 512
    assert len({s.index for s in specs}) == 3
    assert all(re.fullmatch(r"10\.77\.0\.\d+", s.address(0)) for s in specs)
