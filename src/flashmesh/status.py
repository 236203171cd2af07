"""`flashmesh status`: the cluster's pools, storage nodes, volumes and paths as tables."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table as RichTable

from flashmesh.core import resources, status_tables
from flashmesh.core.resources import StorageNode, StoragePool, Volume
from flashmesh.kube import Kube, KubeError

API = resources.API_VERSION


def host_names(kube: Kube) -> dict[str, str]:
    """Host NQN -> Kubernetes node name, from FlashMesh's entries in the CSINodes."""
    names = {}
    for csinode in kube.list("storage.k8s.io/v1", "CSINode"):
        for driver in (csinode.get("spec") or {}).get("drivers") or []:
            if driver.get("name") == resources.CSI_DRIVER and driver.get("nodeID"):
                names[driver["nodeID"]] = csinode["metadata"]["name"]
    return names


def tables(kube: Kube, now: datetime | None = None) -> list[status_tables.Table]:
    pools = [StoragePool.from_dict(o) for o in kube.list(API, "StoragePool")]
    nodes = [StorageNode.from_dict(o) for o in kube.list(API, "StorageNode")]
    volumes = [Volume.from_dict(o) for o in kube.list(API, "Volume")]
    return [
        status_tables.pools_table(pools),
        status_tables.nodes_table(nodes, now or datetime.now(UTC)),
        status_tables.volumes_table(volumes),
        status_tables.paths_table(volumes, host_names(kube)),
    ]


def render(found: list[status_tables.Table], width: int = 160) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, no_color=True, highlight=False)
    for table in found:
        shown = RichTable(title=table.title, title_justify="left", show_edge=False)
        for column in table.columns:
            shown.add_column(column, overflow="fold")
        for row in table.rows:
            shown.add_row(*row)
        if not table.rows:
            shown.add_row(*(["(none)"] + [""] * (len(table.columns) - 1)))
        console.print(shown)
        console.print()
    return out.getvalue()


def main(kubeconfig: str | None) -> int:
    try:
        kube = Kube.from_kubeconfig(kubeconfig, user_agent="flashmesh-status")
        print(render(tables(kube)), end="")
    except KubeError as exc:
        print(f"flashmesh status: {exc}")
        return 1
    return 0
