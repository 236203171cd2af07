"""The CSI driver in the lab: the controller as a process on the lab network (beside the
API server), the node plugin in GPU VMs, each VM's CSINode written as the kubelet would
(the lab has no kubelet), and a helper to talk to either over gRPC."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from agents import NAMESPACE, NODE_METRICS
from helpers import sh

from flashmesh.core import resources
from flashmesh.csi_driver._proto import csi_pb2_grpc
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.netns import bridge_address
from flashmesh.lab.vm import Lab, host_nqn

NODE_SOCKET = "/run/csi/csi.sock"
NODE_PORT = 10000  # the node plugin also listens on the VM's addresses, for the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def controller(
    lab: Lab, cluster: LocalCluster, socket_path: str = "", metrics: int | None = None
) -> Iterator[str]:
    """`flashmesh csi --mode controller` on the lab network (and on socket_path, for the
    sidecars; and serving /metrics on port `metrics`); its address for the VMs."""
    port = free_port()
    extra = ["--endpoint", f"unix://{socket_path}"] if socket_path else []
    if metrics:
        extra += ["--metrics-port", str(metrics)]
    log = (lab.workdir / "csi-controller.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashmesh.cli", "csi", "--mode", "controller",
         "--endpoint", f"0.0.0.0:{port}", *extra, "--kubeconfig", str(cluster.kubeconfig),
         "--namespace", NAMESPACE, "--wait", "180"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"{bridge_address(0)}:{port}"
    try:
        assert processes.wait_until(lambda: _serving(address), 60), controller_log(lab)
        yield address
    finally:
        processes.end(proc)
        log.close()


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=2)
        except grpc.FutureTimeoutError:
            return False
    return True


def controller_log(lab: Lab) -> str:
    path = lab.workdir / "csi-controller.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def node_log(lab: Lab, vm: str) -> str:
    path = lab.workdir / f"csi-node-{vm}.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def start_node_plugin(lab: Lab, cluster: LocalCluster, vm: str) -> None:
    """The node plugin in a GPU VM, and the CSINode its kubelet would write."""
    stop_node_plugin(lab, vm)
    sh(lab, vm, f"rm -f {NODE_SOCKET}")
    lab.spawn(
        vm,
        f"export FLASHMESH_NODE_STATE=/run/flashmesh-node\n"
        f"exec {sys.executable} -m flashmesh.cli csi --mode node --endpoint unix://{NODE_SOCKET} "
        f"--endpoint 0.0.0.0:{NODE_PORT} --metrics-port {NODE_METRICS} "
        f"--kubeconfig /lab/agent.kubeconfig --namespace {NAMESPACE} "
        f">> /lab/csi-node-{vm}.log 2>&1",
    )
    assert processes.wait_until(
        lambda: lab.exec(vm, f"test -S {NODE_SOCKET}", check=False).rc == 0, 300
    ), node_log(lab, vm)
    address = f"{lab.spec(vm).address(0)}:{NODE_PORT}"
    assert processes.wait_until(lambda: _serving(address), 120), node_log(lab, vm)
    kube = cluster.kube
    body = {
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": vm},
        "spec": {"drivers": [{"name": resources.CSI_DRIVER, "nodeID": host_nqn(vm),
                              "topologyKeys": ["topology.flashmesh.dev/fabric"]}]},
    }  # fmt: skip
    if kube.get("storage.k8s.io/v1", "CSINode", vm) is None:
        kube.create(body)


def stop_node_plugin(lab: Lab, vm: str) -> None:
    """Ends the VM's node plugin and returns once it is gone: a plugin still shutting
    down keeps its port (gRPC binds with SO_REUSEPORT) and would take a new one's calls."""
    plugin = "'[f]lashmesh.cli csi'"  # the bracket keeps the shell's own line from matching
    lab.exec(
        vm,
        f"pkill -f {plugin}; for i in $(seq 150); do pgrep -f {plugin} >/dev/null || exit 0; "
        f"sleep 0.2; done; pkill -9 -f {plugin}; true",
        check=False,
    )


def controller_stub(address: str) -> Any:
    return csi_pb2_grpc.ControllerStub(grpc.insecure_channel(address))


def node_stub(vm_address: str) -> Any:
    # A connection of its own: gRPC otherwise shares one with any earlier channel to the
    # same address, which may lead to a plugin process since ended or a VM since rebooted.
    channel = grpc.insecure_channel(
        f"{vm_address}:{NODE_PORT}", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    return csi_pb2_grpc.NodeStub(channel)
