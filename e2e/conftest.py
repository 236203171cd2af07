"""The kernel lab for e2e scenarios: three VMs booted once per session inside the session's
lab namespace (see the repository's conftest.py): two storage nodes with emulated NVMe
drives and one GPU node that connects to them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from helpers import GPU0, STORAGE0, STORAGE1, Scenario

from flashmesh.lab.netns import LabNetwork
from flashmesh.lab.vm import Lab


@pytest.fixture(scope="session")
def lab(lab_network: LabNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab(tmp_path_factory.mktemp("lab") / "vms", network=lab_network) as booted:
        booted.up([STORAGE0, STORAGE1, GPU0])
        yield booted


@pytest.fixture(autouse=True)
def _healthy_vms(request: pytest.FixtureRequest) -> None:
    """A VM that died in one scenario (its guest kernel panicked) is booted again before
    the next, so one crash does not fail every scenario after it."""
    if "lab" in request.fixturenames:
        request.getfixturevalue("lab").revive()


@pytest.fixture
def scenario(request: pytest.FixtureRequest, summary: list[str]) -> Scenario:
    return Scenario(request.node.name, summary, time.monotonic())
