"""A STAND-IN FOR THE KUBELET, for the lab only: the lab's GPU VMs run no kubelet, so this
does the part of a kubelet's work that FlashMesh's volumes need, and nothing else.

For every pod bound to a lab VM's node it waits for each volume's VolumeAttachment, calls
NodeStageVolume and NodePublishVolume on that VM's node plugin as the kubelet would, keeps
the node's status.volumesInUse, runs the pod's command (its first container's command
and args, with the VM's own userland: images are not pulled) as a process inside the VM
with each volume bind-mounted at its mount path, and when the command ends unpublishes,
unstages and marks the pod with its exit code, which a lab KWOK stage turns into
Succeeded or Failed. A pod deleted while its command runs has the command killed and its
volumes unmounted. KWOK keeps the node's heartbeat and reports the pods Running."""

from __future__ import annotations

import hashlib
import logging
import shlex
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc

from flashmesh.core import resources
from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc
from flashmesh.kube import Kube, KubeError
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab, LabError, VmDied, host_nqn

EXIT_ANNOTATION = "lab.flashmesh.dev/exit-code"
NODE_LABEL = "lab.flashmesh.dev/vm"  # on the VM nodes, for pods that want a real data path
NODE_PORT = 10000  # the node plugin's TCP endpoint in each VM
TOPOLOGY_KEY = "topology.flashmesh.dev/fabric"
Mode = csi_pb2.VolumeCapability.AccessMode
log = logging.getLogger(__name__)


@dataclass
class Mounted:
    name: str  # the pod's volume name
    handle: str  # the CSI volume id
    pv: str
    staging: str
    target: str
    mount_path: str
    readonly: bool


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    node: str
    stop: threading.Event = field(default_factory=threading.Event)
    handles: set[str] = field(default_factory=set)  # volumes it has staged or uses


def volume_id_in_use(handle: str) -> str:
    """How the kubelet names a CSI volume in node.status.volumesInUse."""
    return f"kubernetes.io/csi/{resources.CSI_DRIVER}^{handle}"


def claim_of(pod: dict[str, Any], volume: dict[str, Any]) -> str | None:
    if volume.get("persistentVolumeClaim"):
        return str(volume["persistentVolumeClaim"]["claimName"])
    if volume.get("ephemeral"):  # a generic ephemeral volume's PVC is <pod>-<volume>
        return f"{pod['metadata']['name']}-{volume['name']}"
    return None


def access_mode(pv: dict[str, Any]) -> Any:
    """The CSI access mode the kubelet derives from the PV's access modes."""
    modes = pv["spec"].get("accessModes") or []
    if "ReadOnlyMany" in modes:
        return Mode.MULTI_NODE_READER_ONLY
    if "ReadWriteMany" in modes:
        return Mode.MULTI_NODE_MULTI_WRITER
    return Mode.SINGLE_NODE_WRITER


def pod_script(pod: dict[str, Any], mounts: list[Mounted], log_path: str, pid_path: str) -> str:
    """The pod's command in its own mount namespace, each volume at its mount path; its
    process id in pid_path (the command keeps it: every step execs)."""
    container = pod["spec"]["containers"][0]
    argv = [*container.get("command", []), *container.get("args", [])]
    env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
    index = (pod["metadata"].get("annotations") or {}).get(
        "batch.kubernetes.io/job-completion-index"
    )
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = index
    binds = [
        f"mkdir -p {m.mount_path} && mount --bind {m.target} {m.mount_path}"
        + (f" && mount -o remount,bind,ro {m.mount_path}" if m.readonly else "")
        for m in mounts
    ]
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    inner = " && ".join([*binds, f"cd / && exec env {exports} {shlex.join(argv)}"])
    return (
        f"echo $$ > {pid_path}\n"
        f"exec unshare -m --propagation private sh -c {shlex.quote(inner)} > {log_path} 2>&1"
    )


# Every process in the pod's mount namespace (the command and whatever it started).
KILL_POD = """ns=$(readlink /proc/$(cat {pid})/ns/mnt) || exit 0
for p in /proc/[0-9]*; do
  [ "$(readlink $p/ns/mnt 2>/dev/null)" = "$ns" ] && kill -9 "${{p#/proc/}}" 2>/dev/null
done
true"""


