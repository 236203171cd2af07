"""What a storage node exports, decided from Volume objects alone."""

from __future__ import annotations

import dataclasses

from flashmesh.core import naming
from flashmesh.core.resources import Endpoint, Meta, Segment, SegmentStatus, Volume, VolumeSpec
from flashmesh.dataplane.target.desired import desired_target, local_segments, segment_statuses
from flashmesh.dataplane.target.model import PORT_ID_BASE

HOST = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-000000000001"
OTHER = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-000000000002"
ENDPOINTS = [Endpoint("tcp", "10.77.0.1", 4420), Endpoint("rdma", "10.77.0.1", 4420)]
VG = "flashmesh-fast"


def volume(csi: str, nodes: list[str], hosts: list[str], deleting: bool = False) -> Volume:
    vid = naming.volume_id(csi)
    return Volume(
        Meta(vid, deletion_timestamp="2026-11-27T00:00:00Z" if deleting else None),
        VolumeSpec(csi, "fast", f"{len(nodes)}Gi",
                   segments=[Segment(i, 0, n, "1Gi") for i, n in enumerate(nodes)], hosts=hosts),
    )  # fmt: skip


def test_each_local_segment_is_a_subsystem_on_every_endpoint() -> None:
    a = volume("pvc-a", ["node-1", "node-2"], [HOST])
    b = volume("pvc-b", ["node-2", "node-1"], [HOST, OTHER])
    target = desired_target("node-1", [a, b], VG, ENDPOINTS)
    nqn_a = naming.subsystem_nqn(a.metadata.name, 0, 0)
    nqn_b = naming.subsystem_nqn(b.metadata.name, 1, 0)
    assert set(target.subsystems) == {nqn_a, nqn_b}
    sub = target.subsystems[nqn_a]
    assert sub.allowed_hosts == {HOST} and not sub.allow_any_host
    assert sub.serial == naming.subsystem_serial(a.metadata.name, 0, 0)
    ns = sub.namespaces[1]
    assert (
        ns.device_path == f"/dev/mapper/flashmesh--fast-{a.metadata.name.replace('-', '--')}--s0r0"
    )
    assert ns.device_uuid == naming.namespace_uuid(nqn_a)
    assert sorted(target.ports) == [PORT_ID_BASE, PORT_ID_BASE + 16]
    assert {p.trtype for p in target.ports.values()} == {"tcp", "rdma"}
    assert all(p.subsystems == {nqn_a, nqn_b} for p in target.ports.values())
    assert set(target.hosts) == {HOST, OTHER}


def test_deleted_volumes_and_blocked_hosts_are_left_out() -> None:
    gone = volume("pvc-gone", ["node-1"], [HOST], deleting=True)
    kept = volume("pvc-kept", ["node-1"], [HOST, OTHER])
    target = desired_target("node-1", [gone, kept], VG, ENDPOINTS, blocked_hosts=frozenset({OTHER}))
    assert list(target.subsystems) == [naming.subsystem_nqn(kept.metadata.name, 0, 0)]
    assert set(target.hosts) == {HOST}
    assert [s.volume for s in local_segments("node-1", [gone, kept])] == [kept.metadata.name]


def test_keys_go_to_host_entries_when_the_pool_asks_for_authentication() -> None:
    target = desired_target("node-1", [volume("pvc-a", ["node-1"], [HOST])], VG, ENDPOINTS,
                            host_keys={HOST: "DHHC-1:00:key:"})  # fmt: skip
    assert target.hosts[HOST].dhchap_key == "DHHC-1:00:key:"


