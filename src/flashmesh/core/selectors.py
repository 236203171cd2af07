"""Kubernetes label selectors (metav1.LabelSelector), matched as the API server matches
them: every matchLabels pair and every matchExpressions requirement must hold."""

from __future__ import annotations

from flashmesh.core.resources import LabelSelector, LabelSelectorRequirement


def _holds(req: LabelSelectorRequirement, labels: dict[str, str]) -> bool:
    values = req.values or []
    if req.operator == "In":
        return req.key in labels and labels[req.key] in values
    if req.operator == "NotIn":
        return req.key not in labels or labels[req.key] not in values
    if req.operator == "Exists":
        return req.key in labels
    if req.operator == "DoesNotExist":
        return req.key not in labels
    raise ValueError(f"label selector operator {req.operator!r} is unknown")


def matches(selector: LabelSelector, labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    pairs = selector.match_labels or {}
    if any(labels.get(k) != v for k, v in pairs.items()):
        return False
    return all(_holds(req, labels) for req in selector.match_expressions or [])
