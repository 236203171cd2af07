"""What `kubectl get` shows of FlashMesh's objects: short names, the flashmesh category and
printer columns that answer a person's first question."""

from __future__ import annotations

from typing import Any

import pytest

from flashmesh.core import resources
from flashmesh.lab.cluster import LocalCluster
from tables import parse_table

pytestmark = pytest.mark.cluster

API = resources.API_VERSION


def make(cluster: LocalCluster, obj: dict[str, Any], status: dict[str, Any] | None) -> None:
    meta = obj["metadata"]
    cluster.kube.create(obj)
    if status:
        cluster.kube.patch(
            API,
            obj["kind"],
            meta["name"],
            {"status": status},
            namespace=meta.get("namespace"),
            subresource="status",
        )


@pytest.fixture(scope="module")
def shown(crds: LocalCluster) -> LocalCluster:
    """One object of each kind, with the status its controllers will write."""
    make(
        crds,
        {
            "apiVersion": API,
            "kind": "StoragePool",
            "metadata": {"name": "cols"},
            "spec": {"nodeSelector": {"matchLabels": {"pool": "cols"}}},
        },
        {
            "phase": "Ready",
            "nodesReady": 2,
            "nodesTotal": 3,
            "capacity": "3Ti",
            "used": "1Ti",
            "free": "2Ti",
            "storageClassName": "flashmesh-cols",
        },
    )
    make(
        crds,
        {
            "apiVersion": API,
            "kind": "StorageNode",
            "metadata": {"name": "cols-node"},
            "spec": {"pool": "cols"},
        },
        {
            "phase": "Ready",
            "volumeGroup": {"name": "fm", "size": "1536Gi", "free": "1Ti"},
            "endpoints": [
                {"transport": "rdma", "address": "10.1.0.2", "port": 4420},
                {"transport": "tcp", "address": "10.1.0.2", "port": 4420},
            ],
            "lastHeartbeatTime": "2026-11-27T10:00:00Z",
        },
    )
    make(
        crds,
        {
            "apiVersion": API,
            "kind": "Volume",
            "metadata": {"name": "cols-vol"},
            "spec": {"csiName": "pvc-cols", "pool": "cols", "size": "8Gi"},
        },
        {"phase": "Ready"},
    )
    make(
        crds,
        {
            "apiVersion": API,
            "kind": "Snapshot",
            "metadata": {"name": "cols-snap"},
            "spec": {"csiName": "snap-cols", "sourceVolume": "cols-vol", "size": "8Gi"},
        },
        {"readyToUse": True},
    )
    make(
        crds,
        {
            "apiVersion": API,
            "kind": "TrainingWorkload",
            "metadata": {"name": "cols-tw", "namespace": "default"},
            "spec": {
                "dataset": {"size": "50Gi", "pool": "cols"},
                "stages": {
                    "etl": {"image": "e", "command": ["e"]},
                    "training": {
                        "image": "t",
                        "command": ["t"],
                        "replicas": 4,
                        "gpusPerReplica": 2,
                    },
                },
            },
        },
        {"phase": "Training"},
    )
    return crds


def row(cluster: LocalCluster, *args: str) -> dict[str, str]:
    (only,) = parse_table(cluster.kubectl("get", *args).stdout)
    return only


def test_a_pool_shows_phase_nodes_ready_capacity_and_used(shown: LocalCluster) -> None:
    r = row(shown, "sp", "cols")
    assert list(r) == ["NAME", "PHASE", "READY", "NODES", "CAPACITY", "USED", "AGE"]
    assert (r["PHASE"], r["READY"], r["NODES"], r["CAPACITY"], r["USED"]) == (
        "Ready",
        "2",
        "3",
        "3Ti",
        "1Ti",
    )
    wide = row(shown, "storagepools", "cols", "-o", "wide")
    assert (wide["FREE"], wide["TRANSPORTS"], wide["STORAGECLASS"]) == (
        "2Ti",
        '["rdma","tcp"]',
        "flashmesh-cols",
    )


def test_a_storage_node_shows_pool_capacity_and_heartbeat(shown: LocalCluster) -> None:
    r = row(shown, "sn", "cols-node")
    assert list(r) == ["NAME", "POOL", "PHASE", "CAPACITY", "FREE", "HEARTBEAT", "AGE"]
    assert (r["POOL"], r["PHASE"], r["CAPACITY"], r["FREE"]) == ("cols", "Ready", "1536Gi", "1Ti")
    assert r["HEARTBEAT"] not in ("", "<none>")


def test_a_volume_shows_pool_size_layout_and_phase(shown: LocalCluster) -> None:
    r = row(shown, "fmvol", "cols-vol")
    assert list(r) == ["NAME", "POOL", "SIZE", "STRIPES", "REPLICAS", "PHASE", "AGE"]
    assert (r["POOL"], r["SIZE"], r["STRIPES"], r["REPLICAS"], r["PHASE"]) == (
        "cols",
        "8Gi",
        "1",
        "1",
        "Ready",
    )


def test_a_snapshot_shows_source_size_and_readiness(shown: LocalCluster) -> None:
    r = row(shown, "fmsnap", "cols-snap")
    assert (r["SOURCE"], r["SIZE"], r["READY"]) == ("cols-vol", "8Gi", "true")


def test_a_training_workload_shows_phase_pool_dataset_and_trainers(shown: LocalCluster) -> None:
    r = row(shown, "tw", "cols-tw", "-n", "default")
    assert list(r) == ["NAME", "PHASE", "POOL", "DATASET", "TRAINERS", "AGE"]
    assert (r["PHASE"], r["POOL"], r["DATASET"], r["TRAINERS"]) == ("Training", "cols", "50Gi", "4")


def test_the_flashmesh_category_lists_every_kind(shown: LocalCluster) -> None:
    names = set(shown.kubectl("get", "flashmesh", "-A", "-o", "name").stdout.split())
    assert {
        "storagepool.flashmesh.dev/cols",
        "storagenode.flashmesh.dev/cols-node",
        "volume.flashmesh.dev/cols-vol",
        "snapshot.flashmesh.dev/cols-snap",
        "trainingworkload.flashmesh.dev/cols-tw",
    } <= names


def test_explain_documents_the_pool_fields(shown: LocalCluster) -> None:
    text = shown.kubectl("explain", "storagepool.spec.nodeSelector").stdout
    assert "never takes every node by accident" in " ".join(text.split())
