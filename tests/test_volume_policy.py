"""The chart's admission policies against deleting a Volume by hand (`kubectl delete fmvol`,
a GitOps prune), in the real API server: refused while a host has it published or while a
PersistentVolume names it, each named in the refusal; the CSI controller's DeleteVolume,
which Kubernetes calls while the PV still exists, goes through. Before these policies any
such delete un-exported the volume at once and its agents removed its data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from flashmesh.core import resources
from flashmesh.csi_driver._proto import csi_pb2
from flashmesh.csi_driver.cluster import Cluster
from flashmesh.csi_driver.controller import DELETE_CONFIRMED, Controller
from flashmesh.kube import Kube, KubeError
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.crds import install_admission_policies
from flashmesh.lab.processes import wait_until

pytestmark = pytest.mark.cluster

API = resources.API_VERSION
NS = "flashmesh-system"
HOST = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-00000000a0a0"
PUBLISHED, BOUND, PLAIN, CONFIRMED, BY_CSI = (f"fm-00000000a00{n}" for n in range(1, 6))


def volume(name: str, hosts: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "apiVersion": API, "kind": "Volume", "metadata": {"name": name},
        "spec": {"csiName": f"pvc-{name}", "pool": "policy-pool", "size": "64Mi",
                 "layout": {"stripeWidth": 1, "replicas": 1},
                 "segments": [{"index": 0, "replica": 0, "node": "policy-node",
                               "size": "64Mi"}],
                 "hosts": list(hosts)},
    }  # fmt: skip


def persistent_volume(handle: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"pv-{handle}"},
        "spec": {"capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain",
                 "claimRef": {"namespace": "training", "name": f"data-{handle}"},
                 "csi": {"driver": resources.CSI_DRIVER, "volumeHandle": handle}},
    }  # fmt: skip


@pytest.fixture
def policies(crds: LocalCluster) -> Iterator[LocalCluster]:
    kube = crds.kube
    made = install_admission_policies(crds)
    for name, hosts in ((PUBLISHED, (HOST,)), (BOUND, ()), (PLAIN, ()), (CONFIRMED, ())):
        kube.create(volume(name, hosts))
    kube.create(volume(BY_CSI))
    for handle in (BOUND, CONFIRMED, BY_CSI):
        kube.create(persistent_volume(handle))
    try:
        yield crds
    finally:
        release = {"metadata": {"annotations": {DELETE_CONFIRMED: "true"}}, "spec": {"hosts": []}}
        for name in (PUBLISHED, BOUND, PLAIN, CONFIRMED, BY_CSI):
            if kube.get(API, "Volume", name) is not None:
                kube.patch(API, "Volume", name, release)  # whatever the policies still hold
                kube.delete(API, "Volume", name)
        for handle in (BOUND, CONFIRMED, BY_CSI):
            kube.delete("v1", "PersistentVolume", f"pv-{handle}")
        for obj in made:
            kube.delete(obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


def refused(cluster: LocalCluster, name: str) -> str:
    """Why a dry-run delete of a Volume is refused; empty when it would be allowed."""
    result = cluster.kubectl(
        "delete", "volumes.flashmesh.dev", name, "--dry-run=server", check=False
    )
    return result.stderr if result.returncode else ""


def delete(kube: Kube, name: str) -> str:
    """Deletes a Volume for real; the refusal's message, or empty when it went."""
    try:
        kube.delete(API, "Volume", name)
    except KubeError as exc:
        assert exc.status == 403, exc
        return exc.message
    return ""


def test_a_published_or_bound_volume_is_not_deleted_by_hand(policies: LocalCluster) -> None:
    kube = policies.kube
    # The API server loads policies and their parameters (every PV) through informers.
    assert wait_until(lambda: refused(policies, PUBLISHED) and refused(policies, BOUND), 60)

    message = delete(kube, PUBLISHED)
    assert f"Volume {PUBLISHED} is published to {HOST}" in message, message
    message = delete(kube, BOUND)
    assert f"PersistentVolume pv-{BOUND} (claim training/data-{BOUND})" in message, message
    assert "annotate it flashmesh.dev/delete-confirmed=true" in message
    for name in (PUBLISHED, BOUND):
        assert kube.get(API, "Volume", name) is not None

    # Neither published nor named by a PV: deleted. A person who means it confirms.
    assert delete(kube, PLAIN) == ""
    kube.patch(API, "Volume", CONFIRMED, {"metadata": {"annotations": {DELETE_CONFIRMED: "true"}}})
    assert delete(kube, CONFIRMED) == ""
    # ... but no confirmation deletes a published volume.
    kube.patch(API, "Volume", PUBLISHED, {"metadata": {"annotations": {DELETE_CONFIRMED: "true"}}})
    assert "is published to" in delete(kube, PUBLISHED)

    # The CSI controller's DeleteVolume, with the PV still there, as Kubernetes calls it.
    cluster = Cluster(kube, NS, wait_seconds=30).start()
    try:
        Controller(cluster).DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=BY_CSI), None)
    finally:
        cluster.stop()
    assert kube.get(API, "Volume", BY_CSI) is None

    kube.patch(API, "Volume", PUBLISHED, {"spec": {"hosts": []}})
    assert wait_until(lambda: delete(kube, PUBLISHED) == "", 30)
