"""The CSI controller on watched caches, against the real API server: two placements never
count the same space even when the watch is late, a controller at rest (or answering
reads) asks the API server nothing, and its caches come back after the API server
restarts.

Like tests/test_csi_controller.py, no agent runs: StorageNodes carry the status and
Leases an agent would write, and a placed volume's wait for agents runs out
(DEADLINE_EXCEEDED) with its Volume object made."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from flashmesh.core import naming, resources
from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc
from flashmesh.csi_driver.cluster import Cluster
from flashmesh.csi_driver.controller import Controller
from flashmesh.csi_driver.server import serve
from flashmesh.informer import Informer, key_of
from flashmesh.kube import Kube, KubeError
from flashmesh.lab.cluster import LocalCluster

pytestmark = pytest.mark.cluster

API = resources.API_VERSION
NS = "flashmesh-system"
MIB = 1 << 20
Code = grpc.StatusCode
# What the controller reads; the API server's counters name them so.
WATCHED = {"volumes", "snapshots", "storagenodes", "storagepools", "leases", "csinodes"}
OWNED = {"volumes", "snapshots"}


class LateVolumeWatch(Kube):
    """The same client, whose Volume watch events arrive `delay` seconds late: a loaded
    API server, a slow network, a watch reconnecting."""

    def __init__(self, kube: Kube, delay: float) -> None:
        super().__init__(kube.api_client)
        self.delay = delay

    def watch(self, api_version: str, kind: str, *args: Any, **kwargs: Any) -> Any:
        for event in super().watch(api_version, kind, *args, **kwargs):
            if kind == "Volume":
                time.sleep(self.delay)
            yield event


def add_node(kube: Kube, pool: str, node: str, size: str = "1Gi") -> dict[str, Any]:
    """A Ready StorageNode of the pool with a held Lease, as its agent would report."""
    if kube.get("v1", "Namespace", NS) is None:
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    kube.create({"apiVersion": API, "kind": "StorageNode",
                 "metadata": {"name": node, "labels": {"pool": pool}},
                 "spec": {"pool": pool}})  # fmt: skip
    status = {"phase": "Ready", "volumeGroup": {
        "name": f"flashmesh-{pool}", "size": size, "free": size,
        "thinPool": {"name": "thin", "size": size}}}  # fmt: skip
    written = kube.patch(API, "StorageNode", node, {"status": status}, subresource="status")
    kube.renew_lease(NS, naming.node_lease(node), node, 3600)
    return written


def add_pool(kube: Kube, pool: str, nodes: list[str], stripes: int = 1) -> None:
    kube.create({
        "apiVersion": API, "kind": "StoragePool", "metadata": {"name": pool},
        "spec": {"nodeSelector": {"matchLabels": {"pool": pool}}, "defaultVolumeSize": "8Mi",
                 "layout": {"stripeWidth": stripes}},
    })  # fmt: skip
    for node in nodes:
        add_node(kube, pool, node)


def remove_pool(kube: Kube, pool: str, nodes: list[str]) -> None:
    for vol in kube.list(API, "Volume"):
        if vol["spec"]["pool"] == pool:
            kube.delete(API, "Volume", vol["metadata"]["name"])
    for node in nodes:
        kube.delete(API, "StorageNode", node)
    kube.delete(API, "StoragePool", pool)


@contextmanager
def serving(cluster: Cluster, tmp: Any) -> Iterator[Any]:
    """The controller on an in-process gRPC server, its caches filled first."""
    cluster.start()
    controller = Controller(cluster)
    socket = tmp / "csi.sock"
    server = serve(
        f"unix://{socket}",
        [lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s)],
    )
    channel = grpc.insecure_channel(f"unix://{socket}")
    try:
        yield csi_pb2_grpc.ControllerStub(channel)
    finally:
        channel.close()
        server.stop(0)
        cluster.stop()


def code_of(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=60)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return Code.OK, ""


def create(name: str, pool: str, size: int = 0) -> csi_pb2.CreateVolumeRequest:
    Mode = csi_pb2.VolumeCapability.AccessMode
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                   access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))  # fmt: skip
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[cap],
        parameters={"pool": pool},
    )


def cached(informer: Informer, written: dict[str, Any], timeout: float = 30) -> bool:
    """Whether the watch brought this write into the cache within timeout."""
    return informer.wait_seen(key_of(written), written["metadata"]["resourceVersion"], timeout)


def placed(kube: Kube, pool: str) -> list[str]:
    return sorted(v["spec"]["csiName"] for v in kube.list(API, "Volume")
                  if v["spec"]["pool"] == pool)  # fmt: skip


# --- placement: the write-side check --------------------------------------------------------


@pytest.mark.parametrize(
    ("delay", "observe"),
    [(1.0, 10.0), (3600.0, 0.5)],
    ids=["watch-late", "watch-stalled"],
)
def test_two_placements_never_count_the_same_space(
    crds: LocalCluster, tmp_path: Any, delay: float, observe: float
) -> None:
    """One 1 GiB node, two 600 MiB volumes back to back: the first is placed, the second
    is RESOURCE_EXHAUSTED. The first's Volume reaches the cache late (1 s) or never: the
    placement waits for it (watch-late) or puts what it wrote into the cache itself
    (watch-stalled), so the second placement counts the first."""
    kube, pool, nodes = crds.kube, f"race-{int(delay)}", [f"race-{int(delay)}-a"]
    add_pool(kube, pool, nodes)
    cluster = Cluster(LateVolumeWatch(kube, delay), NS, wait_seconds=0.3, observe_seconds=observe)
    try:
        with serving(cluster, tmp_path) as stub:
            first = code_of(stub.CreateVolume, create("pvc-first", pool, 600 * MIB))
            second = code_of(stub.CreateVolume, create("pvc-second", pool, 600 * MIB))
        assert first[0] == Code.DEADLINE_EXCEEDED, first  # placed; no agent serves it
        assert second[0] == Code.RESOURCE_EXHAUSTED, second
        assert placed(kube, pool) == ["pvc-first"]
    finally:
        remove_pool(kube, pool, nodes)


# --- steady state: no API requests -------------------------------------------------------------


def test_a_controller_at_rest_or_answering_reads_asks_the_api_server_nothing(
    crds: LocalCluster, tmp_path: Any
) -> None:
    """Several Volumes, a Snapshot, a CSINode. While no call runs, and then while the
    sidecars' periodic reads come in (GetCapacity, ListVolumes, ControllerGetVolume,
    ValidateVolumeCapabilities, ListSnapshots, a repeated CreateVolume), the API server
    counts no LIST or GET of what the controller reads, and no write of Volumes or
    Snapshots (watches are long-lived and counted when they end)."""
    kube, pool, nodes = crds.kube, "idle", ["idle-a", "idle-b"]
    add_pool(kube, pool, nodes)
    driver = {"name": resources.CSI_DRIVER, "nodeID": "nqn.idle"}
    kube.create({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                 "metadata": {"name": "idle-host"}, "spec": {"drivers": [driver]}})  # fmt: skip
    user = Kube.from_kubeconfig(crds.kubeconfig, user_agent="flashmesh-csi-controller")
    cluster = Cluster(user, NS, wait_seconds=0.3)
    try:
        with serving(cluster, tmp_path) as stub:
            requests = [create(f"pvc-idle-{i}", pool, 8 * MIB) for i in range(5)]
            for request in requests:
                assert code_of(stub.CreateVolume, request)[0] == Code.DEADLINE_EXCEEDED
            vids = [naming.volume_id(r.name) for r in requests]
            snapshot = csi_pb2.CreateSnapshotRequest(name="snap-idle", source_volume_id=vids[0])
            assert code_of(stub.CreateSnapshot, snapshot)[0] == Code.DEADLINE_EXCEEDED

            before = crds.request_counts()
            time.sleep(3)  # at rest: a window measured, not a wait for some state
            at_rest = crds.request_counts()
            for _ in range(3):
                stub.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"pool": pool}))
                stub.GetCapacity(csi_pb2.GetCapacityRequest())
                stub.ListVolumes(csi_pb2.ListVolumesRequest())
                stub.ListSnapshots(csi_pb2.ListSnapshotsRequest())
                for vid, request in zip(vids, requests, strict=True):
                    stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
                    validate = csi_pb2.ValidateVolumeCapabilitiesRequest(
                        volume_id=vid, volume_capabilities=request.volume_capabilities
                    )
                    stub.ValidateVolumeCapabilities(validate)
                assert code_of(stub.CreateVolume, requests[1])[0] == Code.DEADLINE_EXCEEDED
            reading = crds.request_counts()
    finally:
        user.close()
        kube.delete("storage.k8s.io/v1", "CSINode", "idle-host")
        kube.delete(API, "Snapshot", naming.snapshot_id("snap-idle"))
        remove_pool(kube, pool, nodes)

    def counted(verb: str, resource: str) -> bool:
        # Reads of what the controller caches, and any write of what only it and the
        # agents write (the control plane renews its own Leases meanwhile).
        if verb in ("LIST", "GET"):
            return resource in WATCHED
        return verb != "WATCH" and resource in OWNED

    def made(start: Any, end: Any) -> Any:
        return {k: v - start[k] for k, v in end.items()
                if counted(k[0], k[1]) and v > start[k]}  # fmt: skip

    assert made(before, at_rest) == {}, "requests while at rest"
    assert made(at_rest, reading) == {}, "requests while answering reads"


# --- an API server restart ---------------------------------------------------------------------


def test_the_caches_come_back_after_the_api_server_restarts(
    crds: LocalCluster, tmp_path: Any
) -> None:
    """After a restart, a StorageNode and a Volume written anew reach the controller's
    caches through its watches, and a two-stripe volume is placed on the new node."""
    kube, pool, nodes = crds.kube, "restart", ["restart-a"]
    add_pool(kube, pool, nodes, stripes=2)
    cluster = Cluster(kube, NS, wait_seconds=0.3)
    try:
        with serving(cluster, tmp_path) as stub:
            request = create("pvc-after-restart", pool, 16 * MIB)
            got, message = code_of(stub.CreateVolume, request)
            assert got == Code.OUT_OF_RANGE and "the pool has 1 node(s)" in message, message
            try:
                crds.restart_apiserver()
            finally:
                answering(kube)
            nodes.append("restart-b")
            written = add_node(kube, pool, "restart-b")
            assert cached(cluster.cache.storage_nodes, written, 90), "StorageNode not seen"
            lease = kube.get("coordination.k8s.io/v1", "Lease", naming.node_lease(nodes[1]), NS)
            assert lease and cached(cluster.cache.leases, lease), "Lease not seen"
            volume = kube.create({"apiVersion": API, "kind": "Volume",
                                  "metadata": {"name": "fm-restart-direct"},
                                  "spec": {"csiName": "direct", "pool": pool, "size": "8Mi",
                                           "layout": {"stripeWidth": 1, "replicas": 1},
                                           "segments": [], "hosts": []}})  # fmt: skip
            assert cached(cluster.cache.volumes, volume), "Volume not seen"
            got, message = code_of(stub.CreateVolume, request)
            assert got == Code.DEADLINE_EXCEEDED, message  # placed, waiting for agents
        vid = naming.volume_id("pvc-after-restart")
        segments = (kube.get(API, "Volume", vid) or {})["spec"]["segments"]
        assert sorted(s["node"] for s in segments) == nodes
    finally:
        answering(kube)
        remove_pool(kube, pool, nodes)


def answering(kube: Kube, timeout: float = 120) -> None:
    """Returns once the API server answers again (the session's other tests need it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            kube.list(API, "StoragePool")
            return
        except KubeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
