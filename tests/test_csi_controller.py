"""The CSI controller on an in-process gRPC server against the real API server: every bad
request answered with the code the CSI spec prescribes and a message naming the field;
placement, idempotency and locking; a fuzz that never yields INTERNAL.

No agent runs here: the pool's two StorageNodes carry the status and Leases an agent would
write, and a valid volume waits (briefly) for agents that never come: DEADLINE_EXCEEDED,
with its Volume object placed. The kernel lab proves the happy paths with real agents.

The controller reads watched caches: where a test writes an object and then calls it, the
test first waits until the controller's cache has seen that write, as any informer-based
controller needs."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from flashmesh.core import naming, resources
from flashmesh.csi_driver import orphans
from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc
from flashmesh.csi_driver.cluster import Cluster
from flashmesh.csi_driver.controller import Controller
from flashmesh.csi_driver.errors import CsiError, status_of
from flashmesh.csi_driver.identity import Identity
from flashmesh.csi_driver.placement_lease import PlacementLease
from flashmesh.csi_driver.server import serve
from flashmesh.informer import Informer, key_of
from flashmesh.kube import Kube
from flashmesh.lab.cluster import LocalCluster

pytestmark = pytest.mark.cluster

API = resources.API_VERSION
NS = "flashmesh-system"
POOL = "csi-table"
NODES = ("csi-a", "csi-b")
MIB = 1 << 20
Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode


def mount(mode: int = Mode.SINGLE_NODE_WRITER, fs: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def block(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def renew(kube: Kube, node: str) -> None:
    kube.renew_lease(NS, naming.node_lease(node), node, 3600)


def cached(informer: Informer, written: dict[str, Any] | None) -> None:
    """Returns once the controller's cache has seen this write (woken by its watch)."""
    assert written is not None
    version = written["metadata"]["resourceVersion"]
    assert informer.wait_seen(key_of(written), version, 30), f"{key_of(written)} not cached"


def csinode(kube: Kube, name: str, host: str) -> dict[str, Any]:
    """A CSINode naming host as FlashMesh's node id, as the node plugin's registration."""
    driver = {"name": resources.CSI_DRIVER, "nodeID": host}
    return kube.create({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                        "metadata": {"name": name}, "spec": {"drivers": [driver]}})  # fmt: skip


def published(
    stub: Any,
    pool: Kube,
    controller: Controller,
    vid: str,
    node: str,
    host: str,
    cap: csi_pb2.VolumeCapability | None = None,
) -> csi_pb2.ControllerPublishVolumeRequest:
    """Registers host as node's CSINode and publishes vid to it: allowed in the Volume
    object (no agent here reports it served, so the wait runs out); the request made."""
    cached(controller.cluster.cache.csinodes, csinode(pool, node, host))
    request = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=host, volume_capability=cap or mount()
    )
    assert code_of(stub[0].ControllerPublishVolume, request)[0] == Code.DEADLINE_EXCEEDED
    return request


@pytest.fixture(scope="module")
def pool(crds: LocalCluster) -> Iterator[Kube]:
    """A pool of two 1 GiB nodes, as their agents would report them."""
    kube = crds.kube
    if kube.get("v1", "Namespace", NS) is None:
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    kube.create({
        "apiVersion": API, "kind": "StoragePool", "metadata": {"name": POOL},
        "spec": {"nodeSelector": {"matchLabels": {"pool": POOL}}, "defaultVolumeSize": "64Mi",
                 "layout": {"stripeWidth": 2}},
    })  # fmt: skip
    for node in NODES:
        kube.create({"apiVersion": API, "kind": "StorageNode",
                     "metadata": {"name": node, "labels": {"pool": POOL}},
                     "spec": {"pool": POOL}})  # fmt: skip
        status = {"phase": "Ready", "volumeGroup": {
            "name": f"flashmesh-{POOL}", "size": "1Gi", "free": "1Gi",
            "thinPool": {"name": "thin", "size": "1Gi"}}}  # fmt: skip
        kube.patch(API, "StorageNode", node, {"status": status}, subresource="status")
        renew(kube, node)
    yield kube
    for vol in kube.list(API, "Volume"):
        if vol["spec"]["pool"] == POOL:
            kube.delete(API, "Volume", vol["metadata"]["name"])


@pytest.fixture(scope="module")
def controller(pool: Kube) -> Iterator[Controller]:
    cluster = Cluster(pool, NS, wait_seconds=0.3).start()
    yield Controller(cluster)
    cluster.stop()


