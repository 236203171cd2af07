"""The CSI node service on an in-process gRPC server: identity, capabilities, and every
bad request refused with the spec's code before any command runs. (The kernel lab runs
the real staging through csi-sanity.)"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc
from flashmesh.csi_driver.controller import TOPOLOGY_KEY
from flashmesh.csi_driver.errors import CsiError
from flashmesh.csi_driver.node import Node, Staged
from flashmesh.csi_driver.server import serve
from flashmesh.dataplane.initiator import nvme, sysfs
from flashmesh.dataplane.initiator.sysfs import Subsystem
from flashmesh.dataplane.process import Result

HOST = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-000000000001"
Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode
MOUNT = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER),
)


def no_commands(argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
    raise AssertionError(f"a refused request ran {list(argv)}")


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Any]:
    node = Node(HOST, "0b4a0000-0000-4000-8000-000000000001", "rack-1", tmp_path / "state",
                runner=no_commands)  # fmt: skip
    socket = tmp_path / "node.sock"
    server = serve(f"unix://{socket}", [lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s)])
    channel = grpc.insecure_channel(f"unix://{socket}")
    yield csi_pb2_grpc.NodeStub(channel)
    channel.close()
    server.stop(0)


def test_node_info_is_the_host_nqn_and_the_fabric(stub: Any) -> None:
    info = stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == HOST
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: "rack-1"}
    caps = stub.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    rpc = csi_pb2.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} >= {
        rpc.STAGE_UNSTAGE_VOLUME, rpc.GET_VOLUME_STATS, rpc.EXPAND_VOLUME, rpc.VOLUME_CONDITION,
    }  # fmt: skip


STAGE = csi_pb2.NodeStageVolumeRequest
PUBLISH = csi_pb2.NodePublishVolumeRequest
BAD = [
    ("NodeStageVolume", STAGE(staging_target_path="/s", volume_capability=MOUNT),
     Code.INVALID_ARGUMENT, "volume_id is missing"),
    ("NodeStageVolume", STAGE(volume_id="fm-1", volume_capability=MOUNT),
     Code.INVALID_ARGUMENT, "staging_target_path is missing"),
    ("NodeStageVolume", STAGE(volume_id="fm-1", staging_target_path="/s"),
     Code.INVALID_ARGUMENT, "volume_capability is missing"),
    ("NodeStageVolume", STAGE(volume_id="fm-1", staging_target_path="/s",
                              volume_capability=MOUNT), Code.FAILED_PRECONDITION,
     "publish_context has no segments"),
    ("NodeStageVolume", STAGE(volume_id="fm-1", staging_target_path="/s",
                              volume_capability=MOUNT, publish_context={"segments": "[{"}),
     Code.INVALID_ARGUMENT, "malformed"),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(staging_target_path="/s"),
     Code.INVALID_ARGUMENT, "volume_id is missing"),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(volume_id="fm-1"),
     Code.INVALID_ARGUMENT, "staging_target_path is missing"),
    ("NodePublishVolume", PUBLISH(target_path="/t", staging_target_path="/s",
                                  volume_capability=MOUNT), Code.INVALID_ARGUMENT, "volume_id"),
    ("NodePublishVolume", PUBLISH(volume_id="fm-1", staging_target_path="/s",
                                  volume_capability=MOUNT), Code.INVALID_ARGUMENT, "target_path"),
    ("NodePublishVolume", PUBLISH(volume_id="fm-1", target_path="/t", staging_target_path="/s"),
     Code.INVALID_ARGUMENT, "volume_capability is missing"),
    ("NodePublishVolume", PUBLISH(volume_id="fm-1", target_path="/t", volume_capability=MOUNT),
     Code.FAILED_PRECONDITION, "staging_target_path is not set for fm-1"),
    ("NodePublishVolume", PUBLISH(volume_id="fm-1", target_path="/t", staging_target_path="/s",
                                  volume_capability=MOUNT), Code.FAILED_PRECONDITION,
     "not staged on this node"),
    ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(target_path="/t"),
     Code.INVALID_ARGUMENT, "volume_id"),
    ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(volume_id="fm-1"),
     Code.INVALID_ARGUMENT, "target_path"),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_path="/t"),
     Code.INVALID_ARGUMENT, "volume_id"),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_id="fm-1"),
     Code.INVALID_ARGUMENT, "volume_path"),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(
        volume_id="fm-1", volume_path="/nonexistent/flashmesh"), Code.NOT_FOUND, "does not exist"),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_path="/t"),
     Code.INVALID_ARGUMENT, "volume_id"),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(
        volume_id="fm-1", volume_path="/nonexistent/flashmesh"), Code.NOT_FOUND, "does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_", "code", "named"), BAD)
def test_bad_node_requests_get_the_specs_code(
    stub: Any, method: str, request_: Any, code: grpc.StatusCode, named: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request_, timeout=10)
    assert (caught.value.code(), named in caught.value.details()) == (code, True), (
        caught.value.details()
    )


def failing(argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
    """Every command fails, as on a node whose kernel lacks NVMe-oF."""
    return Result(tuple(argv), 1, "", "not here")


TEXT = st.text(max_size=30)
ENDPOINT = st.one_of(TEXT, st.builds(lambda t, a, p: f"{t}:{a}:{p}",
                                     st.sampled_from(["tcp", "rdma", "fc"]), TEXT,
                                     st.one_of(st.just("4420"), TEXT)))  # fmt: skip
SEGMENT = st.one_of(
    st.fixed_dictionaries({"nqn": TEXT, "endpoints": st.lists(ENDPOINT, max_size=2)}),
    st.integers(), TEXT, st.none(),
)  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(
    volume_id=TEXT,
    segments=st.one_of(st.lists(SEGMENT, max_size=3).map(json.dumps), TEXT),
    context=st.dictionaries(st.sampled_from(["pool", "stripeWidth", "ctrlLossTmo", "transport",
                                             "dhchap", "x"]), TEXT, max_size=4),
    mode=st.integers(0, 8),
    block=st.booleans(),
)  # fmt: skip
def test_fuzzed_stage_requests_never_fail_inside(
    tmp_path_factory: pytest.TempPathFactory, volume_id: str, segments: str,
    context: dict[str, str], mode: int, block: bool,
) -> None:  # fmt: skip
    state = tmp_path_factory.mktemp("state")
    node = Node(HOST, "0b4a", "default", state, runner=failing)
    cap = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
    if block:
        cap.block.SetInParent()
    else:
        cap.mount.SetInParent()
    request = STAGE(volume_id=volume_id, staging_target_path=str(state / "staging"),
                    volume_capability=cap, publish_context={"segments": segments},
                    volume_context=context)  # fmt: skip
    try:
        node.NodeStageVolume(request, None)
    except CsiError as exc:
        assert exc.code not in (Code.INTERNAL, Code.UNKNOWN), exc.message


MIRRORED_CONTEXT = {"pool": "p", "stripeWidth": "1", "replicas": "2"}
MIRRORED_SEGMENTS = json.dumps([
    {"nqn": f"nqn.2026-11.dev.flashmesh:fm-000000000001.s0r{r}", "index": 0, "replica": r,
     "node": f"storage-{r}", "endpoints": [f"tcp:10.77.0.{r + 1}:4420"]}
    for r in (0, 1)
])  # fmt: skip


class RecordsFake:
    """A FAKE of the Volume status reader: replica 1 of segment 0 is recorded behind."""

    def read(self, vid: str) -> tuple[dict[Any, Any], dict[str, Any]]:
        from flashmesh.core.mirrors import FAULTY, ReplicaRecord

        return {(0, 1): ReplicaRecord(0, 1, False, FAULTY)}, {}


def mirrored_stage(tmp_path: Path, replica_status: Any) -> csi_pb2.NodeStageVolumeRequest:
    return STAGE(volume_id="fm-000000000001", staging_target_path=str(tmp_path / "s"),
                 volume_capability=MOUNT, volume_context=MIRRORED_CONTEXT,
                 publish_context={"segments": MIRRORED_SEGMENTS})  # fmt: skip


def test_a_mirror_is_not_staged_without_reading_which_replicas_are_in_sync(
    tmp_path: Path,
) -> None:
    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=no_commands)
    with pytest.raises(CsiError) as caught:
        node.NodeStageVolume(mirrored_stage(tmp_path, None), None)
    assert caught.value.code == Code.FAILED_PRECONDITION
    assert "no Kubernetes API access" in caught.value.message


def test_a_mirror_with_no_in_sync_replica_reachable_is_unavailable(tmp_path: Path) -> None:
    ran: list[list[str]] = []

    def unreachable(argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
        ran.append(list(argv))
        return Result(tuple(argv), 1, "", "Failed to write to /dev/nvme-fabrics: no route")

    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=unreachable,
                replica_status=RecordsFake())  # fmt: skip
    with pytest.raises(CsiError) as caught:
        node.NodeStageVolume(mirrored_stage(tmp_path, RecordsFake()), None)
    assert caught.value.code == Code.UNAVAILABLE
    assert "no replica that holds every acknowledged write can be reached" in caught.value.message
    assert "replica 1 on storage-1 is unreachable" in caught.value.message
    assert not any(a[0] == "mdadm" for a in ran)  # no array was assembled
    assert not (tmp_path / "state" / "fm-000000000001.json").exists()


def test_a_mirror_is_never_staged_for_many_nodes(tmp_path: Path) -> None:
    """A mirror assembled on two nodes would have each write its legs behind the other's
    back; CreateVolume refuses such modes, and so does every later call that names one
    (a static PV, a CO that never asked CreateVolume): here before any command runs."""
    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=no_commands,
                replica_status=RecordsFake())  # fmt: skip
    request = mirrored_stage(tmp_path, RecordsFake())
    request.volume_capability.access_mode.mode = Mode.MULTI_NODE_READER_ONLY
    with pytest.raises(CsiError) as caught:
        node.NodeStageVolume(request, None)
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert (
        "a mirrored volume (replicas: 2) is attached to one node at a time, so "
        "MULTI_NODE_READER_ONLY cannot be served" in caught.value.message
    )


def test_a_repeated_stage_that_asks_for_something_else_is_already_exists(tmp_path: Path) -> None:
    """A volume staged as a raw block device and asked again as a filesystem (or as another
    filesystem) would have its state overwritten: ALREADY_EXISTS, nothing run."""
    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=no_commands)
    node.state_dir.mkdir(parents=True)
    node._save("fm-1", Staged(["nqn.a"], "/dev/nvme1n1", None, True, None))
    segments = json.dumps([{"nqn": "nqn.a", "endpoints": ["tcp:10.77.0.1:4420"]}])
    request = STAGE(volume_id="fm-1", staging_target_path=str(tmp_path / "s"),
                    volume_capability=MOUNT, volume_context={"pool": "p"},
                    publish_context={"segments": segments})  # fmt: skip
    with pytest.raises(CsiError) as caught:
        node.NodeStageVolume(request, None)
    assert caught.value.code == Code.ALREADY_EXISTS
    assert caught.value.message == (
        "volume fm-1 is staged on this node as a raw block device, not a ext4 filesystem: "
        "NodeUnstageVolume it first"
    )


VID = "fm-000000000002"
SEGMENTS = [{"nqn": f"nqn.2026-11.dev.flashmesh:{VID}.s{i}r0", "index": i, "replica": 0,
             "endpoints": [f"tcp:10.77.0.{i + 1}:4420"]} for i in (0, 1)]  # fmt: skip


def test_a_stage_that_fails_half_way_leaves_nothing_connected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=no_commands)
    gone: list[str] = []
    monkeypatch.setattr(nvme, "disconnect", lambda runner, nqn: gone.append(nqn) or True)

    def connect(vid: str, nqn: str, *_: Any) -> str:
        if nqn.endswith("s1r0"):
            raise CsiError(Code.UNAVAILABLE, f"connecting {nqn}: no route")
        return "/dev/nvme1n1"

    monkeypatch.setattr(node, "connect", connect)
    request = STAGE(volume_id=VID, staging_target_path=str(tmp_path / "s"),
                    volume_capability=MOUNT, volume_context={"pool": "p", "stripeWidth": "2"},
                    publish_context={"segments": json.dumps(SEGMENTS)})  # fmt: skip
    with pytest.raises(CsiError) as caught:
        node.NodeStageVolume(request, None)
    assert caught.value.code == Code.UNAVAILABLE
    assert gone == [s["nqn"] for s in SEGMENTS]  # the first was connected: it goes too
    assert node.load(VID) is None


def test_an_unstage_with_no_record_disconnects_the_volumes_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin killed mid-stage saved no record; its segments are found by their NQNs."""
    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=no_commands)
    connected = [*(s["nqn"] for s in SEGMENTS), "nqn.2026-11.dev.flashmesh:fm-000000000003.s0r0"]
    monkeypatch.setattr(sysfs, "subsystems", lambda: [Subsystem(f"s{i}", n)
                                                     for i, n in enumerate(connected)])  # fmt: skip
    gone: list[str] = []
    monkeypatch.setattr(nvme, "disconnect", lambda runner, nqn: gone.append(nqn) or True)
    node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=VID, staging_target_path=str(tmp_path)), None
    )
    assert gone == [s["nqn"] for s in SEGMENTS]  # another volume's segment stays


