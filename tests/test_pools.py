"""The operator's pool decisions, table-driven: who joins and leaves a pool, how a node's
health is judged, what the pool's status says."""

from __future__ import annotations

from typing import Any

import pytest

from flashmesh.core import pools, selectors, serde
from flashmesh.core.resources import LabelSelector, StorageNode, StoragePool


def pool(selector: dict[str, Any], name: str = "p") -> StoragePool:
    return StoragePool.from_dict({
        "apiVersion": "flashmesh.dev/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": name, "uid": "u", "generation": 3},
        "spec": {"nodeSelector": selector, "transports": ["rdma", "tcp"]},
    })  # fmt: skip


def node(name: str, labels: dict[str, str] | None = None, in_pool: str | None = None,
         status: dict[str, Any] | None = None) -> StorageNode:  # fmt: skip
    return StorageNode.from_dict({
        "apiVersion": "flashmesh.dev/v1alpha1", "kind": "StorageNode",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"pool": in_pool} if in_pool else {},
        **({"status": status} if status else {}),
    })  # fmt: skip


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]},
         {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
        ({}, {"anything": "x"}, True),
    ],
)  # fmt: skip
def test_label_selectors_match_as_the_api_server_does(
    selector: dict[str, Any], labels: dict[str, str], selected: bool
) -> None:
    assert selectors.matches(serde.from_dict(LabelSelector, selector), labels) is selected


def test_who_joins_leaves_stays_and_is_claimed_elsewhere() -> None:
    p = pool({"matchLabels": {"tier": "nvme"}})
    nodes = [
        node("new", {"tier": "nvme"}),
        node("member", {"tier": "nvme"}, "p"),
        node("unlabelled-empty", {}, "p"),
        node("unlabelled-holding", {}, "p"),
        node("other-pool", {"tier": "nvme"}, "q"),
        node("by-node-label"),  # its Kubernetes Node carries the label
        node("not-selected", {"tier": "hdd"}),
    ]
    found = pools.membership(
        p, nodes, {"unlabelled-holding": 1 << 30}, {"by-node-label": {"tier": "nvme"},
                                                    "member": {"tier": "hdd"}},
    )  # fmt: skip
    assert found.join == ["by-node-label", "new"]
    assert found.leave == ["unlabelled-empty"]
    assert found.held == ["unlabelled-holding"]
    assert found.claimed == {"other-pool": "q"}
    # A StorageNode's own label wins over its Kubernetes Node's.
    assert found.members == ["by-node-label", "member", "new", "unlabelled-holding"]


THIN = {"name": "thin", "size": "1Gi"}
READY = {"phase": "Ready",
         "volumeGroup": {"name": "vg", "size": "1Gi", "free": "1Gi", "thinPool": THIN}}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "fresh", "ready", "why"),
    [
        (READY, True, True, "serving"),
        (READY, False, False, "heartbeat stale: its agent stopped renewing"),
        ({**READY, "phase": "NotReady", "conditions": [
            {"type": "Ready", "status": "False", "reason": "NotReady", "message": "no vg"}]},
         True, False, "NotReady: no vg"),
        ({**READY, "conditions": [{"type": "DrivesReady", "status": "False", "reason": "Refused",
                                   "message": "/dev/nvme2n1 holds ext4"}]},
         True, True, "drive problem: /dev/nvme2n1 holds ext4"),
        (None, True, False, "no status from its agent yet"),
    ],
)  # fmt: skip
def test_node_health(status: dict[str, Any] | None, fresh: bool, ready: bool, why: str) -> None:
    health = pools.node_health(node("n", status=status), fresh)
    assert (health.ready, health.why) == (ready, why)


def test_a_pool_with_a_stale_node_is_degraded_but_ready() -> None:
    p = pool({"matchLabels": {"tier": "nvme"}})
    members = pools.Membership(members=["a", "b"])
    health = {"a": pools.NodeHealth("a", True, "serving", 1 << 30),
              "b": pools.NodeHealth("b", False, "heartbeat stale: x", 2 << 30)}  # fmt: skip
    status = pools.pool_status(p, members, health, [], [], "flashmesh-p")
    assert (status.phase, status.nodes_ready, status.capacity) == ("Degraded", 1, "3Gi")
    conditions = {c.type: c for c in status.conditions or []}
    assert conditions["Ready"].status == "True"
    assert conditions["Degraded"].message == "b: heartbeat stale: x"
    empty = pools.pool_status(p, pools.Membership(), {}, [], [], "flashmesh-p")
    assert empty.phase == "Pending" and "selects no StorageNode" in (
        (empty.conditions or [])[0].message
    )


def test_the_storage_class_follows_the_pool_and_drift_is_seen() -> None:
    p = pool({"matchLabels": {"x": "y"}})
    sc = pools.storage_class(p)
    assert sc["parameters"] == {"pool": "p", "stripeWidth": "1", "replicas": "1"}
    assert pools.class_drift(sc, sc) is None
    assert pools.class_drift(sc, None) == "missing"
    changed = {**sc, "parameters": {**sc["parameters"], "stripeWidth": "2"}}
    assert pools.class_drift(sc, changed) == "parameters differs"