def test_a_segment_is_ready_only_when_exported_everywhere() -> None:
    a = volume("pvc-a", ["node-1"], [HOST])
    nqn = naming.subsystem_nqn(a.metadata.name, 0, 0)
    done = desired_target("node-1", [a], VG, ENDPOINTS)
    (ready,) = segment_statuses("node-1", [a], done, ENDPOINTS, {})[a.metadata.name]
    assert ready == SegmentStatus(0, 0, "node-1", True, nqn, ENDPOINTS, [HOST], None)

    nothing = desired_target("node-1", [], VG, ENDPOINTS)
    (waiting,) = segment_statuses("node-1", [a], nothing, ENDPOINTS, {})[a.metadata.name]
    assert not waiting.ready and waiting.message == "not exported yet"
    (failed,) = segment_statuses("node-1", [a], nothing, ENDPOINTS, {nqn: "nvmet: busy"})[
        a.metadata.name
    ]
    assert failed.message == "nvmet: busy"


def test_a_refused_host_is_left_out_and_said_on_a_ready_segment() -> None:
    a = volume("pvc-a", ["node-1"], [HOST, OTHER])
    refused = {OTHER: f"host {OTHER} is not allowed: nodes gpu-1, gpu-2 all claim it"}
    done = desired_target("node-1", [a], VG, ENDPOINTS, blocked_hosts=frozenset(refused))
    (status,) = segment_statuses("node-1", [a], done, ENDPOINTS, {}, refused)[a.metadata.name]
    assert status.ready and status.hosts == [HOST]
    assert status.message == refused[OTHER]
    # Refused new connections only: the controllers it has are kept, and said so.
    assert done.subsystems[status.subsystem_nqn or ""].kept_hosts == {OTHER}
    assert status.kept_hosts == [OTHER] and status.cutting_off is None


def test_a_host_still_being_cut_off_keeps_the_segment_not_ready_and_named() -> None:
    """ControllerUnpublish waits on this: the host is no longer allowed, but its live
    controllers are not known to be ended."""
    a = volume("pvc-a", ["node-1"], [HOST])
    nqn = naming.subsystem_nqn(a.metadata.name, 0, 0)
    done = desired_target("node-1", [a], VG, ENDPOINTS)
    seen = dataclasses.replace(done.subsystems[nqn], cutting_off=frozenset({OTHER}))
    observed = dataclasses.replace(done, subsystems={nqn: seen})
    (status,) = segment_statuses("node-1", [a], observed, ENDPOINTS, {})[a.metadata.name]
    assert not status.ready
    assert (status.hosts, status.cutting_off) == ([HOST], [OTHER])
    assert status.message == f"cutting off {OTHER}: its live controllers are not ended yet"


def test_a_segment_whose_grow_failed_stays_ready_and_says_why() -> None:
    a = volume("pvc-a", ["node-1"], [HOST])
    nqn = naming.subsystem_nqn(a.metadata.name, 0, 0)
    done = desired_target("node-1", [a], VG, ENDPOINTS)
    why = "growing to 2Gi failed, still serving 1Gi: lvextend: injected failure"
    (status,) = segment_statuses(
        "node-1", [a], done, ENDPOINTS, {}, sizes={nqn: "1Gi"}, held={nqn: why}
    )[a.metadata.name]
    assert status.ready and status.message == why and status.size == "1Gi"


def test_an_rdma_link_flap_never_renumbers_the_tcp_port() -> None:
    """Ports were numbered by their place in the sorted endpoints: an RDMA endpoint going
    away moved tcp's port to another id, made anew, dropping every TCP host."""
    a = volume("pvc-a", ["node-1"], [HOST])
    tcp = [e for e in ENDPOINTS if e.transport == "tcp"]
    both = desired_target("node-1", [a], VG, ENDPOINTS).ports
    flapped = desired_target("node-1", [a], VG, tcp).ports
    [tcp_id] = [i for i, p in both.items() if p.trtype == "tcp"]
    assert list(flapped) == [tcp_id] == [PORT_ID_BASE]
    assert flapped[tcp_id] == both[tcp_id]
    # Two addresses of one transport: one port each, within that transport's block.
    two = [*tcp, Endpoint("tcp", "10.77.1.1", 4420)]
    assert sorted(desired_target("node-1", [a], VG, two).ports) == [PORT_ID_BASE, PORT_ID_BASE + 1]
