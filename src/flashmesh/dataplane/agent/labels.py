"""The node labels the agent's watches select by, put on objects made before they existed.

The CSI controller labels every Volume and Snapshot with the nodes of its segments
(`naming.node_labels`). Objects from an earlier release carry no such label, and a
label-selected watch would never show them; so an agent starting up lists Volumes and
Snapshots once (in pages) and labels those with a segment on its node."""

from __future__ import annotations

import logging

from flashmesh.core import naming, resources
from flashmesh.kube import Kube, KubeError

log = logging.getLogger(__name__)
API = resources.API_VERSION


def label_own_objects(kube: Kube, node: str) -> int:
    """Labels this node's unlabelled Volumes and Snapshots; how many it labelled."""
    key = naming.node_label(node)
    labelled = 0
    for kind in ("Volume", "Snapshot"):
        for obj in kube.list(API, kind):
            segments = (obj.get("spec") or {}).get("segments") or []
            labels = obj["metadata"].get("labels") or {}
            if key in labels or not any(s.get("node") == node for s in segments):
                continue
            wanted = naming.node_labels([s["node"] for s in segments if s.get("node")])
            try:
                kube.patch(API, kind, obj["metadata"]["name"], {"metadata": {"labels": wanted}})
            except KubeError as exc:
                if exc.status != 404:
                    raise
                continue
            labelled += 1
    if labelled:
        log.info("labelled %d object(s) with %s for this node's watches", labelled, key)
    return labelled
