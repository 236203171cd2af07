"""A real Kubernetes control plane as local processes: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and KWOK (simulated nodes and pods), all built
from their Go modules. Ports and the data folder are chosen per run, so two runs never
collide; every server binds to the addresses given (loopback by default).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from flashmesh.kube import Kube
from flashmesh.lab import processes
from flashmesh.lab.binaries import Binaries, ensure
from flashmesh.lab.pki import make_pki
from flashmesh.lab.progress import say

# The order servers start in; they stop in the reverse order.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
PORTS = ("etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
STATE_FILE = "state.json"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# kube-controller-manager's attach/detach controller only handles nodes that carry this
# (a kubelet sets it; KWOK nodes have no kubelet).
ATTACH_DETACH_ANNOTATION = "volumes.kubernetes.io/controller-managed-attach-detach"
LAB_STAGES = Path(__file__).parent / "kwok" / "pod-finish.yaml"
KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)


class ClusterError(RuntimeError):
    pass


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def port_is_listening(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((address, port)) == 0


@dataclass
class ClusterState:
    """What a running cluster is made of; saved in its folder for `lab cluster down`."""

    workdir: str
    address: str
    extra_addresses: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    executables: dict[str, str] = field(default_factory=dict)
    bind_all: bool = False
    stand_in_nodes: list[str] = field(default_factory=list)


class LocalCluster:
    def __init__(
        self,
        workdir: Path,
        address: str = "127.0.0.1",
        extra_addresses: list[str] | None = None,
        die_with_parent: bool = True,
        bind_all: bool = False,
        stand_in_nodes: list[str] | None = None,
    ) -> None:
        """extra_addresses are more addresses the apiserver's certificate is valid for.
        bind_all makes the apiserver listen on every address: only inside the lab's own
        network namespace, where VMs reach it on the bridge addresses. stand_in_nodes are
        the lab VMs' nodes, whose pods the kubelet stand-in runs and finishes."""
        self.workdir = workdir.resolve()
        self.state = ClusterState(
            str(self.workdir), address, list(extra_addresses or []), bind_all=bind_all,
            stand_in_nodes=list(stand_in_nodes or []),
        )  # fmt: skip
        self.die_with_parent = die_with_parent
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._kube: Kube | None = None
        self._bins: Binaries | None = None

    # --- paths and clients --------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.state.address}:{self.state.ports['apiserver']}"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def binaries(self) -> Binaries:
        if self._bins is None:
            self._bins = ensure()
        return self._bins

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube.from_kubeconfig(self.kubeconfig)
        return self._kube

    def log(self, component: str) -> Path:
        return self.workdir / "logs" / f"{component}.log"

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl against this cluster; output captured as text."""
        result = subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    # --- saved state --------------------------------------------------------------------

    def save(self) -> None:
        (self.workdir / STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2))

    @classmethod
    def load(cls, workdir: Path) -> LocalCluster:
        data = json.loads((workdir / STATE_FILE).read_text())
        cluster = cls(workdir, data["address"], data["extra_addresses"], die_with_parent=False)
        cluster.state = ClusterState(**data)
        return cluster

    def running(self) -> dict[str, bool]:
        """For each component: is the process we started still alive?"""
        return {
            name: processes.is_ours(pid, self.state.executables[name])
            for name, pid in self.state.pids.items()
        }

    # --- start and stop -----------------------------------------------------------------

    def start(self) -> None:
        """Starts every server and returns once the cluster can run pods; on any failure
        stops what it started."""
        if self.workdir.exists() and (self.workdir / STATE_FILE).exists():
            raise ClusterError(
                f"{self.workdir} holds a running cluster: stop it with flashmesh lab cluster down"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        bins = self.binaries
        try:
            addr = self.state.address
            self.state.ports = {name: free_port(addr) for name in PORTS}
            say("generating certificates")
            make_pki(self.pki, [addr, *self.state.extra_addresses])
            self._write_kubeconfig()
            self._start_etcd(bins)
            self._start_apiserver(bins)
            self._start_controllers(bins)
            self._start_kwok(bins)
            say("waiting for the default service account (kube-controller-manager)")
            self._wait(
                lambda: self.kube.get("v1", "ServiceAccount", "default", "default") is not None,
                120,
                "the default service account",
                "kube-controller-manager",
            )
            say(f"control plane ready at {self.server}; kubeconfig {self.kubeconfig}")
        except BaseException:
            self.stop()
            raise

    def stop(self, remove: bool = True) -> None:
        """Stops every server we started (reverse order) and removes the data folder."""
        if self._kube is not None:
            self._kube.close()
            self._kube = None
        for name in reversed(COMPONENTS):
            pid = self.state.pids.get(name)
            if pid is not None:
                processes.stop(pid, self.state.executables[name])
                proc = self._procs.pop(name, None)
                if proc is not None:
                    proc.poll()
        self.state.pids.clear()
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir.exists():
            self.save()

    def request_counts(self) -> Counter[tuple[str, str, str]]:
        """The API server's own count of the requests it served, from its /metrics
        (apiserver_request_total summed over codes and scopes), by (verb, resource,
        subresource): what tests and benchmarks count a component's requests with."""
        text = self.kubectl("get", "--raw", "/metrics").stdout
        found: Counter[tuple[str, str, str]] = Counter()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "apiserver_request_total":
                    key = (s.labels["verb"], s.labels["resource"], s.labels.get("subresource", ""))
                    found[key] += int(s.value)
        return found

    def restart_apiserver(self) -> None:
        """Stops kube-apiserver and starts it again with the same arguments (etcd keeps
        every object), for tests of clients that must survive it; returns once /readyz."""
        name = "kube-apiserver"
        argv = [str(a) for a in self._procs[name].args]  # type: ignore[union-attr]
        processes.stop(self.state.pids[name], self.state.executables[name])
        self._procs.pop(name).poll()
        self._spawn(name, argv)
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        self._wait(lambda: _http_get(f"{self.server}/readyz", ctx) == b"ok", 180, "/readyz", name)

    def _spawn(self, name: str, argv: list[str]) -> None:
        proc = processes.spawn(argv, self.log(name), self.die_with_parent)
        self._procs[name] = proc
        self.state.pids[name] = proc.pid
        self.state.executables[name] = str(Path(argv[0]).resolve())
        self.save()

    def _wait(self, condition: Any, timeout: float, what: str, component: str) -> None:
        def check() -> bool:
            proc = self._procs.get(component)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(
                    f"{component} exited with {proc.returncode}:\n{self._tail(component)}"
                )
            try:
                return bool(condition())
            except Exception:
                return False

        if not processes.wait_until(check, timeout, interval=0.25):
            raise ClusterError(
                f"timed out after {timeout:.0f} s waiting for {what}:\n{self._tail(component)}"
            )

    def _tail(self, component: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log(component).read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def portable_kubeconfig(self, address: str) -> str:
        """A kubeconfig with its certificates inlined, for the apiserver at another of its
        addresses (a VM on the lab's bridge reaches it at the bridge address)."""

        def b64(name: str) -> str:
            return base64.b64encode((self.pki / name).read_bytes()).decode()

        cfg = yaml.safe_load(self.kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        cluster["server"] = f"https://{address}:{self.state.ports['apiserver']}"
        cluster["certificate-authority-data"] = b64("ca.crt")
        del cluster["certificate-authority"]
        user = cfg["users"][0]["user"]
        user["client-certificate-data"] = b64("admin.crt")
        user["client-key-data"] = b64("admin.key")
        del user["client-certificate"], user["client-key"]
        return str(yaml.safe_dump(cfg, sort_keys=False))

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "flashmesh-lab",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(self.pki / "admin.crt"),
                        "client-key": str(self.pki / "admin.key"),
                    },
                }
            ],
            "contexts": [
                {"name": "flashmesh-lab", "context": {"cluster": "flashmesh-lab", "user": "admin"}}
            ],
            "current-context": "flashmesh-lab",
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def _start_etcd(self, bins: Binaries) -> None:
        a, p = self.state.address, self.state.ports
        client_url = f"http://{a}:{p['etcd-client']}"
        peer_url = f"http://{a}:{p['etcd-peer']}"
        say("starting etcd")
        self._spawn(
            "etcd",
            [
                str(bins.etcd),
                "--name=lab",
                f"--data-dir={self.workdir / 'etcd'}",
                "--unsafe-no-fsync",
                "--log-level=warn",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=lab={peer_url}",
            ],
        )
        self._wait(lambda: b'"true"' in _http_get(f"{client_url}/health"), 60, "etcd", "etcd")

    def _start_apiserver(self, bins: Binaries) -> None:
        a, p, pki = self.state.address, self.state.ports, self.pki
        bind = "0.0.0.0" if self.state.bind_all else a
        say("starting kube-apiserver")
        self._spawn(
            "kube-apiserver",
            [
                str(bins.kube_apiserver),
                f"--etcd-servers=http://{a}:{p['etcd-client']}",
                f"--bind-address={bind}",
                f"--secure-port={p['apiserver']}",
                # No default route here: the apiserver must be told its address, and a loopback
                # address must not be written into the kubernetes Endpoints.
                f"--advertise-address={a}",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--cert-dir={self.workdir / 'apiserver'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
            ],
        )
        say("waiting for kube-apiserver /readyz")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._wait(
            lambda: _http_get(f"{self.server}/readyz", ctx) == b"ok",
            180,
            "kube-apiserver /readyz",
            "kube-apiserver",
        )

    def _start_controllers(self, bins: Binaries) -> None:
        a, p, pki = self.state.address, self.state.ports, self.pki
        say("starting kube-controller-manager and kube-scheduler")
        self._spawn(
            "kube-controller-manager",
            [
                str(bins.kube_controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                f"--bind-address={a}",
                f"--secure-port={p['controller-manager']}",
                f"--cert-dir={self.workdir / 'controller-manager'}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bins.kube_scheduler),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                f"--bind-address={a}",
                f"--secure-port={p['scheduler']}",
                f"--cert-dir={self.workdir / 'scheduler'}",
            ],
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # health endpoints of self-signed local servers
        self._wait(
            lambda: _http_get(f"https://{a}:{p['scheduler']}/healthz", insecure) == b"ok",
            120,
            "kube-scheduler /healthz",
            "kube-scheduler",
        )

    def _stages(self, bins: Binaries) -> str:
        """Upstream's fast stages, except that KWOK completes no Job pod on a node of the
        lab's kubelet stand-in: those finish when the stand-in marks them (lab stages)."""
        docs = [yaml.safe_load((bins.kwok_stages / s).read_text()) for s in KWOK_STAGES]
        if self.state.stand_in_nodes:
            for doc in docs:
                if doc["metadata"]["name"] == "pod-complete":
                    doc["spec"]["selector"]["matchExpressions"].append(
                        {"key": ".spec.nodeName", "operator": "NotIn",
                         "values": list(self.state.stand_in_nodes)}
                    )  # fmt: skip
        docs += list(yaml.safe_load_all(LAB_STAGES.read_text()))
        return yaml.safe_dump_all(docs)

    def _start_kwok(self, bins: Binaries) -> None:
        a, p = self.state.address, self.state.ports
        config = self.workdir / "kwok-stages.yaml"
        config.write_text(self._stages(bins))
        say("starting kwok")
        self._spawn(
            "kwok",
            [
                str(bins.kwok),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={config}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--node-ip={a}",
                f"--node-port={p['kwok']}",
                f"--server-address={a}:{p['kwok']}",
                "--cidr=10.244.0.0/16",
                "--node-lease-duration-seconds=40",
            ],
        )
        self._wait(lambda: port_is_listening(a, p["kwok"]), 60, "kwok", "kwok")

    # --- simulated nodes ----------------------------------------------------------------

    def add_fake_node(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        zone: str | None = None,
        gpus: int = 0,
        csi_drivers: list[dict[str, Any]] | None = None,
        wait_ready: bool = True,
    ) -> dict[str, Any]:
        """A KWOK node, its CSINode (no kubelet exists to write one) and, optionally, Ready.

        csi_drivers are CSINode driver entries: {name, nodeID, topologyKeys}.
        """
        all_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "type": "kwok",
            **(labels or {}),
        }
        if zone:
            all_labels["topology.kubernetes.io/zone"] = zone
        resources = {"cpu": "32", "memory": "256Gi", "pods": "110"}
        if gpus:
            resources["nvidia.com/gpu"] = str(gpus)
        node = self.kube.create(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": all_labels,
                    "annotations": {KWOK_ANNOTATION: "fake", ATTACH_DETACH_ANNOTATION: "true"},
                },
                "status": {"capacity": resources, "allocatable": resources},
            }
        )
        csi_node: dict[str, Any] = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "CSINode",
            "metadata": {
                "name": name,
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "name": name,
                        "uid": node["metadata"]["uid"],
                    }
                ],
            },
            "spec": {"drivers": csi_drivers or []},
        }
        # A CSINode may be there before its Node (a node plugin started by hand writes one,
        # as a kubelet would): the new Node's own takes its place. Its driver entries are
        # immutable, so the old one goes first (a CSINode has no finalizer).
        if self.kube.get("storage.k8s.io/v1", "CSINode", name) is not None:
            self.kube.delete("storage.k8s.io/v1", "CSINode", name)
        self.kube.create(csi_node)
        if wait_ready:
            self._wait(
                lambda: node_is_ready(self.kube.get("v1", "Node", name)),
                60,
                f"node {name} to be Ready",
                "kwok",
            )
        return node


def node_is_ready(node: dict[str, Any] | None) -> bool:
    conditions = (node or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _http_get(url: str, context: ssl.SSLContext | None = None) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return bytes(response.read())
    except OSError:
        return b""
