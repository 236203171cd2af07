"""The TrainingWorkload decision walked step by step, the cluster played by the test:
what is created at each step (access modes, mounts, sources), what waits for what, and
that deciding again with those objects present creates nothing."""

from __future__ import annotations

from typing import Any

from flashmesh.core import workloads
from flashmesh.core.resources import TrainingWorkload
from flashmesh.core.workloads import Observed, decide

NOW = "2026-11-27T10:00:00Z"


def workload(inference: bool = True) -> TrainingWorkload:
    stages: dict[str, Any] = {
        "etl": {"image": "etl:1", "command": ["etl"]},
        "training": {"image": "train:1", "command": ["train"], "replicas": 2,
                     "gpusPerReplica": 2, "checkpointSize": "1Gi",
                     "nodeSelector": {"gpu": "yes"},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
    }  # fmt: skip
    if inference:
        stages["inference"] = {"image": "serve:1", "command": ["serve"], "replicas": 1}
    return TrainingWorkload.from_dict({
        "apiVersion": "flashmesh.dev/v1alpha1", "kind": "TrainingWorkload",
        "metadata": {"name": "wl", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {"dataset": {"size": "2Gi", "pool": "fast"}, "stages": stages},
    })  # fmt: skip


def apply(seen: Observed, objects: list[dict[str, Any]]) -> None:
    """What the API server would then hold."""
    table = {"PersistentVolumeClaim": seen.pvcs, "Job": seen.jobs,
             "VolumeSnapshot": seen.snapshots, "Deployment": seen.deployments}  # fmt: skip
    for obj in objects:
        table[obj["kind"]][obj["metadata"]["name"]] = obj


def made(objects: list[dict[str, Any]]) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objects]


def finish(job: dict[str, Any], outcome: str = "Complete") -> None:
    job["status"] = {"startTime": NOW, "completionTime": NOW,
                     "conditions": [{"type": outcome, "status": "True"}]}  # fmt: skip


def step(wl: TrainingWorkload, seen: Observed) -> workloads.Decision:
    """Decides, applies, and checks that deciding again creates nothing more."""
    decision = decide(wl, seen, NOW)
    apply(seen, decision.create)
    assert decide(wl, seen, NOW).create == [], "a second decision made objects again"
    return decision


def test_the_pipeline_from_etl_to_inference() -> None:
    wl, seen = workload(), Observed()

    first = step(wl, seen)
    assert first.phase == "ETL"
    assert made(first.create) == ["PersistentVolumeClaim/wl-dataset", "Job/wl-etl"]
    dataset = seen.pvcs["wl-dataset"]["spec"]
    assert dataset["accessModes"] == ["ReadWriteOnce"]
    assert dataset["storageClassName"] == "flashmesh-fast"
    assert dataset["resources"] == {"requests": {"storage": "2Gi"}}
    etl = seen.jobs["wl-etl"]["spec"]["template"]["spec"]
    assert etl["containers"][0]["volumeMounts"] == [{"name": "dataset", "mountPath": "/data"}]
    assert etl["restartPolicy"] == "Never"
    owner = seen.jobs["wl-etl"]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("TrainingWorkload", "u-1", True)

    # ETL done, but its volume is still attached: nothing is snapshotted yet.
    finish(seen.jobs["wl-etl"])
    seen.attached.add("wl-dataset")
    waiting = step(wl, seen)
    assert (waiting.phase, waiting.create) == ("ETL", [])
    assert "detached" in waiting.message
    seen.attached.clear()

    snap = step(wl, seen)
    assert made(snap.create) == ["VolumeSnapshot/wl-dataset"]
    source = seen.snapshots["wl-dataset"]["spec"]
    assert source == {"volumeSnapshotClassName": "flashmesh-fast",
                      "source": {"persistentVolumeClaimName": "wl-dataset"}}  # fmt: skip
    assert step(wl, seen).create == []  # not ready yet
    seen.snapshots["wl-dataset"]["status"] = {"readyToUse": True}

    training = step(wl, seen)
    assert training.phase == "Training"
    assert made(training.create) == ["PersistentVolumeClaim/wl-dataset-ro", "Job/wl-train"]
    shared = seen.pvcs["wl-dataset-ro"]["spec"]
    assert shared["accessModes"] == ["ReadOnlyMany"]
    assert shared["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io",
                                    "kind": "VolumeSnapshot", "name": "wl-dataset"}  # fmt: skip
    job = seen.jobs["wl-train"]["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 2, 2)
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "yes"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert container["volumeMounts"] == [
        {"name": "dataset", "mountPath": "/data", "readOnly": True},
        {"name": "checkpoint", "mountPath": "/checkpoint"},
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dataset"]["persistentVolumeClaim"] == {"claimName": "wl-dataset-ro",
                                                           "readOnly": True}  # fmt: skip
    template = volumes["checkpoint"]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert template["accessModes"] == ["ReadWriteOnce"]
    assert template["resources"] == {"requests": {"storage": "1Gi"}}

    # Training done: replica 0's checkpoint (its pod's ephemeral PVC) becomes the model.
    finish(seen.jobs["wl-train"])
    seen.pods = [
        {"metadata": {"name": f"wl-train-{i}-x", "labels": {workloads.INDEX_LABEL: str(i)}},
         "status": {"phase": "Succeeded"}}
        for i in (1, 0)
    ]  # fmt: skip
    seen.pvcs["wl-train-0-x-checkpoint"] = {"metadata": {"name": "wl-train-0-x-checkpoint"}}
    checkpoint = step(wl, seen)
    assert made(checkpoint.create) == ["VolumeSnapshot/wl-checkpoint"]
    assert seen.snapshots["wl-checkpoint"]["spec"]["source"] == {
        "persistentVolumeClaimName": "wl-train-0-x-checkpoint"
    }
    seen.snapshots["wl-checkpoint"]["status"] = {"readyToUse": True}

    inference = step(wl, seen)
    assert inference.phase == "Inference"
    assert made(inference.create) == ["PersistentVolumeClaim/wl-model", "Deployment/wl-inference"]
    assert seen.pvcs["wl-model"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert seen.pvcs["wl-model"]["spec"]["dataSource"]["name"] == "wl-checkpoint"
    serve = seen.deployments["wl-inference"]["spec"]["template"]["spec"]
    assert serve["containers"][0]["volumeMounts"] == [
        {"name": "model", "mountPath": "/model", "readOnly": True}
    ]
    seen.deployments["wl-inference"]["spec"]["replicas"] = 1
    seen.deployments["wl-inference"]["status"] = {"availableReplicas": 1}

    done = step(wl, seen)
    assert done.phase == "Succeeded"
    volumes_status = done.status.volumes
    assert volumes_status is not None
    assert (volumes_status.dataset, volumes_status.dataset_read_only, volumes_status.model) == (
        "wl-dataset", "wl-dataset-ro", "wl-model"
    )  # fmt: skip
    stages = done.status.stages
    assert stages is not None and stages.etl is not None and stages.inference is not None
    assert stages.etl.state == "Succeeded" and stages.inference.state == "Available"
    ready = [c for c in workloads.conditions(done, [], NOW) if c.type == "Ready"]
    assert ready[0].status == "True"


def test_a_failed_stage_fails_the_workload_and_goes_no_further() -> None:
    wl, seen = workload(), Observed()
    step(wl, seen)
    finish(seen.jobs["wl-etl"], "Failed")
    failed = step(wl, seen)
    assert (failed.phase, failed.create) == ("Failed", [])
    assert "ETL Job wl-etl failed" in failed.message
    kinds = {c.type: c.status for c in workloads.conditions(failed, [], NOW)}
    assert kinds == {"Ready": "False", "Failed": "True", "Progressing": "False"}


def test_without_inference_the_model_is_the_end() -> None:
    wl, seen = workload(inference=False), Observed()
    step(wl, seen)
    finish(seen.jobs["wl-etl"])
    step(wl, seen)
    seen.snapshots["wl-dataset"]["status"] = {"readyToUse": True}
    step(wl, seen)
    finish(seen.jobs["wl-train"])
    seen.pods = [{"metadata": {"name": "wl-train-0-a", "labels": {workloads.INDEX_LABEL: "0"}},
                  "status": {"phase": "Succeeded"}}]  # fmt: skip
    seen.pvcs["wl-train-0-a-checkpoint"] = {"metadata": {"name": "wl-train-0-a-checkpoint"}}
    step(wl, seen)
    seen.snapshots["wl-checkpoint"]["status"] = {"readyToUse": True}
    last = step(wl, seen)
    assert last.phase == "Succeeded"
    assert made(last.create) == ["PersistentVolumeClaim/wl-model"]


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    wl, seen = workload(), Observed()
    first = decide(wl, seen, NOW)
    before = [
        {"type": c.type, "status": c.status, "lastTransitionTime": "2026-01-01T00:00:00Z"}
        for c in workloads.conditions(first, [], NOW)
    ]
    again = workloads.conditions(decide(wl, seen, "later"), before, "2026-11-27T11:00:00Z")
    assert {c.last_transition_time for c in again} == {"2026-01-01T00:00:00Z"}
