"""Where the Go-built binaries live, and building them when missing.

tools/build.sh builds each component from its Go module into a cache outside the
repository, one folder per component and version (tools/versions.env names them): the
control plane (etcd, Kubernetes, kwok), the CSI sidecars with snapshot-controller and the
VolumeSnapshot CRDs, csi-sanity and helm.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
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
    subprocess.run(["bash", str(TOOLS / "build.sh"), "k8s", "etcd", "kwok"], check=True)
    return locate()


@dataclass(frozen=True)
class CsiTools:
    """Paths of the CSI sidecars, snapshot-controller and its CRDs, csi-sanity and helm."""

    csi_provisioner: Path
    csi_attacher: Path
    csi_resizer: Path
    csi_snapshotter: Path
    snapshot_controller: Path
    snapshot_crds: Path  # the VolumeSnapshot and VolumeGroupSnapshot CRD yamls, to apply
    csi_sanity: Path
    helm: Path

    def all(self) -> list[Path]:
        """Every binary (not the CRD folder)."""
        return [
            self.csi_provisioner,
            self.csi_attacher,
            self.csi_resizer,
            self.csi_snapshotter,
            self.snapshot_controller,
            self.csi_sanity,
            self.helm,
        ]

    def crd_files(self) -> list[Path]:
        return sorted(self.snapshot_crds.glob("*.yaml"))


def csi_dir(v: dict[str, str] | None = None) -> Path:
    """The CSI sidecars' folder, named after every release it holds (as tools/build.sh)."""
    v = versions() if v is None else v
    name = (
        f"csi-provisioner-{v['CSI_PROVISIONER_VERSION']}"
        f"-attacher-{v['CSI_ATTACHER_VERSION']}"
        f"-resizer-{v['CSI_RESIZER_VERSION']}"
        f"-snapshotter-{v['CSI_SNAPSHOTTER_VERSION']}"
    )
    return cache_dir() / "bin" / name


def wait_for_builds(progress_every: float = 30.0) -> None:
    """Returns once no tools/build.sh is running: scripts/setup.sh leaves the CSI sidecars,
    csi-sanity and helm building in the background, holding the build lock until done."""
    lock = cache_dir() / "bin" / ".build.lock"
    if not lock.exists():
        return
    with lock.open("a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        log = lock.parent / "background-build.log"
        say(f"waiting for the build of the CSI sidecars, csi-sanity and helm (log: {log})")
        waiter = threading.Thread(target=fcntl.flock, args=(held, fcntl.LOCK_SH), daemon=True)
        waiter.start()
        waited = 0.0
        while waiter.is_alive():
            waiter.join(progress_every)
            waited += progress_every
            if waiter.is_alive():
                say(f"still waiting for the background build ({waited:.0f} s; log: {log})")


def locate_csi() -> CsiTools:
    """The CSI tools' paths, once any build of them in progress has ended."""
    wait_for_builds()
    v = versions()
    bin_dir = cache_dir() / "bin"
    csi = csi_dir(v)
    return CsiTools(
        csi_provisioner=csi / "csi-provisioner",
        csi_attacher=csi / "csi-attacher",
        csi_resizer=csi / "csi-resizer",
        csi_snapshotter=csi / "csi-snapshotter",
        snapshot_controller=csi / "snapshot-controller",
        snapshot_crds=csi / "crds",
        csi_sanity=bin_dir / f"csi-sanity-{v['CSI_SANITY_VERSION']}" / "csi-sanity",
        helm=bin_dir / f"helm-{v['HELM_VERSION']}" / "helm",
    )


def ensure_csi() -> CsiTools:
    """The CSI tools, built first (with progress on stderr) if any is missing."""
    found = locate_csi()
    if all(path.is_file() for path in found.all()) and found.crd_files():
        return found
    say("building the CSI sidecars, csi-sanity and helm from Go modules (cold: minutes)")
    subprocess.run(["bash", str(TOOLS / "build.sh"), "csi", "sanity", "helm"], check=True)
    return locate_csi()


def ensure_mock_driver() -> Path:
    """csi-test's mock CSI driver (a driver that does no storage work), built if missing."""
    path = cache_dir() / "bin" / f"csi-mock-driver-{versions()['CSI_MOCK_DRIVER_VERSION']}"
    binary = path / "mock-driver"
    if not binary.is_file():
        say("building csi-test's mock CSI driver from its Go module")
        subprocess.run(["bash", str(TOOLS / "build.sh"), "mock"], check=True)
    return binary