@pytest.fixture(scope="module")
def stub(controller: Controller, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    socket = tmp_path_factory.mktemp("csi") / "csi.sock"
    server = serve(
        f"unix://{socket}",
        [
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), s),
        ],
    )
    channel = grpc.insecure_channel(f"unix://{socket}")
    yield csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.IdentityStub(channel)
    channel.close()
    server.stop(0)


def code_of(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=30)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return Code.OK, ""


def create(name: str, size: int = 0, limit: int = 0, caps: list[Any] | None = None,
           **parameters: str) -> csi_pb2.CreateVolumeRequest:  # fmt: skip
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size, limit_bytes=limit),
        volume_capabilities=[mount()] if caps is None else caps,
        parameters={"pool": POOL, **parameters},
    )


BAD_CREATES = [
    (create(""), Code.INVALID_ARGUMENT, "name is missing"),
    (create("v", caps=[]), Code.INVALID_ARGUMENT, "volume_capabilities is missing"),
    (create("v", size=-1), Code.INVALID_ARGUMENT, "must not be negative"),
    (create("v", size=8 * MIB, limit=4 * MIB), Code.OUT_OF_RANGE, "limit_bytes 4194304 is below"),
    (create("v", stripes="2"), Code.INVALID_ARGUMENT, "unknown parameter stripes"),
    (create("v", replicas="3"), Code.INVALID_ARGUMENT, "replicas=3 is out of range: use 1..2"),
    (create("v", replicas="2", caps=[block(Mode.MULTI_NODE_READER_ONLY)]), Code.INVALID_ARGUMENT,
     "mirrored volume (replicas: 2) is attached to one node at a time"),
    (create("v", caps=[mount(Mode.MULTI_NODE_MULTI_WRITER)]), Code.INVALID_ARGUMENT,
     "MULTI_NODE_MULTI_WRITER is served for block volumes only"),
    (create("v", caps=[mount(fs="btrfs")]), Code.INVALID_ARGUMENT, "fs_type 'btrfs'"),
    (create("v", caps=[block(Mode.MULTI_NODE_SINGLE_WRITER)]), Code.INVALID_ARGUMENT,
     "MULTI_NODE_SINGLE_WRITER is not supported"),
    (create("v", pool="nowhere"), Code.INVALID_ARGUMENT, "pool='nowhere' names no StoragePool"),
    (csi_pb2.CreateVolumeRequest(name="v", volume_capabilities=[mount()]), Code.INVALID_ARGUMENT,
     "parameter pool is missing"),
    (create("v", size=4 << 30), Code.OUT_OF_RANGE, "able to hold 2Gi at most"),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "code", "named"), BAD_CREATES)
def test_bad_create_requests_get_the_specs_code(
    stub: Any, pool: Kube, request_: Any, code: grpc.StatusCode, named: str
) -> None:
    before = {v["metadata"]["name"] for v in pool.list(API, "Volume")}
    got, message = code_of(stub[0].CreateVolume, request_)
    assert (got, named in message) == (code, True), message
    assert {v["metadata"]["name"] for v in pool.list(API, "Volume")} == before  # nothing made


