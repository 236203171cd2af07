"""Installing FlashMesh's CRDs and samples into a lab cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flashmesh.lab.binaries import REPO
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.helm import Helm

CRDS = REPO / "crds"
EXAMPLES = CRDS / "examples"
# The admission policies the chart installs with the CRDs: no pool deleted while it holds
# volumes, no Volume deleted while published or named by a PersistentVolume.
POLICIES = ("templates/storagepool-in-use-policy.yaml", "templates/volume-in-use-policy.yaml")


def crd_files() -> list[Path]:
    return sorted(CRDS.glob("*.yaml"))


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def install_crds(cluster: LocalCluster) -> None:
    """Applies every CRD (server-side, idempotent) and waits until each is Established."""
    args = [arg for f in crd_files() for arg in ("-f", str(f))]
    cluster.kubectl("apply", "--server-side", "--field-manager=flashmesh-lab", *args)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *args)


def admission_policies(workdir: Path) -> list[dict[str, Any]]:
    """The chart's admission policies and their bindings, as helm renders them."""
    helm = Helm(workdir / "helm-home")
    shown = [arg for path in POLICIES for arg in ("--show-only", path)]
    return helm.template("flashmesh", "flashmesh-system", *shown)


def install_admission_policies(cluster: LocalCluster) -> list[dict[str, Any]]:
    """The policies without the rest of the chart (helm would not adopt them later: remove
    them before installing the chart into the same cluster); the objects made."""
    objects = admission_policies(cluster.workdir)
    for obj in objects:
        cluster.kube.create(obj)
    return objects


def apply_examples(cluster: LocalCluster) -> str:
    args = [arg for f in example_files() for arg in ("-f", str(f))]
    return cluster.kubectl("apply", *args).stdout
