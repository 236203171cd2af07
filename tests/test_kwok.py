"""Scheduler, controller manager and KWOK together: simulated nodes become Ready and run pods."""

from __future__ import annotations

from typing import Any

import pytest

from flashmesh.lab import processes
from flashmesh.lab.cluster import ATTACH_DETACH_ANNOTATION, LocalCluster, node_is_ready

pytestmark = pytest.mark.cluster


def deployment(name: str, node: str, gpus: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "registry.example.com/train:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                },
            },
        },
    }


def pods_of(cluster: LocalCluster, app: str) -> list[dict[str, Any]]:
    return cluster.kube.list("v1", "Pod", namespace="default", label_selector=f"app={app}")


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in pod["status"].get("conditions") or [] if c["type"] == kind), {})


@pytest.fixture(scope="module")
def gpu_node(cluster: LocalCluster) -> dict[str, Any]:
    return cluster.add_fake_node(
        "gpu-node-0",
        zone="zone-a",
        gpus=2,
        csi_drivers=[
            {
                "name": "csi.flashmesh.dev",
                "nodeID": "nqn.2014-08.org.nvmexpress:uuid:1",
                "topologyKeys": ["topology.kubernetes.io/zone"],
            }
        ],
    )


def test_a_fake_node_is_ready_with_its_labels_gpus_and_csinode(
    cluster: LocalCluster, gpu_node: dict[str, Any]
) -> None:
    node = cluster.kube.get("v1", "Node", "gpu-node-0")
    assert node_is_ready(node)
    assert node["metadata"]["labels"]["topology.kubernetes.io/zone"] == "zone-a"
    assert node["metadata"]["annotations"][ATTACH_DETACH_ANNOTATION] == "true"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    csinode = cluster.kube.get("storage.k8s.io/v1", "CSINode", "gpu-node-0")
    assert csinode is not None
    assert csinode["spec"]["drivers"][0]["nodeID"] == "nqn.2014-08.org.nvmexpress:uuid:1"
    assert csinode["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]


def test_a_csinode_written_before_its_node_is_taken_over_by_the_new_node(
    cluster: LocalCluster,
) -> None:
    """A node plugin started by hand writes its CSINode before any Node exists (as the
    lab's scenarios do): a fake Node made afterwards takes it over, drivers and owner."""
    kube = cluster.kube
    kube.create({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": "early-0"},
        "spec": {"drivers": [{"name": "csi.flashmesh.dev", "nodeID": "old"}]},
    })  # fmt: skip
    drivers = [{"name": "csi.flashmesh.dev", "nodeID": "new", "topologyKeys": ["zone"]}]
    node = cluster.add_fake_node("early-0", csi_drivers=drivers, wait_ready=False)
    try:
        csinode = kube.get("storage.k8s.io/v1", "CSINode", "early-0")
        assert csinode is not None
        assert csinode["spec"]["drivers"] == drivers
        assert csinode["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    finally:
        kube.delete("v1", "Node", "early-0")
        kube.delete("storage.k8s.io/v1", "CSINode", "early-0")


def test_a_deployment_pod_is_scheduled_to_the_fake_node_and_runs(
    cluster: LocalCluster, gpu_node: dict[str, Any]
) -> None:
    cluster.kube.create(deployment("trainer", "gpu-node-0", gpus=1))

    def running() -> bool:
        pods = pods_of(cluster, "trainer")
        return (
            bool(pods)
            and pods[0]["status"].get("phase") == "Running"
            and (condition(pods[0], "Ready").get("status") == "True")
        )

    assert processes.wait_until(running, 90), pods_of(cluster, "trainer")
    (pod,) = pods_of(cluster, "trainer")
    assert pod["spec"]["nodeName"] == "gpu-node-0"


def test_a_pod_asking_for_more_gpus_than_any_node_has_stays_pending(
    cluster: LocalCluster, gpu_node: dict[str, Any]
) -> None:
    cluster.kube.create(deployment("greedy", "gpu-node-0", gpus=3))

    def refused() -> bool:
        pods = pods_of(cluster, "greedy")
        return bool(pods) and condition(pods[0], "PodScheduled").get("reason") == "Unschedulable"

    assert processes.wait_until(refused, 90), pods_of(cluster, "greedy")
    (pod,) = pods_of(cluster, "greedy")
    assert "nvidia.com/gpu" in condition(pod, "PodScheduled")["message"]
    assert not pod["spec"].get("nodeName")
