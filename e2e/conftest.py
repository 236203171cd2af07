"""The kernel lab for e2e scenarios: four VMs booted once per session inside the session's
lab namespace (see the repository's conftest.py): two storage nodes with emulated NVMe
drives and two GPU nodes that connect to them; and the storage agents, started once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from agents import leave_nothing_behind, run_agents
from helpers import GPU0, GPU1, STORAGE0, STORAGE1, Scenario

from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.netns import LabNetwork
from flashmesh.lab.vm import Lab


@pytest.fixture(scope="session")
def lab(lab_network: LabNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab(tmp_path_factory.mktemp("lab") / "vms", network=lab_network) as booted:
        booted.up([STORAGE0, STORAGE1, GPU0, GPU1])
        yield booted


@pytest.fixture(scope="session")
def agents(lab: Lab, crds: LocalCluster) -> Iterator[LocalCluster]:
    """A storage agent running in each storage VM, with its pool and StorageNodes."""
    yield from run_agents(lab, crds)


@pytest.fixture(autouse=True)
def _healthy_vms(request: pytest.FixtureRequest) -> None:
    """A VM that died in one scenario (its guest kernel panicked) is booted again before
    the next, so one crash does not fail every scenario after it."""
    if "lab" in request.fixturenames:
        request.getfixturevalue("lab").revive()


@pytest.fixture(autouse=True)
def _agents_left_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each scenario with the agents, whatever it left (a failed scenario stops
    before its own clean-up) is deleted through the agents, so the next scenario finds
    empty targets and its exact checks of configfs and LVM hold."""
    yield
    if "agents" in request.fixturenames:
        leave_nothing_behind(request.getfixturevalue("lab"), request.getfixturevalue("agents"))


@pytest.fixture
def scenario(request: pytest.FixtureRequest, summary: list[str]) -> Scenario:
    return Scenario(request.node.name, summary, time.monotonic())
