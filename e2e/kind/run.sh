#!/usr/bin/env bash
# FlashMesh end to end on a kind cluster: create the cluster, build and load the image,
# give each storage worker a loop-device "drive", install the snapshot CRDs and
# controller and the chart, apply a StoragePool and a small TrainingWorkload, and wait
# until it Succeeded.
#
# For machines with a Docker engine. The project's development machine has none, so this
# script has NEVER RUN THERE; the lab (QEMU VMs, `make test`) is what is tested.
#
# Needs: docker, kind, kubectl, helm, root (loop devices), and a host kernel with nvmet,
# nvmet-tcp and nvme-tcp (kind workers share it).
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-flashmesh-e2e}
IMAGE=flashmesh:e2e
SNAPSHOTTER=${SNAPSHOTTER:-v8.2.0}
say() { printf '[kind-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { say "$tool not found: install it first"; exit 1; }
done
modprobe -a nvmet nvmet-tcp nvme-tcp

say "creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml --wait 5m
say "building $IMAGE and loading it into the nodes"
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "a 2 GiB loop-device drive on each storage worker"
drives=()
for node in $(kubectl get nodes -l flashmesh.dev/storage=true -o name | cut -d/ -f2); do
  dev=$(docker exec "$node" sh -c \
    'truncate -s 2G /var/lib/flashmesh-drive.img && losetup -f --show /var/lib/flashmesh-drive.img')
  drives+=("$dev")
done

say "VolumeSnapshot CRDs and snapshot-controller ($SNAPSHOTTER)"
kubectl apply -k "github.com/kubernetes-csi/external-snapshotter/client/config/crd?ref=$SNAPSHOTTER"
kubectl apply -k "github.com/kubernetes-csi/external-snapshotter/deploy/kubernetes/snapshot-controller?ref=$SNAPSHOTTER"

say "installing the chart"
kubectl create namespace flashmesh-system
kubectl label namespace flashmesh-system pod-security.kubernetes.io/enforce=privileged
helm install flashmesh charts/flashmesh -n flashmesh-system --wait --timeout 10m \
  --set image.repository=flashmesh --set image.tag=e2e --set image.pullPolicy=Never

say "a StoragePool over the loop drives (${drives[*]})"
patterns=$(printf '"%s",' "${drives[@]}")
kubectl apply -f - <<POOL
apiVersion: flashmesh.dev/v1alpha1
kind: StoragePool
metadata: {name: kind}
spec:
  nodeSelector: {matchLabels: {flashmesh.dev/storage: "true"}}
  drives: {pathPatterns: [${patterns%,}], minSize: 1Gi}
  transports: [tcp]
  layout: {stripeWidth: 2, replicas: 1}
POOL
kubectl wait storagepool/kind --for=jsonpath='{.status.phase}'=Ready --timeout=5m

say "the smoke TrainingWorkload"
kubectl apply -f e2e/kind/smoke-workload.yaml
if ! kubectl wait trainingworkload/smoke --for=jsonpath='{.status.phase}'=Succeeded --timeout=20m; then
  kubectl get trainingworkload smoke -o yaml
  kubectl get pods,pvc,volumesnapshots -A
  exit 1
fi
kubectl get trainingworkload smoke
say "passed; delete the cluster with: kind delete cluster --name $CLUSTER"