OTHER_BAD = [
    ("DeleteVolume", csi_pb2.DeleteVolumeRequest(), Code.INVALID_ARGUMENT, "volume_id"),
    ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(
        node_id="nqn.x", volume_capability=mount()), Code.INVALID_ARGUMENT, "volume_id"),
    ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(
        volume_id="fm-000000000000", volume_capability=mount()), Code.INVALID_ARGUMENT, "node_id"),
    ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(
        volume_id="fm-000000000000", node_id="nqn.x"), Code.INVALID_ARGUMENT, "volume_capability"),
    ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(
        volume_id="fm-000000000000", node_id="nqn.x", volume_capability=mount()),
     Code.NOT_FOUND, "volume fm-000000000000 does not exist"),
    ("ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(node_id="nqn.x"),
     Code.INVALID_ARGUMENT, "volume_id"),
    ("ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_capabilities=[mount()]), Code.INVALID_ARGUMENT, "volume_id"),
    ("ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="fm-000000000000"), Code.INVALID_ARGUMENT, "volume_capabilities"),
    ("ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="fm-000000000000", volume_capabilities=[mount()]), Code.NOT_FOUND, "does not"),
    ("ListVolumes", csi_pb2.ListVolumesRequest(starting_token="zz"), Code.ABORTED, "zz"),
    ("ListVolumes", csi_pb2.ListVolumesRequest(max_entries=-1), Code.INVALID_ARGUMENT,
     "max_entries"),
    ("ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(volume_id="fm-000000000000"),
     Code.NOT_FOUND, "does not exist"),
    ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
        volume_id="fm-000000000000"), Code.INVALID_ARGUMENT, "capacity_range is missing"),
    ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
        volume_id="fm-000000000000", capacity_range=csi_pb2.CapacityRange(required_bytes=1)),
     Code.NOT_FOUND, "does not exist"),
    ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(source_volume_id="fm-000000000000"),
     Code.INVALID_ARGUMENT, "name is missing"),
    ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(name="s"), Code.INVALID_ARGUMENT,
     "source_volume_id is missing"),
    ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(name="s", source_volume_id="fm-0"),
     Code.NOT_FOUND, "volume fm-0 does not exist"),
    ("DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(), Code.INVALID_ARGUMENT, "snapshot_id"),
    ("GetCapacity", csi_pb2.GetCapacityRequest(parameters={"pool": "none"}),
     Code.INVALID_ARGUMENT, "names no StoragePool"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_", "code", "named"), OTHER_BAD)
def test_other_bad_requests_get_the_specs_code(
    stub: Any, method: str, request_: Any, code: grpc.StatusCode, named: str
) -> None:
    got, message = code_of(getattr(stub[0], method), request_)
    assert (got, named in message) == (code, True), message


def test_deleting_or_unpublishing_what_is_not_there_succeeds(stub: Any) -> None:
    assert code_of(stub[0].DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id="fm-1"))[0] == (
        Code.OK
    )
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id="fm-1", node_id="nqn.x")
    assert code_of(stub[0].ControllerUnpublishVolume, unpublish)[0] == Code.OK
    assert code_of(stub[0].DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id="fs-1"))[
        0
    ] == (Code.OK)


