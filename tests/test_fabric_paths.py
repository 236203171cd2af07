"""Which fabric a GPU node connects a segment over: RDMA only where an ACTIVE RDMA port
is the interface the storage address is routed through, TCP otherwise, and TCP again
when an RDMA connect fails and the class left the transport open (finding 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from flashmesh.core import params
from flashmesh.csi_driver import fabric_paths
from flashmesh.csi_driver.errors import CsiError
from flashmesh.csi_driver.fabric_paths import FabricPath, plan, rdma_interfaces, route_interface
from flashmesh.csi_driver.node import Node
from flashmesh.dataplane import rdma
from flashmesh.dataplane.initiator import nvme

HOST = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-000000000001"
NQN = "nqn.2026-11.dev.flashmesh:fm-000000000009.s0r0"
ENDPOINTS = ["rdma:10.77.0.1:4420", "tcp:10.77.0.1:4420"]
# /proc/net/route: a default route on eth0, 10.77.0.0/24 on ib0, 10.77.0.128/25 on eth1
# (metric 10) and on eth2 (metric 5), a route that is down on eth3.
TABLE = """Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT
eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0
ib0\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t80004D0A\t00000000\t0001\t0\t0\t10\t80FFFFFF\t0\t0\t0
eth2\t80004D0A\t00000000\t0001\t0\t0\t5\t80FFFFFF\t0\t0\t0
eth3\t0A004D0A\t00000000\t0000\t0\t0\t0\tFFFFFFFF\t0\t0\t0
"""


def test_the_route_is_the_longest_prefix_then_the_lowest_metric() -> None:
    assert route_interface("10.77.0.1", TABLE) == "ib0"
    assert route_interface("10.77.0.200", TABLE) == "eth2"
    assert route_interface("10.77.0.10", TABLE) == "ib0"  # eth3's host route is down
    assert route_interface("192.168.1.1", TABLE) == "eth0"
    assert route_interface("fd00::1", TABLE) is None
    assert route_interface("10.77.0.1", TABLE.splitlines()[0]) is None


def test_rdma_is_taken_only_where_the_storage_address_is_routed_over_an_rdma_port() -> None:
    route = lambda address: route_interface(address, TABLE)  # noqa: E731
    rdma_path, tcp_path = (
        FabricPath("rdma", "10.77.0.1", "4420"),
        FabricPath("tcp", "10.77.0.1", "4420"),
    )
    assert plan(ENDPOINTS, None, {"ib0"}, route) == ([rdma_path], [tcp_path])
    # An ACTIVE port on another interface (NCCL's own fabric): TCP, with nothing to fall to.
    assert plan(ENDPOINTS, None, {"ib1"}, route) == ([tcp_path], [])
    assert plan(ENDPOINTS, None, set(), route) == ([tcp_path], [])
    # A class that chose its transport keeps it: no fallback.
    assert plan(ENDPOINTS, "rdma", set(), route) == ([rdma_path], [])
    assert plan(ENDPOINTS, "tcp", {"ib0"}, route) == ([tcp_path], [])
    assert plan(["tcp:10.77.0.1:4420"], "rdma", {"ib0"}, route) == ([], [])


def test_the_interfaces_of_active_rdma_ports(tmp_path: Path) -> None:
    roce = rdma.Port("rxe0", 1, "ACTIVE", "Ethernet",
                     [rdma.Gid(1, "::ffff:10.77.0.9", rdma.ROCE_V2, "eth1")])  # fmt: skip
    down = rdma.Port("rxe1", 1, "DOWN", "Ethernet",
                     [rdma.Gid(1, "::ffff:10.78.0.9", rdma.ROCE_V2, "eth2")])  # fmt: skip
    ib = rdma.Port("mlx5_0", 1, "ACTIVE", "InfiniBand", [rdma.Gid(0, "fe80::1", "IB/RoCE v1")])
    (tmp_path / "mlx5_0" / "device" / "net" / "ib0").mkdir(parents=True)
    assert rdma_interfaces([roce, down, ib], tmp_path) == {"eth1", "ib0"}


def test_only_the_interfaces_of_the_active_port_of_a_two_port_hca(tmp_path: Path) -> None:
    """One PCI device, two ports (ConnectX-3 VPI): port 1 InfiniBand and ACTIVE with ib0,
    port 2 DOWN with ib1 and an Ethernet interface of the same device. Routes over ib1 or
    the Ethernet interface do not lead through port 1."""
    net = tmp_path / "mlx4_0" / "device" / "net"
    for name, kind, dev_port in (("ib0", 32, 0), ("ib1", 32, 1), ("enp1s0d1", 1, 1)):
        (net / name).mkdir(parents=True)
        (net / name / "type").write_text(f"{kind}\n")
        (net / name / "dev_port").write_text(f"{dev_port}\n")
    up = rdma.Port("mlx4_0", 1, "ACTIVE", "InfiniBand", [rdma.Gid(0, "fe80::1", "IB/RoCE v1")])
    down = rdma.Port("mlx4_0", 2, "DOWN", "InfiniBand", [rdma.Gid(0, "fe80::2", "IB/RoCE v1")])
    assert rdma_interfaces([up, down], tmp_path) == {"ib0"}
    second = rdma.Port("mlx4_0", 2, "ACTIVE", "InfiniBand", [])
    assert rdma_interfaces([down, second], tmp_path) == {"ib1"}


class Events:
    def __init__(self) -> None:
        self.written: list[tuple[str, str, str]] = []

    def event(self, vid: str, reason: str, message: str) -> None:
        self.written.append((vid, reason, message))


@pytest.fixture
def routed_over_rdma(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A node whose ACTIVE soft-RoCE port is on eth1, where 10.77.0.0/24 is routed; the
    transports nvme connect was asked for, in order."""
    port = rdma.Port("rxe0", 1, "ACTIVE", "Ethernet",
                     [rdma.Gid(1, "::ffff:10.77.0.9", rdma.ROCE_V2, "eth1")])  # fmt: skip
    monkeypatch.setattr(rdma, "discover", lambda: [port])
    monkeypatch.setattr(fabric_paths, "kernel_route", lambda address: "eth1")
    tried: list[str] = []

    def connect(runner: Any, opts: nvme.ConnectOptions) -> str:
        tried.append(opts.transport)
        if opts.transport == "rdma":
            raise nvme.InitiatorError("connecting over rdma: Connection refused")
        return "/dev/nvme1n1"

    monkeypatch.setattr(nvme, "connect", connect)
    return tried


