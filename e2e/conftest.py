"""The kernel lab for e2e scenarios: three VMs booted once per session inside the session's
lab namespace (see the repository's conftest.py): two storage nodes with emulated NVMe
drives and one GPU node that connects to them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from flashmesh.lab.kernel import GUEST
from flashmesh.lab.netns import LabNetwork
from flashmesh.lab.vm import Drive, Lab, VmSpec

LIB = GUEST / "lab-lib.sh"
MIB = 1 << 20

# storage-0: drive 0 for the TCP scenario, drive 1 for RDMA, drive 2 for LVM volumes.
STORAGE0 = VmSpec("storage-0", 1, drives=(Drive(256), Drive(256), Drive(768)), links=2)
# storage-1: one drive for LVM volumes (the second half of a stripe, the restart scenario).
STORAGE1 = VmSpec("storage-1", 2, drives=(Drive(512),), links=1)
GPU0 = VmSpec("gpu-0", 3, links=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def lab(lab_network: LabNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab(tmp_path_factory.mktemp("lab") / "vms", network=lab_network) as booted:
        booted.up([STORAGE0, STORAGE1, GPU0])
        yield booted


@dataclass
class Scenario:
    """Times one scenario and adds its summary line to the run's report."""

    name: str
    lines: list[str]
    begin: float = 0.0

    def done(self, result: str) -> None:
        self.lines.append(f"{self.name}: {result} ({time.monotonic() - self.begin:.1f} s wall)")


@pytest.fixture
def scenario(request: pytest.FixtureRequest, summary: list[str]) -> Scenario:
    return Scenario(request.node.name, summary, time.monotonic())


def sh(lab: Lab, vm: str, script: str, timeout: float = 300, check: bool = True) -> str:
    """Runs a script in a VM with the lab's shell helpers loaded; its output."""
    return lab.exec(vm, f"set -e\nsource {LIB}\n{script}", timeout=timeout, check=check).output


def fio_result(output: str) -> dict[str, Any]:
    """fio's JSON (the output may start with other lines)."""
    job: dict[str, Any] = json.loads(output[output.index("{") :])["jobs"][0]
    return job


def assert_verified(job: dict[str, Any], size: int) -> None:
    """Every byte written was read back and matched its checksum."""
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == size, job["write"]
    assert job["read"]["io_bytes"] == size, job["read"]  # the verify pass
