"""The operator reads from its watches, never by polling the API server: settled, over
several resync periods, it makes no LIST or GET of what a pool reads (as the API server's
own request counters show) and writes no unchanged status; and its watches carry on
after the API server restarts.

No agent runs here: the StorageNodes carry the status and Leases an agent would write."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kopf.testing import KopfRunner
from prometheus_client import REGISTRY

from flashmesh.core import naming, resources
from flashmesh.core.placement import space_used
from flashmesh.core.resources import Snapshot, Volume
from flashmesh.core.units import format_bytes
from flashmesh.kube import Kube
from flashmesh.lab.binaries import locate_csi
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.processes import wait_until
from flashmesh.operator.handlers import OperatorConfig, build_registry

pytestmark = pytest.mark.cluster

API = resources.API_VERSION
NS = "flashmesh-system"
READ_BY_POOLS = {"volumes", "storagenodes", "snapshots", "leases", "nodes"}
Requests = Counter[tuple[str, str, str]]  # (verb, resource, subresource) -> count


def reconciles() -> float:
    return (
        REGISTRY.get_sample_value(
            "flashmesh_operator_reconcile_duration_seconds_count",
            {"kind": "StoragePool", "outcome": "ok"},
        )
        or 0.0
    )


def add_node(kube: Kube, name: str, tier: str) -> None:
    """A StorageNode as its agent would report it, heartbeat first."""
    ensure_namespace(kube)
    kube.renew_lease(NS, naming.node_lease(name), name, 3600)
    kube.create({"apiVersion": API, "kind": "StorageNode",
                 "metadata": {"name": name, "labels": {"tier": tier}}})  # fmt: skip
    report_ready(kube, name)


def report_ready(kube: Kube, name: str, size: str = "10Gi") -> None:
    status = {
        "phase": "Ready",
        "volumeGroup": {"name": "flashmesh", "size": size, "free": size,
                        "thinPool": {"name": "thin", "size": size}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat",
                        "message": "serving"}],
    }  # fmt: skip
    kube.patch(API, "StorageNode", name, {"status": status}, subresource="status")


def add_pool(kube: Kube, name: str, tier: str) -> None:
    kube.create({
        "apiVersion": API, "kind": "StoragePool", "metadata": {"name": name},
        "spec": {"nodeSelector": {"matchLabels": {"tier": tier}}, "transports": ["tcp"]},
    })  # fmt: skip


def pool_status(kube: Kube, name: str) -> dict[str, Any]:
    return (kube.get(API, "StoragePool", name) or {}).get("status") or {}


def ensure_namespace(kube: Kube) -> None:
    if kube.get("v1", "Namespace", NS) is None:
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})


@contextmanager
def operator(cluster: LocalCluster, resync: float) -> Iterator[None]:
    for crd in locate_csi().crd_files():  # VolumeSnapshotClass, as the chart's users have it
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    config = OperatorConfig(NS, resync=resync, kubeconfig=str(cluster.kubeconfig))
    registry = build_registry(config)
    with pytest.MonkeyPatch.context() as env:  # kopf logs in with $KUBECONFIG
        env.setenv("KUBECONFIG", str(cluster.kubeconfig))
        with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=registry) as runner:
            yield
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


def remove(kube: Kube, pool: str, nodes: list[str], kinds: dict[str, list[str]]) -> None:
    for kind, names in kinds.items():
        for name in names:
            kube.delete(API, kind, name)
    kube.delete(API, "StoragePool", pool)
    assert wait_until(lambda: kube.get(API, "StoragePool", pool) is None, 60)
    for node in nodes:
        kube.delete(API, "StorageNode", node)
        kube.delete("coordination.k8s.io/v1", "Lease", naming.node_lease(node), NS)


def volume(index: int, pool: str, nodes: list[str]) -> dict[str, Any]:
    pair = [nodes[index % len(nodes)], nodes[(index + 1) % len(nodes)]]
    return {
        "apiVersion": API, "kind": "Volume", "metadata": {"name": f"fm-st{index:012d}"},
        "spec": {"csiName": f"pvc-st-{index}", "pool": pool, "size": "128Mi",
                 "layout": {"stripeWidth": 2, "replicas": 1},
                 "segments": [{"index": i, "replica": 0, "node": n, "size": "64Mi"}
                              for i, n in enumerate(pair)]},
    }  # fmt: skip


def snapshot(index: int, source: dict[str, Any]) -> dict[str, Any]:
    thin = f"snap-{index}"
    segments = [{"index": s["index"], "replica": 0, "node": s["node"], "thinVolume": thin}
                for s in source["spec"]["segments"]]  # fmt: skip
    return {
        "apiVersion": API, "kind": "Snapshot", "metadata": {"name": f"fm-sn{index:012d}"},
        "spec": {"csiName": f"snapshot-st-{index}", "sourceVolume": source["metadata"]["name"],
                 "size": "128Mi", "segments": segments},
    }  # fmt: skip


def test_a_settled_operator_reads_nothing_and_writes_nothing(crds: LocalCluster) -> None:
    kube, pool = crds.kube, "steady"
    nodes = [f"st-{i}" for i in range(4)]
    volumes = [volume(i, pool, nodes) for i in range(50)]
    snapshots = [snapshot(i, volumes[i]) for i in range(3)]
    used_on = space_used([Volume.from_dict(v) for v in volumes],
                         [Snapshot.from_dict(s) for s in snapshots])  # fmt: skip
    used = format_bytes(sum(used_on.get(n, 0) for n in nodes))
    for node in nodes:
        add_node(kube, node, "steady")
    add_pool(kube, pool, "steady")
    for obj in volumes + snapshots:
        kube.create(obj)
    with operator(crds, resync=1.0):
        try:
            before, after, passes = settle_and_measure(crds, pool, len(nodes), used)
        finally:  # while the operator runs: it holds the pool's finalizer
            made = {"Snapshot": snapshots, "Volume": volumes}
            remove(
                kube, pool, nodes, {k: [o["metadata"]["name"] for o in v] for k, v in made.items()}
            )
    delta = after - before
    reads = {k: n for k, n in delta.items() if k[0] in ("LIST", "GET") and k[1] in READ_BY_POOLS}
    assert reads == {}, f"{passes:.0f} reconciles read {reads}"
    writes = {
        k: n
        for k, n in delta.items()
        if k[1] in ("storagepools", "storagenodes") and k[0] not in ("WATCH", "LIST", "GET")
    }
    assert writes == {}, f"{passes:.0f} reconciles of an unchanged pool wrote {writes}"


def settle_and_measure(
    cluster: LocalCluster, pool: str, nodes: int, used: str
) -> tuple[Requests, Requests, float]:
    """The API server's request counts before and after several resync passes of a
    settled operator, and how many passes there were."""
    kube = cluster.kube

    def settled() -> bool:
        found = kube.get(API, "StoragePool", pool) or {}
        status = found.get("status") or {}
        # kopf's own bookkeeping done too: after its create handler returns it records the
        # handled spec and clears its progress marks (one PATCH of the pool's annotations),
        # which on a busy machine can land after the status looks settled.
        marks = {
            key.removeprefix("operator.flashmesh.dev/")
            for key in (found.get("metadata") or {}).get("annotations") or {}
            if key.startswith("operator.flashmesh.dev/")
        }  # fmt: skip
        return (status.get("phase"), status.get("nodesReady"), status.get("used")) == (
            "Ready", nodes, used,
        ) and marks - {"kopf-managed"} == {"last-handled-configuration"}  # fmt: skip

    assert wait_until(settled, 90), kube.get(API, "StoragePool", pool)
    # A few more passes, so that what the settling wrote has come back by watch.
    start = reconciles()
    assert wait_until(lambda: reconciles() >= start + 2, 30)
    before = cluster.request_counts()
    start = reconciles()
    for node in [f"st-{i}" for i in range(nodes)]:  # heartbeats renewed: that changes nothing
        kube.renew_lease(NS, naming.node_lease(node), node, 3600)
    assert wait_until(lambda: reconciles() >= start + 5, 60), "no resync seen"
    after = cluster.request_counts()
    assert pool_status(kube, pool)["phase"] == "Ready"
    return before, after, reconciles() - start


def test_the_watches_carry_on_after_the_api_server_restarts(crds: LocalCluster) -> None:
    """With a resync far beyond the test, only a watch can bring each change in."""
    kube, pool = crds.kube, "restarted"
    add_node(kube, "rs-0", "restarted")
    add_pool(kube, pool, "restarted")
    with operator(crds, resync=3600):
        try:
            assert wait_until(lambda: pool_status(kube, pool).get("nodesReady") == 1, 60)
            crds.restart_apiserver()
            # A heartbeat Lease going away: the operator's own watch of Leases sees it.
            kube.delete("coordination.k8s.io/v1", "Lease", naming.node_lease("rs-0"), NS)

            def stale() -> bool:
                found = pool_status(kube, pool).get("conditions") or []
                degraded = [c["message"] for c in found if c["type"] == "Degraded"]
                return bool(degraded) and "rs-0: heartbeat stale" in degraded[0]

            # Generous: kopf and the API server each back off while it comes up.
            assert wait_until(stale, 120), pool_status(kube, pool)
            assert pool_status(kube, pool)["phase"] == "NotReady"  # its only node
            # Its agent returns, and a new node joins: kopf's watches see both.
            kube.renew_lease(NS, naming.node_lease("rs-0"), "rs-0", 3600)
            report_ready(kube, "rs-0")
            add_node(kube, "rs-1", "restarted")

            def both_serve() -> bool:
                status = pool_status(kube, pool)
                return (status.get("nodesReady"), status.get("phase")) == (2, "Ready")

            assert wait_until(both_serve, 120), pool_status(kube, pool)
            assert (kube.get(API, "StorageNode", "rs-1") or {})["spec"]["pool"] == pool
        finally:
            remove(kube, pool, ["rs-0", "rs-1"], {})
