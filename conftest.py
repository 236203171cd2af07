"""Fixtures shared by tests/ and e2e/.

Tests marked `cluster` run against one real control plane per session (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and KWOK, built from their Go
modules). When tests marked `kernel` are selected, the whole session first moves into the
lab's own network namespace, so the control plane, the test process and the VMs share one
network: the apiserver then also listens on the lab's bridge addresses, for the VMs.
Everything is stopped and removed when the session ends, pass or fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from flashmesh.kube import Kube
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.crds import install_crds
from flashmesh.lab.netns import LabNetwork, bridge_address

# pytester: the tests of the lab's own pytest hooks run pytest in pytest.
pytest_plugins = ("pytester",)

_NETWORK = pytest.StashKey[LabNetwork]()
_SUMMARY = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SUMMARY] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    # A test with a lab of its own (the demo) brings its own network too.
    if not any(
        item.get_closest_marker("kernel") and not item.get_closest_marker("own_lab")
        for item in session.items
    ):
        return
    if os.geteuid() != 0:
        raise pytest.UsageError(
            "the kernel tests need root (network namespaces, taps, QEMU): run as root, "
            "or deselect them with -m 'not kernel'"
        )
    network = LabNetwork(links=2)
    network.create()
    network.enter()
    session.config.stash[_NETWORK] = network


def pytest_unconfigure(config: pytest.Config) -> None:
    network = config.stash.get(_NETWORK, None)
    if network is not None:
        network.destroy()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("scenario summaries")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def summary(pytestconfig: pytest.Config) -> list[str]:
    """Scenario summary lines, printed at the end of the run."""
    return pytestconfig.stash[_SUMMARY]


@pytest.fixture(scope="session")
def lab_network(pytestconfig: pytest.Config) -> LabNetwork:
    network = pytestconfig.stash.get(_NETWORK, None)
    if network is None:
        pytest.skip("no lab network: only tests marked kernel get one")
    return network


@pytest.fixture(scope="session")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[LocalCluster]:
    network = pytestconfig.stash.get(_NETWORK, None)
    extra = [bridge_address(link) for link in range(network.links)] if network else []
    lab = LocalCluster(
        tmp_path_factory.mktemp("cluster") / "cp",
        extra_addresses=extra,
        bind_all=network is not None,
        die_with_parent=True,
        # The GPU VMs' nodes: their pods are run by the lab's kubelet stand-in.
        stand_in_nodes=["gpu-0", "gpu-1"] if network else None,
    )
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="session")
def kube(cluster: LocalCluster) -> Kube:
    return cluster.kube


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> LocalCluster:
    """The cluster with FlashMesh's CRDs installed and Established."""
    install_crds(cluster)
    return cluster
