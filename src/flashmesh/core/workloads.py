"""What the operator decides for a TrainingWorkload, from the objects it finds: the next
objects to create, and the status to show. Level-triggered and idempotent: every object
has a fixed name derived from the workload's, so a decision made twice (an operator
killed between creating an object and writing status) creates nothing twice.

The pipeline, over one dataset in one pool:
  ETL Job writes the dataset PVC (ReadWriteOnce)
  -> once it succeeded and its volume is detached: VolumeSnapshot of the dataset
  -> a ReadOnlyMany PVC restored from it
  -> training: an Indexed Job, every replica mounting the dataset read-only, each with its
     own checkpoint volume (a generic ephemeral ReadWriteOnce volume)
  -> once it succeeded and replica 0's checkpoint is detached: VolumeSnapshot of it
  -> a ReadOnlyMany model PVC restored from it
  -> inference: a Deployment mounting the model read-only (Succeeded once available)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashmesh.core import resources, serde
from flashmesh.core.pools import carry_transition_times, class_name
from flashmesh.core.resources import Condition, Stage, TrainingWorkload

WORKLOAD_LABEL = "flashmesh.dev/workload"
STAGE_LABEL = "flashmesh.dev/stage"
GPU_RESOURCE = "nvidia.com/gpu"
DATA_PATH, CHECKPOINT_PATH, MODEL_PATH = "/data", "/checkpoint", "/model"
SNAPSHOT_API = "snapshot.storage.k8s.io/v1"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

PHASES = ("Pending", "ETL", "Training", "Inference", "Succeeded", "Failed")


@dataclass(frozen=True)
class Names:
    """Every object of one workload, by its fixed name."""

    workload: str

    @property
    def dataset(self) -> str:
        return f"{self.workload}-dataset"  # the PVC, and the VolumeSnapshot of it

    @property
    def dataset_read_only(self) -> str:
        return f"{self.workload}-dataset-ro"

    @property
    def etl(self) -> str:
        return f"{self.workload}-etl"

    @property
    def training(self) -> str:
        return f"{self.workload}-train"

    @property
    def checkpoint(self) -> str:
        return f"{self.workload}-checkpoint"  # the VolumeSnapshot of replica 0's checkpoint

    @property
    def model(self) -> str:
        return f"{self.workload}-model"

    @property
    def inference(self) -> str:
        return f"{self.workload}-inference"


@dataclass
class Observed:
    """The workload's objects as found (absent ones missing from the dicts)."""

    pvcs: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)  # the training Job's pods
    attached: set[str] = field(default_factory=set)  # PVCs whose volume is still attached


@dataclass
class Decision:
    create: list[dict[str, Any]]
    phase: str
    message: str  # what the workload is doing or waiting for, for a person
    status: resources.TrainingWorkloadStatus


def job_state(job: dict[str, Any] | None) -> str:
    """Pending (not made or no pod yet), Running, Succeeded or Failed."""
    if job is None:
        return "Pending"
    status = job.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return "Succeeded" if c["type"] == "Complete" else "Failed"
    return "Running" if status.get("active") or status.get("startTime") else "Pending"


def snapshot_ready(snapshot: dict[str, Any] | None) -> bool:
    return bool(((snapshot or {}).get("status") or {}).get("readyToUse"))


def deployment_available(deployment: dict[str, Any] | None) -> bool:
    if deployment is None:
        return False
    wanted = int((deployment.get("spec") or {}).get("replicas", 1))
    return int((deployment.get("status") or {}).get("availableReplicas") or 0) >= wanted