def test_a_volume_is_placed_then_waits_for_agents_and_repeats_are_checked(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    request = create("pvc-placed", size=100 * MIB)
    got, message = code_of(stub[0].CreateVolume, request)
    assert got == Code.DEADLINE_EXCEEDED and "no report from its agent yet" in message
    vid = naming.volume_id("pvc-placed")
    volume = pool.get(API, "Volume", vid) or {}
    segments = volume["spec"]["segments"]
    assert sorted(s["node"] for s in segments) == list(NODES)  # two stripes, two nodes
    assert [s["size"] for s in segments] == ["52Mi", "52Mi"]  # 100Mi in whole extents
    # The same request again: the same object, still waiting.
    assert code_of(stub[0].CreateVolume, request)[0] == Code.DEADLINE_EXCEEDED
    # The same name with another size conflicts.
    got, message = code_of(stub[0].CreateVolume, create("pvc-placed", size=400 * MIB))
    assert got == Code.ALREADY_EXISTS and "outside the capacity_range" in message
    # So do other connection parameters: the volume was answered with the first ones.
    other = create("pvc-placed", size=100 * MIB, transport="rdma", nrIoQueues="8")
    got, message = code_of(stub[0].CreateVolume, other)
    assert got == Code.ALREADY_EXISTS, message
    assert "parameter nrIoQueues 4, not 8" in message and "transport unset, not rdma" in message
    # And the other way: a parameter the first asked for, left out of the repeat.
    assert code_of(stub[0].CreateVolume, create("pvc-rdma", 8 * MIB, transport="rdma"))[0] == (
        Code.DEADLINE_EXCEEDED
    )
    got, message = code_of(stub[0].CreateVolume, create("pvc-rdma", 8 * MIB))
    assert got == Code.ALREADY_EXISTS and "parameter transport rdma, not unset" in message
    # A call on a volume that is busy is refused, not raced.
    with controller.locks.hold(vid):
        got, message = code_of(stub[0].CreateVolume, request)
    assert got == Code.ABORTED and "already in progress" in message


def test_a_new_volume_follows_a_pool_change_the_watch_has_not_delivered(
    pool: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Authentication turned on a moment before a PVC: the new volume's context asks
    NodeStage for the host's key even while the controller's pool watch is behind (here a
    cache filled once and never watched); the agents require the key from then on."""
    cluster = Cluster(pool, NS, wait_seconds=0.3).start()
    behind = Informer(pool, API, "StoragePool")
    behind.fill()
    cluster.cache.pools = behind
    monkeypatch.setattr(cluster, "wait", lambda what, missing: None)  # as if agents reported
    security = {"spec": {"security": {"dhchap": True}}}
    pool.patch(API, "StoragePool", POOL, security)
    vid = naming.volume_id("pvc-auth-now")
    try:
        answer = Controller(cluster).CreateVolume(create("pvc-auth-now", size=8 * MIB), None)
        assert answer.volume.volume_context["dhchap"] == "true"
    finally:
        pool.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": False}}})
        pool.delete(API, "Volume", vid)
        cluster.stop()


def test_a_volume_that_does_not_fit_now_is_resource_exhausted(stub: Any, pool: Kube) -> None:
    # 2 x 1 GiB nodes with 52 MiB placed on each: two 1000 MiB segments could fit an empty
    # pool, but not this one now.
    got, message = code_of(stub[0].CreateVolume, create("pvc-big", size=2000 * MIB))
    assert got == Code.RESOURCE_EXHAUSTED and "need 2 ready node(s) with room" in message
    assert pool.get(API, "Volume", naming.volume_id("pvc-big")) is None


def test_a_stale_heartbeat_takes_a_node_out_of_placement(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    leases = controller.cluster.cache.leases
    lease = pool.get("coordination.k8s.io/v1", "Lease", naming.node_lease("csi-b"), NS) or {}
    lease["spec"]["renewTime"] = "2026-01-01T00:00:00.000000Z"
    lease["spec"]["leaseDurationSeconds"] = 40
    cached(leases, pool.replace(lease))
    try:
        got, message = code_of(stub[0].CreateVolume, create("pvc-stale", size=8 * MIB))
        assert got == Code.RESOURCE_EXHAUSTED, message
    finally:
        renew(pool, "csi-b")
        longer = {"spec": {"leaseDurationSeconds": 3600}}
        lease_name = naming.node_lease("csi-b")
        cached(leases, pool.patch("coordination.k8s.io/v1", "Lease", lease_name, longer, NS))


def test_a_node_id_on_two_csinodes_is_refused_with_an_event(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    vid = naming.volume_id("pvc-placed")
    host = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-0000000000dd"
    for name in ("twin-a", "twin-b"):
        cached(controller.cluster.cache.csinodes, csinode(pool, name, host))
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=vid, node_id=host,
                                                     volume_capability=mount())  # fmt: skip
    got, message = code_of(stub[0].ControllerPublishVolume, request)
    assert got == Code.FAILED_PRECONDITION and "twin-a, twin-b" in message
    events = pool.list("v1", "Event", namespace="default")
    assert any(e["reason"] == "DuplicateHostNQN" and e["involvedObject"]["name"] == vid
               for e in events)  # fmt: skip
    assert host not in (pool.get(API, "Volume", vid) or {})["spec"]["hosts"]
    unknown = csi_pb2.ControllerPublishVolumeRequest(volume_id=vid, node_id="nqn.nobody",
                                                     volume_capability=mount())  # fmt: skip
    got, message = code_of(stub[0].ControllerPublishVolume, unknown)
    assert got == Code.NOT_FOUND and "no node has node id nqn.nobody" in message


def test_list_volumes_pages_through_everything(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    names = sorted(v["metadata"]["name"] for v in pool.list(API, "Volume"))
    volumes = controller.cluster.cache.volumes
    assert volumes.wait_for(lambda: sorted(key_of(v) for v in volumes.items()) == names, 30)
    seen, token = [], ""
    while True:
        page = stub[0].ListVolumes(csi_pb2.ListVolumesRequest(max_entries=1, starting_token=token))
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == names and len(seen) == len(set(seen))


def test_capacity_per_pool_and_in_all(stub: Any) -> None:
    pool = stub[0].GetCapacity(csi_pb2.GetCapacityRequest(parameters={"pool": POOL}))
    everything = stub[0].GetCapacity(csi_pb2.GetCapacityRequest())
    assert 0 < pool.available_capacity <= everything.available_capacity
    assert pool.maximum_volume_size.value <= pool.available_capacity


def test_identity_and_capabilities(stub: Any) -> None:
    info = stub[1].GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.flashmesh.dev" and info.vendor_version
    assert stub[1].Probe(csi_pb2.ProbeRequest()).ready.value
    caps = stub[0].ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    kinds = {c.rpc.type for c in caps.capabilities}
    rpc = csi_pb2.ControllerServiceCapability.RPC
    assert {rpc.CREATE_DELETE_VOLUME, rpc.PUBLISH_UNPUBLISH_VOLUME, rpc.CREATE_DELETE_SNAPSHOT,
            rpc.EXPAND_VOLUME, rpc.CLONE_VOLUME} <= kinds  # fmt: skip


def test_secrets_never_reach_the_log(stub: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    request = create("")
    request.secrets["dhchap"] = "DHHC-1:00:s3cr3tk3y:"
    code_of(stub[0].CreateVolume, request)
    assert "CreateVolume request" in caplog.text and "s3cr3tk3y" not in caplog.text
    assert "<redacted>" in caplog.text


PARAM_KEYS = st.sampled_from(["pool", "stripeWidth", "replicas", "transport", "ctrlLossTmo",
                              "csi.storage.k8s.io/pvc/name", "bogus"])  # fmt: skip
CAPS = st.lists(
    st.builds(
        lambda kind, mode, fs: block(mode) if kind else mount(mode, fs),
        st.booleans(),
        st.integers(0, 8),
        st.sampled_from(["", "ext4", "xfs", "zfs"]),
    ),
    max_size=2,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.text(max_size=40),
    required=st.integers(-(1 << 40), 1 << 40),
    limit=st.integers(-(1 << 20), 1 << 40),
    parameters=st.dictionaries(PARAM_KEYS, st.sampled_from(["", "1", "2", "-1", "x", POOL,
                                                            "tcp", "99999"]), max_size=4),
    caps=CAPS,
)  # fmt: skip
def test_fuzzed_create_requests_never_fail_inside(
    stub: Any, name: str, required: int, limit: int, parameters: dict[str, str],
    caps: list[Any],
) -> None:  # fmt: skip
    request = csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=caps, parameters=parameters,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
    )  # fmt: skip
    got, message = code_of(stub[0].CreateVolume, request)
    assert got not in (Code.INTERNAL, Code.UNKNOWN), message


def test_a_repeat_publish_asking_for_other_access_already_exists(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    code_of(stub[0].CreateVolume, create("pvc-repeat", size=8 * MIB))  # placed, not served
    vid = naming.volume_id("pvc-repeat")
    host = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-0000000000ee"
    request = published(stub, pool, controller, vid, "single", host)
    assert host in (pool.get(API, "Volume", vid) or {})["spec"]["hosts"]
    request.readonly = True
    got, message = code_of(stub[0].ControllerPublishVolume, request)
    assert got == Code.ALREADY_EXISTS and "unpublish it there first" in message
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=host)
    assert code_of(stub[0].ControllerUnpublishVolume, unpublish)[0] == Code.OK
    volume = pool.get(API, "Volume", vid) or {}
    assert host not in volume["spec"]["hosts"]
    assert "flashmesh.dev/published" not in (volume["metadata"].get("annotations") or {})


def test_unpublish_waits_until_no_segment_is_still_cutting_the_host_off(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    """An agent that unlinked the host but has not ended its live controllers (it died
    between the two) lists the host as being cut off: ControllerUnpublish waits for that."""
    code_of(stub[0].CreateVolume, create("pvc-fenced", size=8 * MIB))
    vid = naming.volume_id("pvc-fenced")
    host = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-0000000000fe"
    published(stub, pool, controller, vid, "fenced", host)
    volume = pool.get(API, "Volume", vid) or {}

    def report(cutting: list[str], kept: tuple[str, ...] = ()) -> None:
        segments = [
            {"index": s["index"], "replica": s["replica"], "node": s["node"], "ready": True,
             "hosts": [], **({"cuttingOff": cutting} if cutting else {}),
             **({"keptHosts": list(kept)} if kept else {})}
            for s in volume["spec"]["segments"]
        ]  # fmt: skip
        body = {"status": {"segments": segments}}
        cached(controller.cluster.cache.volumes,
               pool.patch(API, "Volume", vid, body, subresource="status"))  # fmt: skip

    report([host])
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=host)
    got, message = code_of(stub[0].ControllerUnpublishVolume, unpublish)
    assert got == Code.DEADLINE_EXCEEDED and "still being cut off" in message, (got, message)
    # Kept (refused new connections, its session kept) is not cut off either.
    report([], kept=(host,))
    assert code_of(stub[0].ControllerUnpublishVolume, unpublish)[0] == Code.DEADLINE_EXCEEDED
    report([])
    assert code_of(stub[0].ControllerUnpublishVolume, unpublish)[0] == Code.OK


def test_a_published_striped_volume_is_neither_cloned_nor_snapshotted(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    """Its segments' thin snapshots would be taken seconds apart while a host writes: a
    torn copy. A clone used to be made anyway (only snapshots were refused), and neither
    took the source's lock, so a publish could land between the check and the copy."""
    code_of(stub[0].CreateVolume, create("pvc-torn-source", size=8 * MIB))  # 2 stripes
    source = naming.volume_id("pvc-torn-source")
    host = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-0000000000ef"
    published(stub, pool, controller, source, "torn", host)
    clone = create("pvc-torn-clone", size=8 * MIB)
    clone.volume_content_source.volume.volume_id = source
    got, message = code_of(stub[0].CreateVolume, clone)
    assert got == Code.FAILED_PRECONDITION, message
    assert f"published to {host}" in message and "unpublish it, then clone it" in message
    assert pool.get(API, "Volume", naming.volume_id("pvc-torn-clone")) is None
    snapshot = csi_pb2.CreateSnapshotRequest(name="torn-snap", source_volume_id=source)
    got, message = code_of(stub[0].CreateSnapshot, snapshot)
    assert got == Code.FAILED_PRECONDITION and "unpublish it, then snapshot it" in message
    # Both take the source's lock: while a publish of it runs, they wait their turn.
    with controller.locks.hold(source):
        for call, request in ((stub[0].CreateVolume, clone), (stub[0].CreateSnapshot, snapshot)):
            got, message = code_of(call, request)
            assert got == Code.ABORTED and f"{source} is already in progress" in message
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=source, node_id=host)
    assert code_of(stub[0].ControllerUnpublishVolume, unpublish)[0] == Code.OK
    pool.delete("storage.k8s.io/v1", "CSINode", "torn")


def test_a_mirror_is_never_published_or_confirmed_for_many_nodes(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    """CreateVolume refuses multi-node modes for a mirror; ControllerPublish and
    ValidateVolumeCapabilities, which a static PV reaches without it, refuse them too."""
    code_of(stub[0].CreateVolume, create("pvc-mirror-modes", size=8 * MIB, stripeWidth="1",
                                         replicas="2"))  # fmt: skip
    vid = naming.volume_id("pvc-mirror-modes")
    assert pool.get(API, "Volume", vid) is not None
    host = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-0000000000ed"
    many = mount(Mode.MULTI_NODE_READER_ONLY)
    publish = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=host, volume_capability=many
    )
    got, message = code_of(stub[0].ControllerPublishVolume, publish)
    assert got == Code.INVALID_ARGUMENT, message
    assert "volume_capability: a mirrored volume (replicas: 2)" in message
    assert "MULTI_NODE_READER_ONLY cannot be served" in message
    assert host not in ((pool.get(API, "Volume", vid) or {})["spec"].get("hosts") or [])
    validate = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vid, volume_capabilities=[mount(), many]
    )
    answer = stub[0].ValidateVolumeCapabilities(validate, timeout=30)
    assert not answer.HasField("confirmed") and "attached to one node" in answer.message
    validate = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vid, volume_capabilities=[mount()]
    )
    assert stub[0].ValidateVolumeCapabilities(validate, timeout=30).HasField("confirmed")