def test_stats_are_only_given_for_a_mounted_path(tmp_path: Path) -> None:
    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=no_commands)
    node.state_dir.mkdir(parents=True)
    node._save(VID, Staged(["nqn.a"], "/dev/nvme1n1", None, False, "ext4"))
    lost = tmp_path / "target"  # its mount gone: statvfs would measure the disk under it
    lost.mkdir()
    with pytest.raises(CsiError) as caught:
        node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=VID, volume_path=str(lost)), None
        )
    assert caught.value.code == Code.NOT_FOUND
    assert caught.value.message == f"volume {VID} is not mounted at {lost}"


def dhchap_key(secret: bytes) -> str:
    """A key as `nvme gen-dhchap-key` writes it: DHHC-1, hash, base64 of secret + CRC-32."""
    tail = zlib.crc32(secret).to_bytes(4, "little")
    return f"DHHC-1:00:{base64.b64encode(secret + tail).decode()}:"


def test_the_nodes_key_is_read_from_its_own_hostkey_file_and_a_stage_secret_comes_first(
    tmp_path: Path,
) -> None:
    etc = tmp_path / "etc-nvme"
    etc.mkdir()
    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=no_commands, etc_nvme=etc)
    mine, given = dhchap_key(bytes(32)), dhchap_key(bytes(range(32)))
    (etc / "hostkey").write_text(mine + "\n")
    assert node.secret(True, {}) == mine
    assert node.secret(True, {"dhchapKey": given}) == given
    assert node.secret(False, {}) is None
    # Rotated on the node: the next stage uses the new key.
    (etc / "hostkey").write_text(given)
    assert node.secret(True, {}) == given


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "has no key: write it to"),
        ("", "has no key: write it to"),
        ("s3cr3t-typed-by-hand", "is malformed: it is not of the form DHHC-1"),
    ],
)
def test_a_missing_or_malformed_hostkey_refuses_the_stage_before_any_command(
    tmp_path: Path, content: str | None, why: str
) -> None:
    etc = tmp_path / "etc-nvme"
    etc.mkdir()
    if content is not None:
        (etc / "hostkey").write_text(content)
    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=no_commands, etc_nvme=etc)
    request = STAGE(volume_id="fm-000000000001", staging_target_path=str(tmp_path / "s"),
                    volume_capability=MOUNT,
                    volume_context={"pool": "p", "stripeWidth": "1", "dhchap": "true"},
                    publish_context={"segments": json.dumps(
                        [{"nqn": "nqn.2026-11.dev.flashmesh:fm-000000000001.s0r0",
                          "endpoints": ["tcp:10.77.0.1:4420"]}])})  # fmt: skip
    with pytest.raises(CsiError) as caught:
        node.NodeStageVolume(request, None)
    assert caught.value.code == Code.FAILED_PRECONDITION
    assert why in caught.value.message and str(etc / "hostkey") in caught.value.message
    assert "s3cr3t" not in caught.value.message
