"""The Kubernetes adapter's finalizer and Lease helpers, against the real API server."""

from __future__ import annotations

import pytest

from flashmesh.kube import Kube

pytestmark = pytest.mark.cluster


def configmap(name: str, finalizers: list[str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default", "finalizers": finalizers},
    }


def test_finalizers_are_added_and_removed_without_dropping_others(kube: Kube) -> None:
    kube.create(configmap("fin-a", ["other.example/keep"]))
    assert kube.add_finalizer("v1", "ConfigMap", "fin-a", "flashmesh.dev/agent-x", "default")
    assert kube.add_finalizer("v1", "ConfigMap", "fin-a", "flashmesh.dev/agent-x", "default")
    got = kube.get("v1", "ConfigMap", "fin-a", "default") or {}
    assert got["metadata"]["finalizers"] == ["other.example/keep", "flashmesh.dev/agent-x"]

    kube.delete("v1", "ConfigMap", "fin-a", "default")
    # Being deleted: no new finalizer may hold it back.
    assert not kube.add_finalizer("v1", "ConfigMap", "fin-a", "flashmesh.dev/agent-y", "default")
    assert kube.remove_finalizer("v1", "ConfigMap", "fin-a", "flashmesh.dev/agent-x", "default")
    got = kube.get("v1", "ConfigMap", "fin-a", "default") or {}
    assert got["metadata"]["finalizers"] == ["other.example/keep"]
    assert kube.remove_finalizer("v1", "ConfigMap", "fin-a", "other.example/keep", "default")
    assert kube.get("v1", "ConfigMap", "fin-a", "default") is None
    assert not kube.remove_finalizer("v1", "ConfigMap", "fin-a", "other.example/keep", "default")


def test_a_lease_is_created_then_renewed(kube: Kube) -> None:
    kube.renew_lease("default", "flashmesh-agent-test", "test-node", 40)
    first = kube.get("coordination.k8s.io/v1", "Lease", "flashmesh-agent-test", "default") or {}
    kube.renew_lease("default", "flashmesh-agent-test", "test-node", 40)
    second = kube.get("coordination.k8s.io/v1", "Lease", "flashmesh-agent-test", "default") or {}
    assert second["spec"]["holderIdentity"] == "test-node"
    assert second["spec"]["leaseDurationSeconds"] == 40
    assert second["spec"]["acquireTime"] == first["spec"]["acquireTime"]
    assert second["spec"]["renewTime"] > first["spec"]["renewTime"]
