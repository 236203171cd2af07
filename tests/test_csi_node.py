"""The CSI node service on an in-process gRPC server: identity, capabilities, and every
bad request refused with the spec's code before any command runs. (The kernel lab runs
the real staging through csi-sanity.)"""

from __future__ import annotations

import json
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
from flashmesh.csi_driver.node import Node
from flashmesh.csi_driver.server import serve
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