def checkpoint_claim(pods: list[dict[str, Any]]) -> str | None:
    """The checkpoint PVC of the succeeded replica 0 (a generic ephemeral volume's PVC is
    named <pod>-<volume>)."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        labels = pod["metadata"].get("labels") or {}
        if labels.get(INDEX_LABEL) == "0" and (pod.get("status") or {}).get("phase") == "Succeeded":
            return f"{pod['metadata']['name']}-checkpoint"
    return None


# --- the objects -------------------------------------------------------------------------


def _meta(wl: TrainingWorkload, name: str, stage: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": wl.metadata.namespace,
        "labels": {WORKLOAD_LABEL: wl.metadata.name, STAGE_LABEL: stage},
        "ownerReferences": [
            {
                "apiVersion": resources.API_VERSION,
                "kind": TrainingWorkload.KIND,
                "name": wl.metadata.name,
                "uid": wl.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _claim_spec(
    wl: TrainingWorkload, mode: str, size: str, snapshot: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": [mode],
        "storageClassName": class_name(wl.spec.dataset.pool),
        "resources": {"requests": {"storage": size}},
    }
    if snapshot:
        spec["dataSource"] = {
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": snapshot,
        }
    return spec


def pvc(
    wl: TrainingWorkload, name: str, stage: str, mode: str, size: str, snapshot: str | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(wl, name, stage),
        "spec": _claim_spec(wl, mode, size, snapshot),
    }


def volume_snapshot(wl: TrainingWorkload, name: str, stage: str, claim: str) -> dict[str, Any]:
    return {
        "apiVersion": SNAPSHOT_API,
        "kind": "VolumeSnapshot",
        "metadata": _meta(wl, name, stage),
        "spec": {
            "volumeSnapshotClassName": class_name(wl.spec.dataset.pool),
            "source": {"persistentVolumeClaimName": claim},
        },
    }


def pod_spec(
    stage: Stage, name: str, volumes: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": stage.image,
        "command": list(stage.command),
        "volumeMounts": mounts,
    }
    if stage.args:
        container["args"] = list(stage.args)
    if stage.gpus_per_replica:
        gpus = str(stage.gpus_per_replica)
        container["resources"] = {"limits": {GPU_RESOURCE: gpus}, "requests": {GPU_RESOURCE: gpus}}
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if stage.node_selector:
        spec["nodeSelector"] = dict(stage.node_selector)
    if stage.tolerations:
        spec["tolerations"] = [serde.to_dict(t) for t in stage.tolerations]
    return spec


def etl_job(wl: TrainingWorkload, names: Names) -> dict[str, Any]:
    volumes = [{"name": "dataset", "persistentVolumeClaim": {"claimName": names.dataset}}]
    mounts = [{"name": "dataset", "mountPath": DATA_PATH}]
    template = pod_spec(wl.spec.stages.etl, "etl", volumes, mounts)
    template["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(wl, names.etl, "etl"),
        "spec": {
            "backoffLimit": 1,
            "template": {"metadata": {"labels": {WORKLOAD_LABEL: wl.metadata.name,
                                                 STAGE_LABEL: "etl"}},
                         "spec": template},
        },
    }  # fmt: skip


def training_job(wl: TrainingWorkload, names: Names) -> dict[str, Any]:
    stage = wl.spec.stages.training
    checkpoint = {
        "metadata": {"labels": {WORKLOAD_LABEL: wl.metadata.name, STAGE_LABEL: "training"}},
        "spec": _claim_spec(wl, "ReadWriteOnce", stage.checkpoint_size),
    }
    volumes = [
        {"name": "dataset", "persistentVolumeClaim": {"claimName": names.dataset_read_only,
                                                      "readOnly": True}},
        {"name": "checkpoint", "ephemeral": {"volumeClaimTemplate": checkpoint}},
    ]  # fmt: skip
    mounts: list[dict[str, Any]] = [
        {"name": "dataset", "mountPath": DATA_PATH, "readOnly": True},
        {"name": "checkpoint", "mountPath": CHECKPOINT_PATH},
    ]
    template = pod_spec(stage, "train", volumes, mounts)
    template["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(wl, names.training, "training"),
        "spec": {
            "completionMode": "Indexed",
            "completions": stage.replicas,
            "parallelism": stage.replicas,
            "backoffLimit": stage.replicas,
            "template": {"metadata": {"labels": {WORKLOAD_LABEL: wl.metadata.name,
                                                 STAGE_LABEL: "training"}},
                         "spec": template},
        },
    }  # fmt: skip


def inference_deployment(wl: TrainingWorkload, names: Names, stage: Stage) -> dict[str, Any]:
    volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": names.model,
                                                           "readOnly": True}}]  # fmt: skip
    mounts = [{"name": "model", "mountPath": MODEL_PATH, "readOnly": True}]
    labels = {WORKLOAD_LABEL: wl.metadata.name, STAGE_LABEL: "inference"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(wl, names.inference, "inference"),
        "spec": {
            "replicas": stage.replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": pod_spec(stage, "serve", volumes, mounts)},
        },
    }  # fmt: skip


# --- the decision ------------------------------------------------------------------------


def _stage_status(job: dict[str, Any] | None) -> resources.StageStatus | None:
    if job is None:
        return None
    status = job.get("status") or {}
    return resources.StageStatus(
        job_state(job), status.get("startTime"), status.get("completionTime")
    )


def decide(wl: TrainingWorkload, seen: Observed, now: str) -> Decision:
    """The objects to create next (never one that exists) and the status to show."""
    names = Names(wl.metadata.name)
    dataset = wl.spec.dataset
    stages = wl.spec.stages
    create: list[dict[str, Any]] = []
    volumes = resources.WorkloadVolumes(dataset=names.dataset)
    etl, training = seen.jobs.get(names.etl), seen.jobs.get(names.training)
    stage_status = resources.StageStatuses(etl=_stage_status(etl), training=_stage_status(training))

    def done(phase: str, message: str) -> Decision:
        status = resources.TrainingWorkloadStatus(
            phase=phase,
            volumes=volumes,
            stages=stage_status,
            observed_generation=wl.metadata.generation,
        )
        return Decision(create, phase, message, status)

    def want(obj: dict[str, Any], present: dict[str, dict[str, Any]]) -> None:
        if obj["metadata"]["name"] not in present:
            create.append(obj)

    # ETL writes the dataset.
    want(pvc(wl, names.dataset, "etl", "ReadWriteOnce", dataset.size), seen.pvcs)
    want(etl_job(wl, names), seen.jobs)
    state = job_state(etl)
    if state == "Failed":
        return done("Failed", f"ETL Job {names.etl} failed: see its pods' logs")
    if state != "Succeeded":
        return done("ETL", f"ETL Job {names.etl} writing {dataset.size} to PVC {names.dataset}")
    if names.dataset in seen.attached:
        return done("ETL", f"ETL succeeded; waiting for PVC {names.dataset} to be detached")

    # The dataset, frozen and shared read-only.
    volumes.dataset_snapshot = names.dataset
    want(volume_snapshot(wl, names.dataset, "etl", names.dataset), seen.snapshots)
    if not snapshot_ready(seen.snapshots.get(names.dataset)):
        return done("ETL", f"ETL succeeded; VolumeSnapshot {names.dataset} being taken")
    volumes.dataset_read_only = names.dataset_read_only
    want(
        pvc(wl, names.dataset_read_only, "training", "ReadOnlyMany", dataset.size, names.dataset),
        seen.pvcs,
    )

    # Training: every replica reads the dataset, each writes its own checkpoint.
    want(training_job(wl, names), seen.jobs)
    state = job_state(training)
    replicas = stages.training.replicas
    if state == "Failed":
        return done("Failed", f"training Job {names.training} failed: see its pods' logs")
    if state != "Succeeded":
        return done(
            "Training",
            f"training Job {names.training}: {replicas} replica(s) reading PVC "
            f"{names.dataset_read_only} read-only",
        )
    claim = checkpoint_claim(seen.pods)
    if claim is None:
        return done("Training", "training succeeded; replica 0's pod not found yet")
    if claim in seen.attached or claim not in seen.pvcs:
        return done("Training", f"training succeeded; waiting for PVC {claim} to be detached")

    # The model: replica 0's checkpoint, frozen and shared read-only.
    volumes.checkpoint_snapshot = names.checkpoint
    want(volume_snapshot(wl, names.checkpoint, "training", claim), seen.snapshots)
    if not snapshot_ready(seen.snapshots.get(names.checkpoint)):
        return done(
            "Training", f"training succeeded; VolumeSnapshot {names.checkpoint} being taken"
        )
    volumes.model = names.model
    size = stages.training.checkpoint_size
    want(pvc(wl, names.model, "inference", "ReadOnlyMany", size, names.checkpoint), seen.pvcs)

    if stages.inference is None:
        return done("Succeeded", f"model ready in PVC {names.model}")
    deployment = seen.deployments.get(names.inference)
    want(inference_deployment(wl, names, stages.inference), seen.deployments)
    begun = (deployment or {}).get("metadata", {}).get("creationTimestamp")
    if not deployment_available(deployment):
        stage_status.inference = resources.StageStatus("Running" if begun else "Pending", begun)
        return done(
            "Inference", f"Deployment {names.inference} starting, serving PVC {names.model}"
        )
    previous = wl.status.stages.inference if wl.status and wl.status.stages else None
    available_at = (previous.completion_time if previous else None) or now
    stage_status.inference = resources.StageStatus("Available", begun, available_at)
    return done(
        "Succeeded",
        f"Deployment {names.inference} serving the model from PVC {names.model}",
    )


def conditions(decision: Decision, previous: list[dict[str, Any]], now: str) -> list[Condition]:
    """Ready (the model is served or the pipeline is done), Failed and Progressing, with
    lastTransitionTime kept while the status stays."""
    phase = decision.phase
    out = [
        Condition("Ready", "True" if phase == "Succeeded" else "False", phase, decision.message),
        Condition("Failed", "True" if phase == "Failed" else "False", phase, decision.message),
        Condition(
            "Progressing",
            "False" if phase in ("Succeeded", "Failed") else "True",
            phase,
            decision.message,
        ),
    ]
    return carry_transition_times(out, previous, now)
