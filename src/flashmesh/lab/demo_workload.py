"""The demo's TrainingWorkload, whose commands prove the data path: ETL writes a random
dataset and its checksum, each training replica checks the checksum on its read-only
copy (and that it cannot write there) and writes a checkpoint naming itself, inference
checks the model is replica 0's. The lab's kubelet stand-in runs these commands in the
GPU VMs, on volumes connected over NVMe/TCP; `verify` reads their logs back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flashmesh.core import resources
from flashmesh.lab.kubelet import NODE_LABEL, log_of
from flashmesh.lab.vm import Lab

DATASET_MIB = 16
ANYWHERE = [{"operator": "Exists"}]  # the lab's nodes are KWOK's, which taints them

ETL = f"""set -e
dd if=/dev/urandom of=/data/dataset bs=1M count={DATASET_MIB} status=none
sha256sum /data/dataset | cut -d' ' -f1 > /data/dataset.sha256
sync
echo "ETL on $(hostname): wrote {DATASET_MIB} MiB, sha256 $(cat /data/dataset.sha256)"
"""
TRAIN = """set -e
want=$(cat /data/dataset.sha256)
got=$(sha256sum /data/dataset | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "replica $JOB_COMPLETION_INDEX: checksum MISMATCH"; exit 1; }
if touch /data/written-by-training 2>/dev/null; then echo "dataset is writable!"; exit 1; fi
echo "replica-$JOB_COMPLETION_INDEX trained on $want" > /checkpoint/model
sync
echo "training replica $JOB_COMPLETION_INDEX on $(hostname): read the dataset read-only, sha256 OK"
"""
SERVE = """set -e
grep -q '^replica-0 ' /model/model
echo "inference on $(hostname): serving $(cat /model/model)"
exec sleep 100000
"""


def stage(script: str, **extra: Any) -> dict[str, Any]:
    return {
        "image": "debian:bookworm-slim",  # not pulled in the lab: the VM's userland runs it
        "command": ["bash", "-c", script],
        "nodeSelector": {NODE_LABEL: "true"},
        "tolerations": ANYWHERE,
        **extra,
    }


def workload(name: str, namespace: str, pool: str) -> dict[str, Any]:
    return {
        "apiVersion": resources.API_VERSION,
        "kind": "TrainingWorkload",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "dataset": {"size": "64Mi", "pool": pool},
            "stages": {
                "etl": stage(ETL),
                # One GPU each and one per VM node: the two replicas land on two VMs.
                "training": stage(TRAIN, replicas=2, gpusPerReplica=1, checkpointSize="32Mi"),
                "inference": stage(SERVE),
            },
        },
    }


@dataclass
class Verified:
    lines: list[str]  # what each pod said, in pipeline order
    problems: list[str]


def verify(lab: Lab, namespace: str, pods: list[dict[str, Any]]) -> Verified:
    """The pods' own words: ETL wrote, both replicas read it back intact, inference serves
    replica 0's checkpoint."""
    by_stage: dict[str, list[str]] = {"etl": [], "training": [], "inference": []}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        stage_name = (pod["metadata"].get("labels") or {}).get("flashmesh.dev/stage", "")
        text = log_of(lab, namespace, pod["metadata"]["name"]).strip()
        if stage_name in by_stage and text:
            by_stage[stage_name].append(text.splitlines()[-1])
    problems = []
    if not any("ETL on" in line for line in by_stage["etl"]):
        problems.append(f"no ETL pod wrote the dataset: {by_stage['etl']}")
    good = [line for line in by_stage["training"] if "sha256 OK" in line]
    if len(good) != 2:
        problems.append(f"not both replicas read the dataset intact: {by_stage['training']}")
    if not any("serving replica-0" in line for line in by_stage["inference"]):
        problems.append(f"inference does not serve replica 0's model: {by_stage['inference']}")
    lines = [*by_stage["etl"], *by_stage["training"], *by_stage["inference"]]
    return Verified(lines, problems)