def test_a_volume_published_as_a_block_device_is_marked_and_so_are_its_copies(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    """What a block device was given may be data blkid does not know: once a volume is
    published as one, it and its snapshots and copies carry a mark that tells NodeStage
    never to format them. A filesystem volume's copies carry none."""
    mark = "flashmesh.dev/raw-block-data"

    def annotations(kind: str, name: str) -> dict[str, str]:
        found = pool.get(API, kind, name) or {}
        return dict(found.get("metadata", {}).get("annotations") or {})

    code_of(stub[0].CreateVolume, create("pvc-raw", size=8 * MIB, caps=[block()], stripeWidth="1"))
    code_of(stub[0].CreateVolume, create("pvc-fs", size=8 * MIB, stripeWidth="1"))
    raw, fs = naming.volume_id("pvc-raw"), naming.volume_id("pvc-fs")
    assert (pool.get(API, "Volume", raw) or {})["spec"]["accessType"] == "Block"
    assert (pool.get(API, "Volume", fs) or {})["spec"]["accessType"] == "Filesystem"
    assert mark not in annotations("Volume", raw)  # created, never written: no mark yet
    host = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-0000000000ec"
    published(stub, pool, controller, raw, "raw", host, block())
    assert annotations("Volume", raw)[mark] == "true"
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=raw, node_id=host)
    assert code_of(stub[0].ControllerUnpublishVolume, unpublish)[0] == Code.OK
    assert annotations("Volume", raw)[mark] == "true"  # for good

    for source, name in ((raw, "raw"), (fs, "fs")):
        volume = pool.get(API, "Volume", source)
        cached(controller.cluster.cache.volumes, volume)
        snapshot = csi_pb2.CreateSnapshotRequest(name=f"{name}-snap", source_volume_id=source)
        assert code_of(stub[0].CreateSnapshot, snapshot)[0] == Code.DEADLINE_EXCEEDED
        sid = naming.snapshot_id(f"{name}-snap")
        cached(controller.cluster.cache.snapshots, pool.get(API, "Snapshot", sid))
        restore = create(f"pvc-{name}-restored", size=8 * MIB, stripeWidth="1")
        restore.volume_content_source.snapshot.snapshot_id = sid
        clone = create(f"pvc-{name}-clone", size=8 * MIB, stripeWidth="1")
        clone.volume_content_source.volume.volume_id = source
        for request in (restore, clone):
            assert code_of(stub[0].CreateVolume, request)[0] == Code.DEADLINE_EXCEEDED
        copies = [("Snapshot", sid)] + [
            ("Volume", naming.volume_id(f"pvc-{name}-{how}")) for how in ("restored", "clone")
        ]
        for kind, copy in copies:
            assert (annotations(kind, copy).get(mark) == "true") == (source == raw), (kind, copy)
    pool.delete("storage.k8s.io/v1", "CSINode", "raw")
    for name in ("raw", "fs"):
        pool.delete(API, "Snapshot", naming.snapshot_id(f"{name}-snap"))


