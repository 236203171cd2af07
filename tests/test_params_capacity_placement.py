"""The controller's pure decisions: StorageClass parameters, capacity ranges, placement."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from flashmesh.core import params
from flashmesh.core.capacity import EXTENT, CapacityError, volume_size
from flashmesh.core.params import ParameterError, Timeouts
from flashmesh.core.placement import (
    NodeSpace,
    PlacementError,
    heartbeat_fresh,
    place,
    space_used,
)
from flashmesh.core.resources import (
    Layout,
    Meta,
    Segment,
    Snapshot,
    SnapshotSegment,
    SnapshotSpec,
    Volume,
    VolumeSpec,
)

MIB = 1 << 20
GIB = 1 << 30


def test_parameters_get_the_pools_layout_and_default_timeouts() -> None:
    got = params.parse({"pool": "fast", "csi.storage.k8s.io/pv/name": "pv-1"}, Layout(2, 1))
    assert got.pool == "fast" and got.layout == Layout(2, 1) and got.transport is None
    assert got.timeouts == Timeouts()
    assert got.nr_io_queues == 4  # a few per connection, not one per CPU
    assert params.from_context(got.context()) == got


def test_parameters_override_the_defaults() -> None:
    got = params.parse({"pool": "fast", "stripeWidth": "4", "transport": "rdma",
                        "ctrlLossTmo": "-1", "fastIoFailTmo": "5",
                        "nrIoQueues": "16"})  # fmt: skip
    assert got.layout.stripe_width == 4 and got.transport == "rdma" and got.nr_io_queues == 16
    assert got.timeouts.ctrl_loss_tmo == -1 and got.timeouts.fast_io_fail_tmo == 5
    assert params.from_context(got.context()) == got


def test_a_mirror_fails_a_member_fast_and_keeps_reconnecting_unless_told() -> None:
    mirrored = params.parse({"pool": "p", "replicas": "2"})
    assert mirrored.layout.replicas == 2
    assert (mirrored.timeouts.ctrl_loss_tmo, mirrored.timeouts.fast_io_fail_tmo) == (-1, 5)
    told = params.parse({"pool": "p", "replicas": "2", "fastIoFailTmo": "9"})
    assert told.timeouts.fast_io_fail_tmo == 9
    assert params.from_context(told.context()) == told


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({}, "parameter pool is missing"),
        ({"pool": "p", "stripes": "2"}, "unknown parameter stripes"),
        ({"pool": "p", "stripeWidth": "two"}, "stripeWidth='two' is not a whole number"),
        ({"pool": "p", "stripeWidth": "17"}, "stripeWidth=17 is out of range: use 1..16"),
        ({"pool": "p", "replicas": "3"}, "replicas=3 is out of range: use 1..2"),
        ({"pool": "p", "transport": "fc"}, "transport='fc' is unknown: use rdma or tcp"),
        ({"pool": "p", "reconnectDelay": "0"}, "reconnectDelay=0 is out of range"),
        ({"pool": "p", "nrIoQueues": "0"}, "nrIoQueues=0 is out of range: use 1..128"),
        ({"pool": "p", "nrIoQueues": "129"}, "nrIoQueues=129 is out of range: use 1..128"),
    ],
)
def test_bad_parameters_are_named_with_the_fix(given: dict[str, str], named: str) -> None:
    with pytest.raises(ParameterError, match=named):
        params.parse(given)


@pytest.mark.parametrize(
    ("required", "limit", "stripes", "size"),
    [
        (0, 0, 1, 10 * GIB),  # no range: the pool's default
        (1, 0, 1, EXTENT),  # rounded up to an extent
        (5 * MIB, 0, 2, 8 * MIB),  # a whole extent on each stripe
        (0, 6 * MIB, 1, 4 * MIB),  # only a limit: the default, capped and rounded down
        (4 * MIB, 4 * MIB, 1, 4 * MIB),
    ],
)
def test_capacity_ranges(required: int, limit: int, stripes: int, size: int) -> None:
    assert volume_size(required, limit, 10 * GIB, stripes) == size


@pytest.mark.parametrize(
    ("required", "limit", "kind", "message"),
    [
        (-1, 0, "invalid", "must not be negative"),
        (8 * MIB, 4 * MIB, "out_of_range", "limit_bytes 4194304 is below required_bytes"),
        (5 * MIB, 7 * MIB, "out_of_range", "no size between"),
    ],
)
def test_bad_capacity_ranges(required: int, limit: int, kind: str, message: str) -> None:
    with pytest.raises(CapacityError, match=message) as caught:
        volume_size(required, limit, GIB, 1)
    assert caught.value.kind == kind


NODES = [
    NodeSpace("a", 1 * GIB, 900 * MIB, True),
    NodeSpace("b", 1 * GIB, 100 * MIB, True),
    NodeSpace("c", 1 * GIB, 0, False),
    NodeSpace("d", 1 * GIB, 500 * MIB, True),
]


def test_segments_go_to_distinct_ready_nodes_emptiest_first() -> None:
    assert place(NODES, 2, 100 * MIB) == ["b", "d"]
    assert place(NODES, 3, 100 * MIB) == ["b", "d", "a"]


def test_no_room_now_differs_from_never() -> None:
    with pytest.raises(PlacementError, match="need 3 ready node") as now:
        place(NODES, 3, 200 * MIB)  # a has 124 MiB free, c is not ready
    assert now.value.kind == "now"
    with pytest.raises(PlacementError, match="able to hold") as never:
        place(NODES, 2, 2 * GIB)
    assert never.value.kind == "never"
    with pytest.raises(PlacementError) as too_wide:
        place(NODES, 5, MIB)
    assert too_wide.value.kind == "never"


def test_space_used_counts_segments_and_snapshots_per_node() -> None:
    volume = Volume(Meta("fm-1"), VolumeSpec("pvc", "p", "2Gi", segments=[
        Segment(0, 0, "a", "1Gi"), Segment(1, 0, "b", "1Gi")]))  # fmt: skip
    snap = Snapshot(Meta("fs-1"), SnapshotSpec("snap", "fm-1", "2Gi", [
        SnapshotSegment(0, 0, "a", "fs-1-s0r0"),
        SnapshotSegment(1, 0, "b", "fs-1-s1r0")]))  # fmt: skip
    assert space_used([volume], [snap]) == {"a": 2 * GIB, "b": 2 * GIB}
    now = datetime(2026, 11, 27, 8, 0, 40, tzinfo=UTC)
    assert heartbeat_fresh("2026-11-27T08:00:00.123456Z", 40, now)
    assert not heartbeat_fresh("2026-11-27T07:59:59.000000Z", 40, now)
    assert not heartbeat_fresh(None, 40, now)
