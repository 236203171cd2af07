"""helm, built from its Go module (tools/build.sh), run against a lab cluster: FlashMesh's
chart linted, rendered, installed and uninstalled the way a cluster admin would."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flashmesh.lab.binaries import REPO, TOOLS, locate_csi
from flashmesh.lab.progress import say

CHART = REPO / "charts" / "flashmesh"


class HelmError(RuntimeError):
    pass


def helm_binary() -> Path:
    """The cached helm, built first (only helm, not the CSI sidecars) when missing."""
    path = locate_csi().helm
    if not path.is_file():
        say("building helm from its Go module")
        subprocess.run(["bash", str(TOOLS / "build.sh"), "helm"], check=True)
    return path


def documents(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


@dataclass
class Helm:
    """helm with its own cache, config and data folders under `home` (nothing written to the
    user's ~/.cache/helm or ~/.config/helm), against the cluster of `kubeconfig`."""

    home: Path
    kubeconfig: Path | None = None
    binary: Path | None = None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = self.binary or helm_binary()
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.home),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        result = subprocess.run(
            [str(binary), *args], capture_output=True, text=True, env=env, timeout=300
        )
        if check and result.returncode != 0:
            raise HelmError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout.strip()}\n{result.stderr.strip()}"
            )
        return result

    def template(
        self,
        release: str,
        namespace: str,
        *args: str,
        chart: Path = CHART,
    ) -> list[dict[str, Any]]:
        """The chart's objects as `helm template` renders them (extra args: --set, ...)."""
        out = self.run("template", release, str(chart), "--namespace", namespace, *args)
        return documents(out.stdout)

    def manifest(self, release: str, namespace: str) -> list[dict[str, Any]]:
        """The objects an installed release made (`helm get manifest`)."""
        return documents(self.run("get", "manifest", release, "--namespace", namespace).stdout)
