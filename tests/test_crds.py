"""The CRDs in the real kube-apiserver: samples accepted, bad objects refused with the
field and the fix named, and nothing changed by a refused update."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import yaml

from flashmesh.core import resources
from flashmesh.kube import Kube, KubeError
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.crds import example_files

pytestmark = pytest.mark.cluster

_names = itertools.count()


def unique(name: str) -> str:
    return f"{name}-{next(_names)}"


def seg(index: int, replica: int, node: str, size: str = "10Gi") -> dict[str, Any]:
    return {"index": index, "replica": replica, "node": node, "size": size}


def pool(**spec: Any) -> dict[str, Any]:
    base = {"nodeSelector": {"matchLabels": {"flashmesh.dev/storage": "true"}}}
    return {
        "apiVersion": resources.API_VERSION,
        "kind": "StoragePool",
        "metadata": {"name": unique("pool")},
        "spec": {**base, **spec},
    }


def volume(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "csiName": "pvc-1",
        "pool": "fast",
        "size": "20Gi",
        "layout": {"stripeWidth": 2, "replicas": 1},
        "segments": [
            seg(0, 0, "storage-0"),
            seg(1, 0, "storage-1"),
        ],
    }
    return {
        "apiVersion": resources.API_VERSION,
        "kind": "Volume",
        "metadata": {"name": unique("vol")},
        "spec": {**base, **spec},
    }


def snapshot(**spec: Any) -> dict[str, Any]:
    base = {"csiName": "snap-1", "sourceVolume": "vol-a", "size": "20Gi"}
    return {
        "apiVersion": resources.API_VERSION,
        "kind": "Snapshot",
        "metadata": {"name": unique("snap")},
        "spec": {**base, **spec},
    }


def workload(etl: dict[str, Any] | None = None, **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": resources.API_VERSION,
        "kind": "TrainingWorkload",
        "metadata": {"name": unique("tw"), "namespace": "default"},
        "spec": {
            "dataset": {"size": "50Gi", "pool": "fast"},
            "stages": {
                "etl": {"image": "etl:1", "command": ["etl"], **(etl or {})},
                "training": {"image": "train:1", "command": ["train"], **training},
            },
        },
    }


def without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    target = out
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return out


def refusal(kube: Kube, obj: dict[str, Any], update: bool = False) -> KubeError:
    with pytest.raises(KubeError) as error:
        (kube.replace if update else kube.create)(obj)
    assert error.value.status == 422, error.value
    return error.value


def assert_cause(error: KubeError, field: str, fix: str) -> None:
    """The refusal names the field and says what to do about it."""
    matching = [c for c in error.causes if c.field == field]
    assert matching, f"no cause for {field!r} in {error.causes}"
    assert any(fix in c.message for c in matching), f"{fix!r} not in {matching}"


def test_every_example_is_accepted_and_reads_back_into_its_model(crds: LocalCluster) -> None:
    kube = crds.kube
    made = []
    for path in example_files():
        data = yaml.safe_load(path.read_text())
        stored = kube.create(data)
        made.append(stored)
        kind = next(k for k in resources.KINDS if data["kind"] == k.KIND)
        model = kind.from_dict(stored)
        # The model writes back exactly what the API server stored, defaults included.
        assert model.to_dict()["spec"] == stored["spec"], path.name
    for obj in made:  # later tests run an operator over the whole cluster
        meta = obj["metadata"]
        kube.delete(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))


def test_a_full_status_round_trips_through_the_model(crds: LocalCluster) -> None:
    kube = crds.kube
    name = unique("node")
    kube.create(
        {
            "apiVersion": resources.API_VERSION,
            "kind": "StorageNode",
            "metadata": {"name": name},
            "spec": {"pool": "fast"},
        }
    )
    status = {
        "phase": "Ready",
        "drives": [
            {
                "path": "/dev/nvme0n1",
                "size": "3576Gi",
                "model": "QEMU NVMe Ctrl",
                "serial": "fm0001",
            }
        ],
        "volumeGroup": {
            "name": "flashmesh-fast",
            "size": "3576Gi",
            "free": "3000Gi",
            "thinPool": {
                "name": "thin",
                "size": "3500Gi",
                "dataPercent": 12.5,
                "metadataPercent": 1,
            },
        },
        "endpoints": [{"transport": "tcp", "address": "10.0.0.1", "port": 4420}],
        "rdmaDevices": [
            {
                "name": "rxe0",
                "port": 1,
                "state": "ACTIVE",
                "linkLayer": "Ethernet",
                "netdev": "eth0",
            }
        ],
        "lastHeartbeatTime": "2026-11-27T10:00:00Z",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Heartbeat",
                "lastTransitionTime": "2026-11-27T10:00:00Z",
            }
        ],
        "observedGeneration": 1,
    }
    stored = kube.patch(
        resources.API_VERSION, "StorageNode", name, {"status": status}, subresource="status"
    )
    assert stored["status"]["drives"][0]["selected"] is False  # the schema's default
    assert resources.StorageNode.from_dict(stored).to_dict()["status"] == stored["status"]


# (name, object, field the API server names, words that say what to fix)
CREATE_REFUSALS: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "stripe width above 16",
        pool(layout={"stripeWidth": 17}),
        "spec.layout.stripeWidth",
        "less than or equal to 16",
    ),
    (
        "stripe width 0",
        pool(layout={"stripeWidth": 0}),
        "spec.layout.stripeWidth",
        "greater than or equal to 1",
    ),
    (
        "replicas above 2",
        pool(layout={"replicas": 3}),
        "spec.layout.replicas",
        "less than or equal to 2",
    ),
    (
        "unknown transport",
        pool(transports=["iscsi"]),
        "spec.transports[0]",
        'supported values: "tcp", "rdma"',
    ),
    ("transport twice", pool(transports=["tcp", "tcp"]), "spec.transports[1]", "Duplicate"),
    ("no transport", pool(transports=[]), "spec.transports", "at least 1 items"),
    (
        "zero default size",
        pool(defaultVolumeSize="0"),
        "spec.defaultVolumeSize",
        "positive quantity such as 10Gi",
    ),
    (
        "size that is no quantity",
        pool(defaultVolumeSize="lots"),
        "spec.defaultVolumeSize",
        "positive quantity such as 10Gi",
    ),
    (
        "negative drive size",
        pool(drives={"minSize": "-1Gi"}),
        "spec.drives.minSize",
        "positive quantity",
    ),
    (
        "drive pattern outside /dev",
        pool(drives={"pathPatterns": ["nvme*"]}),
        "spec.drives.pathPatterns[0]",
        "must start with /dev/",
    ),
    (
        "no node selector",
        without(pool(), "spec", "nodeSelector"),
        "spec.nodeSelector",
        "Required value",
    ),
    (
        "In without values",
        pool(nodeSelector={"matchExpressions": [{"key": "zone", "operator": "In"}]}),
        "spec.nodeSelector.matchExpressions[0].values",
        "need a non-empty values list",
    ),
    (
        "unknown selector operator",
        pool(nodeSelector={"matchExpressions": [{"key": "zone", "operator": "Like"}]}),
        "spec.nodeSelector.matchExpressions[0].operator",
        'supported values: "In"',
    ),
    ("zero volume size", volume(size="0Gi"), "spec.size", "positive quantity"),
    (
        "segment index beyond the stripe width",
        volume(
            segments=[
                seg(0, 0, "a"),
                seg(2, 0, "b"),
            ]
        ),
        "spec.segments",
        "below spec.layout.stripeWidth",
    ),
    (
        "too few segments",
        volume(segments=[seg(0, 0, "a")]),
        "spec.segments",
        "exactly stripeWidth x replicas segments",
    ),
    (
        "one stripe set on one node",
        volume(
            segments=[
                seg(0, 0, "a"),
                seg(1, 0, "a"),
            ]
        ),
        "spec.segments",
        "distinct nodes",
    ),
    (
        "replicas of a segment on one node",
        volume(
            layout={"stripeWidth": 1, "replicas": 2},
            segments=[
                seg(0, 0, "a", "20Gi"),
                seg(0, 1, "a", "20Gi"),
            ],
        ),
        "spec.segments",
        "distinct nodes",
    ),
    ("host that is no NQN", volume(hosts=["node-1"]), "spec.hosts[0]", "host NQNs, such as"),
    (
        "source naming both kinds",
        volume(source={"snapshot": "s", "volume": "v"}),
        "spec.source",
        "exactly one of snapshot or volume",
    ),
    (
        "CSI name over 128 bytes",
        volume(csiName="x" * 129),
        "spec.csiName",
        "may not be more than 128",
    ),
    (
        "segment list with one identity twice",
        volume(
            segments=[
                seg(0, 0, "a"),
                seg(0, 0, "b"),
            ]
        ),
        "spec.segments[1]",
        "Duplicate value",
    ),
    ("snapshot of negative size", snapshot(size="-5Gi"), "spec.size", "positive quantity"),
    (
        "parallel ETL",
        workload(etl={"replicas": 2}),
        "spec.stages.etl.replicas",
        "spec.stages.etl.replicas must be 1",
    ),
    (
        "17 GPUs per replica",
        workload(gpusPerReplica=17),
        "spec.stages.training.gpusPerReplica",
        "less than or equal to 16",
    ),
    (
        "training without a command",
        workload(command=[]),
        "spec.stages.training.command",
        "at least 1 items",
    ),
    (
        "zero checkpoint size",
        workload(checkpointSize="0"),
        "spec.stages.training.checkpointSize",
        "positive quantity",
    ),
    (
        "no training stage",
        without(workload(), "spec", "stages", "training"),
        "spec.stages.training",
        "Required value",
    ),
    (
        "a fabric address that is no IPv4 address",
        {
            "apiVersion": resources.API_VERSION,
            "kind": "StorageNode",
            "metadata": {"name": "sn-bad-address"},
            "spec": {"fabricAddress": "storage-0.fabric"},
        },
        "spec.fabricAddress",
        "must be of type ipv4",
    ),
]


@pytest.mark.parametrize(
    ("obj", "field", "fix"),
    [case[1:] for case in CREATE_REFUSALS],
    ids=[case[0] for case in CREATE_REFUSALS],
)
def test_bad_objects_are_refused_naming_field_and_fix(
    crds: LocalCluster, obj: dict[str, Any], field: str, fix: str
) -> None:
    kube = crds.kube
    assert_cause(refusal(kube, obj), field, fix)
    meta = obj["metadata"]
    assert kube.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace")) is None


def change_layout(v: dict[str, Any]) -> None:
    v["spec"]["layout"]["stripeWidth"] = 1
    v["spec"]["segments"] = v["spec"]["segments"][:1]


def shrink(v: dict[str, Any]) -> None:
    v["spec"]["size"] = "10Gi"


def move_without_rebuild(v: dict[str, Any]) -> None:
    v["spec"]["segments"][0]["node"] = "storage-9"


def drop_segment(v: dict[str, Any]) -> None:
    v["spec"]["segments"] = [
        seg(0, 0, "storage-0"),
        seg(1, 1, "storage-1"),
    ]


def move_pool(v: dict[str, Any]) -> None:
    v["spec"]["pool"] = "slow"


def add_source(v: dict[str, Any]) -> None:
    v["spec"]["source"] = {"snapshot": "snap-a"}


def resize_snapshot(s: dict[str, Any]) -> None:
    s["spec"]["size"] = "40Gi"


def move_dataset(w: dict[str, Any]) -> None:
    w["spec"]["dataset"]["pool"] = "slow"


def shrink_dataset(w: dict[str, Any]) -> None:
    w["spec"]["dataset"]["size"] = "1Gi"


UPDATE_REFUSALS = [
    ("volume layout", volume, change_layout, "spec.layout", "spec.layout is immutable"),
    ("volume shrinks", volume, shrink, "spec.size", "cannot shrink"),
    (
        "segment moved without a rebuild",
        volume,
        move_without_rebuild,
        "spec.segments[0].node",
        "raise spec.segments[].rebuild together with node",
    ),
    (
        "segment identity changed",
        volume,
        drop_segment,
        "spec.segments",
        "keep their (index, replica) identities",
    ),
    ("volume changes pool", volume, move_pool, "spec.pool", "stays in the pool"),
    ("volume gains a source", volume, add_source, "spec.source", "fixed at creation"),
    ("snapshot spec changed", snapshot, resize_snapshot, "spec", "create a new snapshot"),
    (
        "dataset changes pool",
        workload,
        move_dataset,
        "spec.dataset.pool",
        "create a new TrainingWorkload",
    ),
    ("dataset shrinks", workload, shrink_dataset, "spec.dataset.size", "cannot shrink"),
]


@pytest.mark.parametrize(
    ("make", "mutate", "field", "fix"),
    [case[1:] for case in UPDATE_REFUSALS],
    ids=[case[0] for case in UPDATE_REFUSALS],
)
def test_bad_updates_are_refused_and_change_nothing(
    crds: LocalCluster, make: Any, mutate: Any, field: str, fix: str
) -> None:
    kube = crds.kube
    stored = kube.create(make())
    changed = copy.deepcopy(stored)
    mutate(changed)
    assert_cause(refusal(kube, changed, update=True), field, fix)
    meta = stored["metadata"]
    after = kube.get(stored["apiVersion"], stored["kind"], meta["name"], meta.get("namespace"))
    assert after is not None
    assert after["spec"] == stored["spec"]
    assert after["metadata"]["resourceVersion"] == meta["resourceVersion"]


def test_allowed_updates_pass_the_same_rules(crds: LocalCluster) -> None:
    """Growing a volume, moving a segment through a rebuild and adding hosts are allowed."""
    kube = crds.kube
    stored = kube.create(volume())
    stored["spec"]["size"] = "40Gi"
    stored["spec"]["segments"][0].update(node="storage-5", rebuild=1)
    stored["spec"]["hosts"] = ["nqn.2014-08.org.nvmexpress:uuid:0b4a"]
    after = kube.replace(stored)
    assert after["spec"]["size"] == "40Gi"
    assert after["spec"]["segments"][0]["node"] == "storage-5"


def test_a_pool_selecting_no_node_is_accepted(crds: LocalCluster) -> None:
    stored = crds.kube.create(pool(nodeSelector={"matchLabels": {"nothing": "matches"}}))
    assert stored["spec"]["transports"] == ["rdma", "tcp"]
    assert stored["spec"]["layout"] == {"stripeWidth": 1, "replicas": 1}
