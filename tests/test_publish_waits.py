"""What ControllerPublish waits for: every segment served to the host, except a mirror's
replica on a storage node that is down while another in-sync replica of its index serves
(the mirror is there to outlive a node). A single copy, or a replica behind, is waited for."""

from __future__ import annotations

from flashmesh.core.resources import (
    Layout,
    Meta,
    ReplicaStatus,
    Segment,
    SegmentStatus,
    Volume,
    VolumeSpec,
    VolumeStatus,
)
from flashmesh.csi_driver.cluster import segments_missing
from flashmesh.csi_driver.controller import publish_context

HOST = "nqn.2014-08.org.nvmexpress:uuid:gpu-1"


def volume(replicas: int, allowed: dict[str, list[str]], behind: tuple[int, ...] = ()) -> Volume:
    """One stripe index; replica r on node s<r>; `allowed` maps a node to its hosts (a
    node absent from it never reported)."""
    nodes = [f"s{r}" for r in range(replicas)]
    spec = VolumeSpec(
        "pvc-x", "pool", "64Mi", Layout(1, replicas),
        [Segment(0, r, n, "64Mi") for r, n in enumerate(nodes)],
        hosts=[HOST],
    )  # fmt: skip
    status = VolumeStatus(
        segments=[
            SegmentStatus(0, r, n, True, f"nqn.x:s0r{r}", hosts=allowed[n])
            for r, n in enumerate(nodes)
            if n in allowed
        ],
        replicas=[ReplicaStatus(0, r, False, "Missing") for r in behind] or None,
    )
    return Volume(Meta(name="fm-0123456789ab"), spec, status)


def test_every_segment_is_waited_for_when_no_node_is_down() -> None:
    vol = volume(2, {"s0": [HOST], "s1": []})
    assert segments_missing(vol, host=HOST) == f"segment 0/1 on s1: {HOST} not allowed yet"
    assert segments_missing(volume(2, {"s0": [HOST], "s1": [HOST]}), host=HOST) is None


def test_a_down_nodes_replica_is_not_waited_for_while_an_in_sync_one_serves() -> None:
    assert segments_missing(volume(2, {"s0": [HOST], "s1": []}), host=HOST, down={"s1"}) is None
    # It never reported at all: the same.
    assert segments_missing(volume(2, {"s0": [HOST]}), host=HOST, down={"s1"}) is None


def test_a_live_nodes_replica_is_still_waited_for() -> None:
    vol = volume(2, {"s0": [], "s1": []})
    assert segments_missing(vol, host=HOST, down={"s1"}) == (
        f"segment 0/0 on s0: {HOST} not allowed yet"
    )


def test_the_only_in_sync_copy_on_a_down_node_is_waited_for() -> None:
    vol = volume(2, {"s0": [HOST], "s1": []}, behind=(0,))
    missing = segments_missing(vol, host=HOST, down={"s1"})
    assert missing is not None and "no other in-sync replica" in missing


def test_a_single_copy_on_a_down_node_is_waited_for() -> None:
    missing = segments_missing(volume(1, {"s0": []}), host=HOST, down={"s0"})
    assert missing == f"segment 0/0 on s0: {HOST} not allowed yet"


def test_the_publish_context_names_a_replica_that_never_reported() -> None:
    context = publish_context(volume(2, {"s0": [HOST]}))
    assert (
        '"nqn":"nqn.2026-11.dev.flashmesh:fm-0123456789ab.s0r1","endpoints":[]'
        in (context["segments"])
    )
