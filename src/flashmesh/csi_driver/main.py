"""`flashmesh csi --mode controller|node|all`: the CSI services on one endpoint."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import grpc

from flashmesh import metrics
from flashmesh.csi_driver._proto import csi_pb2_grpc
from flashmesh.csi_driver.identity import Identity
from flashmesh.csi_driver.server import serve

MODES = ("controller", "node", "all")


def run(
    mode: str,
    endpoints: list[str],
    kubeconfig: str | None,
    namespace: str,
    fabric: str,
    wait_seconds: float,
    metrics_port: int | None = None,
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    metrics.serve(metrics_port)
    register: list[Callable[[grpc.Server], None]] = []
    identity = Identity()
    register.append(lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s))
    if mode in ("controller", "all"):
        from flashmesh.csi_driver.cluster import Cluster
        from flashmesh.csi_driver.controller import Controller
        from flashmesh.csi_driver.orphans import OrphanCollector
        from flashmesh.kube import Kube

        kube = Kube.from_kubeconfig(kubeconfig, user_agent="flashmesh-csi-controller")
        cluster = Cluster(kube, namespace, wait_seconds)
        # Calls read the caches: filled (or the start fails) before the server serves.
        cluster.start()
        controller = Controller(cluster, fabric)
        OrphanCollector(cluster).start()  # a daemon thread: ends with the process
        register.append(lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s))
    if mode in ("node", "all"):
        from flashmesh.csi_driver.metrics import watch_paths
        from flashmesh.csi_driver.mirror_monitor import MirrorMonitor
        from flashmesh.csi_driver.node import Node
        from flashmesh.dataplane.udev import install_rules

        watch_paths()
        install_rules()  # before any FlashMesh device appears on this host
        node = Node.from_host(fabric=fabric, kubeconfig=kubeconfig)
        register.append(lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s))
        MirrorMonitor(node).start()  # a daemon thread: ends with the process
    server = serve(endpoints, register)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    return 0
