"""The informer's record of what its watch has shown, which the CSI controller uses to
read its own writes: `seen` answers for a version the watch delivered (also after a
delete), and `assume` puts a written object in only where the watch is behind."""

from __future__ import annotations

from typing import Any, cast

from flashmesh.informer import Informer
from flashmesh.kube import Kube


def vol(version: str) -> dict[str, Any]:
    return {"kind": "Volume", "metadata": {"name": "v", "resourceVersion": version}}


def informer() -> Informer:
    # No request is made: events are handed in as the watch loop would.
    return Informer(cast(Kube, None), "flashmesh.dev/v1alpha1", "Volume")


def test_a_write_is_seen_once_the_watch_delivers_it_and_after_its_delete() -> None:
    cache = informer()
    assert not cache.seen("v", "5") and not cache.wait_seen("v", "5", 0.01)
    cache._apply("ADDED", vol("5"))
    cache._apply("MODIFIED", vol("6"))
    assert cache.seen("v", "5") and cache.seen("v", "6") and not cache.seen("v", "7")
    cache._apply("DELETED", vol("7"))
    assert cache.get("v") is None and cache.seen("v", "5")


def test_assume_fills_only_what_the_watch_has_not_shown() -> None:
    cache = informer()
    told: list[tuple[str, Any, Any]] = []
    cache.add_listener(lambda key, old, new: told.append((key, old, new)))
    assert cache.assume(vol("5"))  # absent: put, and listeners hear of it
    assert cache.get("v") == vol("5") and told == [("v", None, vol("5"))]
    assert not cache.seen("v", "5")  # put by a writer, not shown by the watch
    assert cache.assume(vol("8"))  # newer than the cached one
    assert not cache.assume(vol("7"))  # older than the cached one: left alone
    cache._apply("MODIFIED", vol("9"))
    cache._apply("DELETED", vol("10"))
    assert not cache.assume(vol("9"))  # shown, then deleted: never brought back
    assert cache.get("v") is None