def test_an_rdma_connect_that_fails_falls_back_to_tcp_with_an_event(
    tmp_path: Path, routed_over_rdma: list[str]
) -> None:
    events = Events()
    node = Node(HOST, "0b4a", "default", tmp_path, replica_status=events)
    chosen = params.parse({"pool": "p"})
    assert node.connect("fm-000000000009", NQN, ENDPOINTS, chosen, None) == "/dev/nvme1n1"
    assert routed_over_rdma == ["rdma", "tcp"]
    ((vid, reason, message),) = events.written
    assert (vid, reason) == ("fm-000000000009", "TransportFallback")
    assert "Connection refused" in message and "over tcp instead" in message


def test_a_class_that_asks_for_rdma_is_never_moved_to_tcp(
    tmp_path: Path, routed_over_rdma: list[str]
) -> None:
    events = Events()
    node = Node(HOST, "0b4a", "default", tmp_path, replica_status=events)
    chosen = params.parse({"pool": "p", "transport": "rdma"})
    with pytest.raises(CsiError) as caught:
        node.connect("fm-000000000009", NQN, ENDPOINTS, chosen, None)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert routed_over_rdma == ["rdma"] and events.written == []


def test_an_rdma_port_that_cannot_reach_the_storage_connects_over_tcp(
    tmp_path: Path, routed_over_rdma: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fabric_paths, "kernel_route", lambda address: "eth0")
    node = Node(HOST, "0b4a", "default", tmp_path, replica_status=Events())
    chosen = params.parse({"pool": "p"})
    assert node.connect("fm-000000000009", NQN, ENDPOINTS, chosen, None) == "/dev/nvme1n1"
    assert routed_over_rdma == ["tcp"]