def test_every_call_is_timed_by_method_and_code(stub: Any) -> None:
    def count(method: str, code: str) -> float:
        labels = {"method": method, "code": code}
        name = "flashmesh_csi_operation_duration_seconds_count"
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = count("CreateVolume", "INVALID_ARGUMENT"), count("GetPluginInfo", "OK")
    code_of(stub[0].CreateVolume, csi_pb2.CreateVolumeRequest(name=""))
    stub[1].GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    after = count("CreateVolume", "INVALID_ARGUMENT"), count("GetPluginInfo", "OK")
    assert after == (before[0] + 1, before[1] + 1)


def test_a_retried_expand_waits_for_the_segments_too(
    stub: Any, pool: Kube, controller: Controller
) -> None:
    """The resizer retries an expand whose wait ran out (a storage node down); the spec is
    grown already, and the retry must not answer OK before the segments have the size,
    or the PV is called grown while a segment is not."""
    code_of(stub[0].CreateVolume, create("pvc-expand", size=8 * MIB))
    vid = naming.volume_id("pvc-expand")
    volume = pool.get(API, "Volume", vid) or {}

    def report(size: str) -> None:
        segments = [{"index": s["index"], "replica": s["replica"], "node": s["node"],
                     "ready": True, "hosts": [], "size": size}
                    for s in volume["spec"]["segments"]]  # fmt: skip
        body = {"status": {"segments": segments}}
        cached(controller.cluster.cache.volumes,
               pool.patch(API, "Volume", vid, body, subresource="status"))  # fmt: skip

    report("4Mi")
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MIB)
    )
    got, message = code_of(stub[0].ControllerExpandVolume, expand)
    assert got == Code.DEADLINE_EXCEEDED and "growing to 8388608 bytes" in message, message
    got, message = code_of(stub[0].ControllerExpandVolume, expand)  # the resizer's retry
    assert got == Code.DEADLINE_EXCEEDED and "growing to 8388608 bytes" in message, message
    report("8Mi")
    assert stub[0].ControllerExpandVolume(expand, timeout=30).node_expansion_required
    # A block volume striped over two segments: the node's dm table must take the size.
    expand.volume_capability.CopyFrom(block())
    assert stub[0].ControllerExpandVolume(expand, timeout=30).node_expansion_required


