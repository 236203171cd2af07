"""Where the Go-built control-plane binaries live, and building them when missing.

tools/build.sh builds each component from its Go module into a cache outside the
repository, one folder per component and version (tools/versions.env names them).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flashmesh.lab.progress import say

REPO = Path(__file__).resolve().parents[3]
TOOLS = REPO / "tools"


def cache_dir() -> Path:
    return Path(os.environ.get("FLASHMESH_CACHE", Path.home() / ".cache" / "flashmesh"))


def versions() -> dict[str, str]:
    pairs = {}
    for line in (TOOLS / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


@dataclass(frozen=True)
class Binaries:
    """Paths of every binary the local control plane runs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    kwok_stages: Path

    def all(self) -> list[Path]:
        return [
            self.etcd,
            self.kube_apiserver,
            self.kube_controller_manager,
            self.kube_scheduler,
            self.kubectl,
            self.kwok,
        ]


def locate() -> Binaries:
    v = versions()
    bin_dir = cache_dir() / "bin"
    k8s = bin_dir / f"kubernetes-{v['KUBERNETES_VERSION']}"
    kwok = bin_dir / f"kwok-{v['KWOK_VERSION']}"
    return Binaries(
        etcd=bin_dir / f"etcd-{v['ETCD_VERSION']}" / "etcd",
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        kube_scheduler=k8s / "kube-scheduler",
        kubectl=k8s / "kubectl",
        kwok=kwok / "kwok",
        kwok_stages=kwok / "stages",
    )


def ensure() -> Binaries:
    """The binaries, built first (with progress on stderr) if any is missing."""
    found = locate()
    if all(path.is_file() for path in found.all()):
        return found
    say("building the control plane from Go modules (cold: tens of minutes on 2 cores)")
    subprocess.run(["bash", str(TOOLS / "build.sh")], check=True)
    return locate()
