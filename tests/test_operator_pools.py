"""The operator's StoragePool handling against the real API server, run by kopf's
KopfRunner: a pool takes the nodes its selector picks and gets its StorageClass and
VolumeSnapshotClass; its capacity is the sum over its nodes; a stale heartbeat makes it
Degraded; the API server refuses deleting it while it holds volumes.

No agent runs here: the StorageNodes carry the status and Leases an agent would write."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kopf.testing import KopfRunner
from prometheus_client import REGISTRY

from flashmesh import cli, status
from flashmesh.core import naming, resources
from flashmesh.kube import Kube, KubeError
from flashmesh.lab.binaries import locate_csi
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.crds import install_admission_policies
from flashmesh.lab.processes import wait_until
from flashmesh.operator.handlers import OperatorConfig, build_registry

pytestmark = pytest.mark.cluster

API = resources.API_VERSION
NS = "flashmesh-system"
POOL = "op-pool"
SIZES = {"op-a": "1Gi", "op-b": "2Gi"}


def node_status(size: str) -> dict[str, Any]:
    return {
        "phase": "Ready",
        "volumeGroup": {"name": f"flashmesh-{POOL}", "size": size, "free": size,
                        "thinPool": {"name": "thin", "size": size}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat",
                        "message": "serving"}],
    }  # fmt: skip


def beat(kube: Kube, node: str, seconds: int = 3600) -> None:
    kube.renew_lease(NS, naming.node_lease(node), node, seconds)


def pool_status(kube: Kube) -> dict[str, Any]:
    return (kube.get(API, "StoragePool", POOL) or {}).get("status") or {}


def condition(kube: Kube, kind: str) -> dict[str, Any]:
    found = [c for c in pool_status(kube).get("conditions") or [] if c["type"] == kind]
    return found[0] if found else {}


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def events(kube: Kube, reason: str) -> list[str]:
    return [
        e["message"]
        for e in kube.list("v1", "Event", "default")
        if e["involvedObject"].get("name") == POOL and e["reason"] == reason
    ]


@pytest.fixture(scope="module")
def operator(crds: LocalCluster) -> Iterator[Kube]:
    kube = crds.kube
    policy = install_admission_policies(crds)
    for crd in locate_csi().crd_files():  # VolumeSnapshotClass, as the chart's users have it
        crds.kubectl("apply", "--server-side", "-f", str(crd))
    if kube.get("v1", "Namespace", NS) is None:
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    for node, size in SIZES.items():
        labels = {"tier": "nvme", "rack": node}
        kube.create({"apiVersion": API, "kind": "StorageNode",
                     "metadata": {"name": node, "labels": labels}})  # fmt: skip
        kube.patch(API, "StorageNode", node, {"status": node_status(size)}, subresource="status")
        beat(kube, node)
    registry = build_registry(OperatorConfig(NS, resync=1.0, kubeconfig=str(crds.kubeconfig)))
    # kopf logs in with $KUBECONFIG: set for this module only, so no later process of the
    # session (a demo with its own cluster) inherits it.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KUBECONFIG", str(crds.kubeconfig))
        with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=registry) as runner:
            yield kube
    for obj in policy:
        kube.delete(obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


def test_a_pool_takes_its_nodes_and_gets_its_storage_class(operator: Kube) -> None:
    kube = operator
    kube.create({
        "apiVersion": API, "kind": "StoragePool", "metadata": {"name": POOL},
        "spec": {"nodeSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                        "values": ["nvme"]}]},
                 "layout": {"stripeWidth": 2}, "transports": ["tcp"]},
    })  # fmt: skip
    assert wait_until(lambda: pool_status(kube).get("phase") == "Ready", 60), pool_status(kube)
    for node in SIZES:
        assert (kube.get(API, "StorageNode", node) or {})["spec"]["pool"] == POOL
    sc = kube.get("storage.k8s.io/v1", "StorageClass", f"flashmesh-{POOL}")
    assert sc is not None
    assert sc["provisioner"] == resources.CSI_DRIVER
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    assert sc["parameters"] == {"pool": POOL, "stripeWidth": "2", "replicas": "1",
                                "transport": "tcp"}  # fmt: skip
    assert sc["metadata"]["ownerReferences"][0]["name"] == POOL
    vsc = kube.get("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass", f"flashmesh-{POOL}")
    assert vsc is not None
    assert (vsc["driver"], vsc["deletionPolicy"]) == (resources.CSI_DRIVER, "Delete")
    assert sorted(events(kube, "NodeJoined")) == [
        f"StorageNode {n} joined the pool" for n in sorted(SIZES)
    ]
    assert pool_status(kube)["storageClassName"] == f"flashmesh-{POOL}"


def test_pool_capacity_is_the_sum_over_its_nodes(operator: Kube) -> None:
    kube = operator
    status = pool_status(kube)
    assert (status["capacity"], status["used"], status["free"]) == ("3Gi", "0", "3Gi")
    assert (status["nodesTotal"], status["nodesReady"]) == (2, 2)
    # A volume placed on the pool's nodes counts as used at once.
    kube.create({
        "apiVersion": API, "kind": "Volume", "metadata": {"name": "fm-0p0000000001"},
        "spec": {"csiName": "pvc-op-1", "pool": POOL, "size": "512Mi",
                 "layout": {"stripeWidth": 2, "replicas": 1},
                 "segments": [{"index": i, "replica": 0, "node": n, "size": "256Mi"}
                              for i, n in enumerate(sorted(SIZES))]},
    })  # fmt: skip
    assert wait_until(lambda: pool_status(kube).get("used") == "512Mi", 30), pool_status(kube)
    assert pool_status(kube)["free"] == "2560Mi"
    # The same numbers on the operator's /metrics (kopf runs it in this process).
    assert sample("flashmesh_pool_capacity_bytes", pool=POOL) == 3 << 30
    assert wait_until(lambda: sample("flashmesh_pool_used_bytes", pool=POOL) == 512 << 20, 30)
    assert sample("flashmesh_pool_nodes", pool=POOL, ready="true") == 2
    assert sample("flashmesh_volumes", pool=POOL, phase="Pending") == 1


def test_flashmesh_status_shows_pools_nodes_volumes_and_paths(
    operator: Kube, crds: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    found = {t.title: t for t in status.tables(operator)}
    pools = {row[0]: row for row in found["Pools"].rows}
    assert pools[POOL][1:6] == ("Ready", "2/2", "3Gi", "512Mi", "2560Mi")
    nodes = {row[0]: row for row in found["Storage nodes"].rows}
    assert nodes["op-a"][1:3] == (POOL, "Ready") and nodes["op-b"][4] == "2Gi"
    volumes = {row[0]: row for row in found["Volumes"].rows}
    assert volumes["pvc-op-1"][1:7] == ("fm-0p0000000001", POOL, "512Mi", "2x1", "Pending",
                                        "op-a, op-b")  # fmt: skip
    assert cli.main(["status", "--kubeconfig", str(crds.kubeconfig)]) == 0
    printed = capsys.readouterr().out
    for title in ("Pools", "Storage nodes", "Volumes", "Paths (segment exports)"):
        assert title in printed
    assert "pvc-op-1" in printed and "flashmesh-op-pool" in printed


def test_a_stale_heartbeat_makes_the_pool_degraded(operator: Kube) -> None:
    kube = operator
    beat(kube, "op-b", seconds=1)  # its agent stops renewing: stale a second later
    assert wait_until(lambda: pool_status(kube).get("phase") == "Degraded", 30), pool_status(kube)
    degraded = condition(kube, "Degraded")
    assert degraded["status"] == "True"
    assert "op-b: heartbeat stale" in degraded["message"]
    assert pool_status(kube)["nodesReady"] == 1
    assert any("heartbeat stale" in m for m in events(kube, "NodeProblems"))
    node = (kube.get(API, "StorageNode", "op-b") or {})["status"]
    assert node["phase"] == "NotReady"
    assert [c["reason"] for c in node["conditions"] if c["type"] == "Ready"] == ["HeartbeatStale"]
    # Its agent returns: it renews the Lease and reports the node Ready again.
    beat(kube, "op-b")
    kube.patch(API, "StorageNode", "op-b", {"status": node_status("2Gi")}, subresource="status")
    assert wait_until(lambda: pool_status(kube).get("phase") == "Ready", 30), pool_status(kube)
    assert condition(kube, "Degraded")["status"] == "False"


def test_deleting_a_pool_with_volumes_is_refused_until_they_are_gone(operator: Kube) -> None:
    kube = operator
    with pytest.raises(KubeError) as refused:
        kube.delete(API, "StoragePool", POOL)
    assert refused.value.status in (403, 422), refused.value
    assert "still holds Volume fm-0p0000000001" in str(refused.value)
    assert "pvc-op-1" in str(refused.value)
    assert kube.get(API, "StoragePool", POOL) is not None
    assert (kube.get(API, "StoragePool", POOL) or {})["metadata"].get("deletionTimestamp") is None

    kube.delete(API, "Volume", "fm-0p0000000001")
    assert wait_until(lambda: kube.get(API, "Volume", "fm-0p0000000001") is None, 30)
    # The policy reads Volumes through the API server's informer: allowed within moments.
    assert wait_until(lambda: _deleted(kube), 30)
    assert wait_until(lambda: kube.get(API, "StoragePool", POOL) is None, 60)
    for node in SIZES:
        assert not (kube.get(API, "StorageNode", node) or {})["spec"].get("pool")
    gone = wait_until(
        lambda: kube.get("storage.k8s.io/v1", "StorageClass", f"flashmesh-{POOL}") is None, 60
    )
    assert gone, "the garbage collector keeps the pool's StorageClass"


def _deleted(kube: Kube) -> bool:
    try:
        kube.delete(API, "StoragePool", POOL)
    except KubeError as exc:
        if exc.status in (403, 422):
            return False
        raise
    return True