# --- several controllers ------------------------------------------------------------------


def test_the_placement_lease_is_held_by_one_controller_at_a_time(pool: Kube) -> None:
    first = PlacementLease(pool, NS, "controller-a")
    second = PlacementLease(pool, NS, "controller-b", wait_seconds=0.3)
    with first.held(), pytest.raises(CsiError) as busy, second.held():
        pass
    assert busy.value.code == Code.UNAVAILABLE and "(controller-a)" in busy.value.message
    second.wait_seconds = 10
    with second.held() as knows_all:
        assert not knows_all  # controller-a placed last: its Volume may not be cached here
    with second.held() as knows_all:
        assert knows_all


def test_two_controllers_never_place_into_the_same_space(
    pool: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two controller replicas (each sidecar elects its own leader, so CreateVolume and an
    expand can run in different pods), the second one's Volume watch behind (a cache filled
    once and never watched). The Lease says another controller placed last, so the second
    counts the first one's volume from the API server and refuses what no longer fits."""
    clusters = [Cluster(pool, NS, wait_seconds=0.3, observe_seconds=0.2).start() for _ in "ab"]
    behind = Informer(pool, API, "Volume")
    behind.fill()
    clusters[1].cache.volumes = behind
    for cluster in clusters:
        monkeypatch.setattr(cluster, "wait", lambda what, missing: None)  # agents reported
    free = min(n.free for n in clusters[0].space(POOL))
    size = 2 * (free * 3 // 4 // MIB * MIB)  # each of the 2 segments takes 3/4 of a node
    names = ["pvc-replica-a", "pvc-replica-b"]
    try:
        Controller(clusters[0]).CreateVolume(create(names[0], size=size), None)
        with pytest.raises(Exception) as refused:
            Controller(clusters[1]).CreateVolume(create(names[1], size=size), None)
        code, message = status_of(refused.value)
        assert code == Code.RESOURCE_EXHAUSTED and "need 2 ready node(s) with room" in message
        assert pool.get(API, "Volume", naming.volume_id(names[1])) is None
    finally:
        for name in names:
            pool.delete(API, "Volume", naming.volume_id(name))
        for cluster in clusters:
            cluster.stop()


# --- volumes no claim will own ----------------------------------------------------------


def _claim(kube: Kube, name: str) -> str:
    """A PVC in NS (nothing binds it); its UID."""
    made = kube.create({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "none",
                 "resources": {"requests": {"storage": "8Mi"}}},
    })  # fmt: skip
    return str(made["metadata"]["uid"])


