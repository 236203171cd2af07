"""Installing FlashMesh's CRDs and samples into a lab cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flashmesh.lab.binaries import REPO
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.helm import Helm

CRDS = REPO / "crds"
EXAMPLES = CRDS / "examples"
# The admission policy the chart installs with the CRDs.
POLICY = "templates/storagepool-in-use-policy.yaml"


def crd_files() -> list[Path]:
    return sorted(CRDS.glob("*.yaml"))


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def install_crds(cluster: LocalCluster) -> None:
    """Applies every CRD (server-side, idempotent) and waits until each is Established."""
    args = [arg for f in crd_files() for arg in ("-f", str(f))]
    cluster.kubectl("apply", "--server-side", "--field-manager=flashmesh-lab", *args)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *args)


def admission_policy(workdir: Path) -> list[dict[str, Any]]:
    """The chart's policy refusing to delete a pool in use, as helm renders it."""
    helm = Helm(workdir / "helm-home")
    return helm.template("flashmesh", "flashmesh-system", "--show-only", POLICY)


def install_admission_policy(cluster: LocalCluster) -> list[dict[str, Any]]:
    """The policy without the rest of the chart (helm would not adopt it later: remove it
    before installing the chart into the same cluster); the objects made."""
    objects = admission_policy(cluster.workdir)
    for obj in objects:
        cluster.kube.create(obj)
    return objects


def apply_examples(cluster: LocalCluster) -> str:
    args = [arg for f in example_files() for arg in ("-f", str(f))]
    return cluster.kubectl("apply", *args).stdout
