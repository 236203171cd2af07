"""Shared fixtures. Tests marked `cluster` run against one real control plane per session
(etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK, built from their
Go modules); it is stopped and its folder removed when the session ends, pass or fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flashmesh.kube import Kube
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.crds import install_crds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    lab = LocalCluster(tmp_path_factory.mktemp("cluster") / "cp", die_with_parent=True)
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