def test_volumes_no_claim_will_own_are_collected(
    pool: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = Cluster(pool, NS, wait_seconds=0.3).start()
    monkeypatch.setattr(cluster, "wait", lambda what, missing: None)  # as if agents reported
    controller = Controller(cluster)
    uid = str(uuid.uuid4())

    def make(csi_name: str, claim: str | None) -> str:
        extra = {} if claim is None else {orphans.PVC_NAME: claim, orphans.PVC_NAMESPACE: NS}
        request = create(csi_name, 8 * MIB)
        request.parameters.update(extra)
        return controller.CreateVolume(request, None).volume.volume_id

    live_uid = _claim(pool, "live-claim")
    volumes = {
        "gone": make(f"pvc-{uid}", "gone-claim"),  # its PVC deleted: collected
        "bound": make(f"pvc-{uuid.uuid4()}", "bound-claim"),  # a PV names it
        "live": make(f"pvc-{live_uid}", "live-claim"),  # its PVC is there
        "replaced": make(f"pvc-{uuid.uuid4()}", "live-claim"),  # that PVC is another one
        "sanity": make("sanity-volume-1", None),  # made outside Kubernetes: never collected
        "published": make(f"pvc-{uuid.uuid4()}", "published-claim"),
    }
    stored = pool.get(API, "Volume", volumes["gone"]) or {}
    assert stored["metadata"]["annotations"][orphans.CLAIM] == f"{NS}/gone-claim"
    pool.patch(API, "Volume", volumes["published"], {"spec": {"hosts": ["nqn.host"]}})
    pv = pool.create({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "orphan-test-pv"},
        "spec": {"capacity": {"storage": "8Mi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain",
                 "csi": {"driver": resources.CSI_DRIVER, "volumeHandle": volumes["bound"]}},
    })  # fmt: skip
    collector = orphans.OrphanCollector(cluster, grace_seconds=600)
    try:
        assert collector.collect() == []  # all younger than the grace
        later = datetime.now(UTC) + timedelta(hours=1)
        cached_volumes = cluster.cache.volumes
        for vid in volumes.values():  # the hosts patch and the rest, seen by the cache
            cached_volumes.wait_seen(vid, (pool.get(API, "Volume", vid) or {})["metadata"][
                "resourceVersion"], 10)  # fmt: skip
        assert sorted(collector.collect(later)) == sorted([volumes["gone"], volumes["replaced"]])
        left = {v["metadata"]["name"] for v in pool.list(API, "Volume")}
        for kept in ("bound", "live", "sanity", "published"):
            assert volumes[kept] in left
    finally:
        pool.delete("v1", "PersistentVolume", pv["metadata"]["name"])
        pool.delete("v1", "PersistentVolumeClaim", "live-claim", NS)
        pool.patch(API, "Volume", volumes["published"], {"spec": {"hosts": []}})
        for vid in volumes.values():
            pool.delete(API, "Volume", vid)
        cluster.stop()