@dataclass
class StandInKubelet:
    cluster: LocalCluster
    lab: Lab
    nodes: list[str]  # lab VMs, each a node of the same name
    poll: float = 0.5
    _runs: dict[str, PodRun] = field(default_factory=dict)
    _in_use: dict[str, set[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def kube(self) -> Kube:
        return self.cluster.kube

    # --- nodes ----------------------------------------------------------------------

    def register(self, gpus: int = 1) -> None:
        """Each VM's Node (KWOK keeps it Ready) and CSINode (node id: the VM's host NQN);
        the Node advertises `gpus` nvidia.com/gpu, which the VM does not have (the lab has
        no GPUs), so GPU-requesting pods can be placed on it."""
        labels = {TOPOLOGY_KEY: "default", NODE_LABEL: "true"}
        for vm in self.nodes:
            self._in_use[vm] = set()
            if self.kube.get("v1", "Node", vm) is None:
                # A CSINode left without its Node is made again, owned by the new Node.
                self.kube.delete("storage.k8s.io/v1", "CSINode", vm)
                driver = {"name": resources.CSI_DRIVER, "nodeID": host_nqn(vm),
                          "topologyKeys": [TOPOLOGY_KEY]}  # fmt: skip
                self.cluster.add_fake_node(vm, labels=labels, gpus=gpus, csi_drivers=[driver])
                continue
            # A node made earlier (by hand, or a previous run): made the stand-in's.
            self.kube.patch("v1", "Node", vm, {"metadata": {"labels": labels}})
            extra = {"nvidia.com/gpu": str(gpus)}
            self.kube.patch("v1", "Node", vm, {"status": {"capacity": extra,
                                                          "allocatable": extra}},
                            subresource="status")  # fmt: skip

    def _volumes_in_use(self, node: str, handle: str, add: bool) -> None:
        with self._lock:
            now = self._in_use.setdefault(node, set())
            (now.add if add else now.discard)(handle)
            body = {"status": {"volumesInUse": sorted(volume_id_in_use(h) for h in now)}}
        self.kube.patch("v1", "Node", node, body, subresource="status")

    # --- the loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except KubeError as exc:
                log.warning("stand-in kubelet: %s", exc)
            stop.wait(self.poll)
        # Every running pod's command killed and its volumes unmounted before returning,
        # so the VMs can go down cleanly after.
        for run in self._runs.values():
            run.stop.set()
        for thread in self._threads:
            thread.join(120)

    def step(self) -> None:
        pods = [p for p in self.kube.list("v1", "Pod") if p["spec"].get("nodeName") in self.nodes]
        present = {p["metadata"]["uid"]: p for p in pods}
        for uid, run in list(self._runs.items()):
            pod = present.get(uid)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                run.stop.set()  # gone: its command is killed and its volumes unmounted
        for uid, pod in present.items():
            meta = pod["metadata"]
            finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            if uid in self._runs or finished or meta.get("deletionTimestamp"):
                continue
            if EXIT_ANNOTATION in (meta.get("annotations") or {}):
                continue
            run = PodRun(meta["namespace"], meta["name"], uid, pod["spec"]["nodeName"])
            self._runs[uid] = run
            thread = threading.Thread(target=self._pod, args=(pod, run), daemon=True)
            self._threads.append(thread)
            thread.start()

    # --- one pod ----------------------------------------------------------------------

    def _pod(self, pod: dict[str, Any], run: PodRun) -> None:
        mounts: list[Mounted] = []
        stub = csi_pb2_grpc.NodeStub(
            grpc.insecure_channel(f"{self.lab.spec(run.node).address(0)}:{NODE_PORT}")
        )
        code = "1"
        try:
            for volume in pod["spec"].get("volumes") or []:
                claim = claim_of(pod, volume)
                if claim is None:
                    continue
                mounted = self._mount(stub, pod, run, volume, claim)
                if mounted is None:
                    return  # the pod went away while waiting
                mounts.append(mounted)
                run.handles.add(mounted.handle)
            code = str(self._command(pod, run, mounts))
        except Exception:
            log.exception("stand-in kubelet: pod %s/%s", run.namespace, run.name)
        finally:
            for m in reversed(mounts):
                self._unmount(stub, run, m)
        if run.stop.is_set():
            return
        patch = {"metadata": {"annotations": {EXIT_ANNOTATION: code}}}
        try:
            self.kube.patch("v1", "Pod", run.name, patch, namespace=run.namespace)
        except KubeError as exc:
            log.warning("stand-in kubelet: marking %s: %s", run.name, exc)

    def _wait(self, run: PodRun, condition: Any, timeout: float = 600) -> bool:
        return processes.wait_until(lambda: run.stop.is_set() or condition(), timeout, 0.5) and (
            not run.stop.is_set()
        )

    def _bound_pv(self, namespace: str, claim: str) -> dict[str, Any] | None:
        found = self.kube.get("v1", "PersistentVolumeClaim", claim, namespace) or {}
        if (found.get("status") or {}).get("phase") != "Bound":
            return None
        return self.kube.get("v1", "PersistentVolume", found["spec"]["volumeName"])

    def _attachment(self, pv: str, node: str) -> dict[str, Any] | None:
        for va in self.kube.list("storage.k8s.io/v1", "VolumeAttachment"):
            spec = va["spec"]
            ours = spec["source"].get("persistentVolumeName") == pv and spec["nodeName"] == node
            if ours and (va.get("status") or {}).get("attached"):
                return va
        return None

    def _mount(
        self, stub: Any, pod: dict[str, Any], run: PodRun, volume: dict[str, Any], claim: str
    ) -> Mounted | None:
        found: dict[str, Any] = {}

        def bound() -> bool:
            found["pv"] = self._bound_pv(run.namespace, claim)
            return found["pv"] is not None

        if not self._wait(run, bound):
            return None
        pv = found["pv"]
        pv_name = pv["metadata"]["name"]

        def attached() -> bool:
            found["va"] = self._attachment(pv_name, run.node)
            return found["va"] is not None

        if not self._wait(run, attached):
            return None
        csi = pv["spec"]["csi"]
        handle = csi["volumeHandle"]
        readonly = bool((volume.get("persistentVolumeClaim") or {}).get("readOnly"))
        mount_path = next(
            m["mountPath"]
            for m in pod["spec"]["containers"][0].get("volumeMounts") or []
            if m["name"] == volume["name"]
        )
        readonly = readonly or any(
            m.get("readOnly")
            for m in pod["spec"]["containers"][0].get("volumeMounts") or []
            if m["name"] == volume["name"]
        )
        digest = hashlib.sha256(pv_name.encode()).hexdigest()[:16]
        mounted = Mounted(
            volume["name"], handle, pv_name,
            f"/var/lib/kubelet/plugins/kubernetes.io/csi/{resources.CSI_DRIVER}/{digest}/globalmount",
            f"/var/lib/kubelet/pods/{run.uid}/volumes/kubernetes.io~csi/{pv_name}/mount",
            mount_path, readonly,
        )  # fmt: skip
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type=csi.get("fsType") or ""),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=access_mode(pv)),
        )
        context = dict(csi.get("volumeAttributes") or {})
        publish = dict(found["va"]["status"].get("attachmentMetadata") or {})
        self._volumes_in_use(run.node, handle, add=True)
        stub.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=handle, publish_context=publish, volume_context=context,
                staging_target_path=mounted.staging, volume_capability=cap,
            ),
            timeout=600,
        )  # fmt: skip
        stub.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=handle, publish_context=publish, volume_context=context,
                staging_target_path=mounted.staging, target_path=mounted.target,
                volume_capability=cap, readonly=readonly,
            ),
            timeout=120,
        )  # fmt: skip
        return mounted

    def _unmount(self, stub: Any, run: PodRun, m: Mounted) -> None:
        try:
            stub.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=m.handle, target_path=m.target),
                timeout=120,
            )
            # Staged once per node: unstaged when no other pod of the node still uses it.
            if not self._still_used(run, m.handle):
                stub.NodeUnstageVolume(
                    csi_pb2.NodeUnstageVolumeRequest(
                        volume_id=m.handle, staging_target_path=m.staging
                    ),
                    timeout=300,
                )
                self._volumes_in_use(run.node, m.handle, add=False)
        except grpc.RpcError as exc:
            log.warning("stand-in kubelet: unmounting %s: %s", m.handle, exc)

    def _still_used(self, run: PodRun, handle: str) -> bool:
        return any(
            other.uid != run.uid and other.node == run.node and not other.stop.is_set()
            and handle in other.handles
            for other in self._runs.values()
        )  # fmt: skip

    def _command(self, pod: dict[str, Any], run: PodRun, mounts: list[Mounted]) -> int:
        """Runs the pod's command in its VM; its exit code (137 when the pod was deleted)."""
        base = f"{run.namespace}_{run.name}"
        (self.lab.workdir / "pods").mkdir(exist_ok=True)
        pid = f"/run/flashmesh-pod-{run.uid}.pid"
        job = self.lab.spawn(run.node, pod_script(pod, mounts, f"/lab/pods/{base}.log", pid))
        while True:
            try:
                return self.lab.wait(run.node, job, timeout=self.poll * 4).rc
            except LabError as exc:
                if isinstance(exc, VmDied):
                    raise
            if run.stop.is_set():
                self.lab.exec(run.node, KILL_POD.format(pid=pid), check=False)
                self.lab.wait(run.node, job, timeout=60)
                return 137


def log_of(lab: Lab, namespace: str, pod: str) -> str:
    path = lab.workdir / "pods" / f"{namespace}_{pod}.log"
    return path.read_text(errors="replace") if path.exists() else ""
