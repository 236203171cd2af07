"""The Kubernetes CSI sidecars as local processes beside the lab's control plane, as they
would run in the CSI controller's pod: csi-provisioner, csi-attacher, csi-resizer and
csi-snapshotter on the controller's socket, plus snapshot-controller with its CRDs, and
the CSIDriver object. All are the real upstream binaries, built from their Go modules."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from flashmesh.core.resources import CSI_DRIVER
from flashmesh.lab import processes
from flashmesh.lab.binaries import locate_csi
from flashmesh.lab.cluster import LocalCluster


def csi_driver_object() -> dict[str, object]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSIDriver",
        "metadata": {"name": CSI_DRIVER},
        "spec": {
            "attachRequired": True,  # ControllerPublish allows the node's host NQN
            "podInfoOnMount": False,
            "volumeLifecycleModes": ["Persistent"],
            "fsGroupPolicy": "File",
        },
    }


@dataclass
class Sidecars:
    cluster: LocalCluster
    socket: Path  # the CSI controller's unix socket
    logs: Path
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> None:
        tools = locate_csi()
        kube = self.cluster.kube
        for crd in tools.crd_files():
            self.cluster.kubectl("apply", "-f", str(crd))
        if kube.get("storage.k8s.io/v1", "CSIDriver", CSI_DRIVER) is None:
            kube.create(csi_driver_object())
        common = [f"--kubeconfig={self.cluster.kubeconfig}", "--v=3"]
        address = f"--csi-address={self.socket}"
        commands = {
            "csi-provisioner": [str(tools.csi_provisioner), address, *common, "--timeout=300s",
                                "--extra-create-metadata"],  # Topology is GA (on)
            "csi-attacher": [str(tools.csi_attacher), address, *common, "--timeout=300s"],
            "csi-resizer": [str(tools.csi_resizer), address, *common, "--timeout=300s"],
            "csi-snapshotter": [str(tools.csi_snapshotter), address, *common, "--timeout=300s"],
            "snapshot-controller": [str(tools.snapshot_controller), *common],
        }  # fmt: skip
        for name, argv in commands.items():
            self._procs[name] = processes.spawn(argv, self.logs / f"{name}.log", True)

    def stop(self) -> None:
        for proc in self._procs.values():
            argv: list[str] = proc.args  # type: ignore[assignment]
            processes.stop(proc.pid, str(Path(argv[0]).resolve()))
        self._procs.clear()

    def alive(self) -> list[str]:
        return [name for name, proc in self._procs.items() if proc.poll() is None]

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""
