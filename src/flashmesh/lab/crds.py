"""Installing FlashMesh's CRDs and samples into a lab cluster."""

from __future__ import annotations

from pathlib import Path

from flashmesh.lab.binaries import REPO
from flashmesh.lab.cluster import LocalCluster

CRDS = REPO / "crds"
EXAMPLES = CRDS / "examples"


def crd_files() -> list[Path]:
    return sorted(CRDS.glob("*.yaml"))


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def install_crds(cluster: LocalCluster) -> None:
    """Applies every CRD (server-side, idempotent) and waits until each is Established."""
    args = [arg for f in crd_files() for arg in ("-f", str(f))]
    cluster.kubectl("apply", "--server-side", "--field-manager=flashmesh-lab", *args)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *args)


def apply_examples(cluster: LocalCluster) -> str:
    args = [arg for f in example_files() for arg in ("-f", str(f))]
    return cluster.kubectl("apply", *args).stdout
