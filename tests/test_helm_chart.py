"""The Helm chart charts/flashmesh: linted and rendered by helm; installed into the real
kube-apiserver with every object accepted and every pod admitted; each component's service
account holding exactly the permissions its least-privilege table says; uninstalled without
a trace (the CRDs stay); upgraded, CRDs and all."""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kopf
import pytest
import yaml
from kopf.testing import KopfRunner

from flashmesh import cli
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.crds import CRDS
from flashmesh.lab.helm import CHART, Helm
from flashmesh.lab.sidecars import csi_driver_object
from flashmesh.operator import main as operator_main

pytestmark = pytest.mark.cluster

RELEASE = "flashmesh"
NS = "flashmesh-system"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
COMPONENTS = ("operator", "csi-controller", "csi-node", "agent")
PRIVILEGED = {"csi-node": "flashmesh", "agent": "agent"}  # component -> its main container
SIDECARS = "registry.k8s.io/sig-storage"
CRD_NAMES = {
    f"{plural}.flashmesh.dev"
    for plural in ("storagepools", "storagenodes", "volumes", "snapshots", "trainingworkloads")
}
CRD = ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
KEEP = {"helm.sh/resource-policy": "keep"}

# --- rendering ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> list[dict[str, Any]]:
    return helm.template(RELEASE, NS)


def kinds(objs: list[dict[str, Any]]) -> Counter[str]:
    return Counter(o["kind"] for o in objs)


def workload(objs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    [found] = [
        o
        for o in objs
        if o["kind"] in ("Deployment", "DaemonSet")
        and o["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return found


def pod_spec(objs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    spec: dict[str, Any] = workload(objs, component)["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in spec["containers"] if c["name"] == name]
    return found


DEFAULT_KINDS = {
    "ServiceAccount": 4,
    "ClusterRole": 4,  # the node plugin's: Volumes read, their status patched
    "ClusterRoleBinding": 4,
    "Role": 3,  # none for the node plugin: it reads no Secret
    "RoleBinding": 3,
    "Deployment": 2,  # operator, CSI controller
    "DaemonSet": 2,  # node plugin, agent
    "CSIDriver": 1,
    # Deleting a StoragePool that holds volumes is refused; so is deleting a Volume that a
    # host has published, or that a PersistentVolume names.
    "ValidatingAdmissionPolicy": 3,
    "ValidatingAdmissionPolicyBinding": 3,
    # Templates, not crds/: helm upgrade upgrades them (crds.install=false leaves them out).
    "CustomResourceDefinition": 5,
    "PodDisruptionBudget": 2,  # operator, CSI controller
}


def test_chart_crds_are_the_repository_crds() -> None:
    """The chart's CRD files: byte for byte the CRDs the rest of the project tests."""
    ours = {p.name: p.read_bytes() for p in sorted(CRDS.glob("*.yaml"))}
    files = CHART / "files" / "crds"
    chart = {p.name: p.read_bytes() for p in sorted(files.glob("*.yaml"))}
    assert len(ours) == 5
    assert chart.keys() == ours.keys()
    drifted = [name for name in ours if chart[name] != ours[name]]
    assert not drifted, f"{files} differs from crds/ in {drifted}: copy them again"


def test_crds_are_templates_kept_on_uninstall(helm: Helm, rendered: list[dict[str, Any]]) -> None:
    """Helm installs a chart's crds/ folder once and never upgrades it: the CRDs are
    templates instead, each the repository's file plus the chart's labels and the keep
    policy (so no uninstall or upgrade deletes them, and every FlashMesh object with them)."""
    assert not (CHART / "crds").exists()
    crds = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "CustomResourceDefinition"}
    assert crds.keys() == CRD_NAMES
    for path in CRDS.glob("*.yaml"):
        ours = yaml.safe_load(path.read_text())
        chart = copy.deepcopy(crds[ours["metadata"]["name"]])
        meta = chart["metadata"]
        assert meta.pop("annotations") == KEEP
        assert meta.pop("labels")["app.kubernetes.io/instance"] == RELEASE
        assert chart == ours, path.name

    without = helm.template(RELEASE, NS, "--set", "crds.install=false")
    assert kinds(without) == {k: n for k, n in DEFAULT_KINDS.items() if k != CRD[1]}
    assert kinds(helm.template(RELEASE, NS, "--include-crds")) == DEFAULT_KINDS  # no crds/


def test_lint_and_render(helm: Helm, rendered: list[dict[str, Any]]) -> None:
    for args in ([], ["--strict"], ["--strict", "--set", "metrics.serviceMonitor.enabled=true"]):
        out = helm.run("lint", str(CHART), *args)
        assert "0 chart(s) failed" in out.stdout, out.stdout

    assert kinds(rendered) == DEFAULT_KINDS

    monitored = helm.template(RELEASE, NS, "--set", "metrics.serviceMonitor.enabled=true")
    assert kinds(monitored) == {**DEFAULT_KINDS, "Service": 4, "ServiceMonitor": 1}
    [monitor] = [o for o in monitored if o["kind"] == "ServiceMonitor"]
    services = [o for o in monitored if o["kind"] == "Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    for service in services:  # the monitor selects every metrics Service, by port name
        assert selector.items() <= service["metadata"]["labels"].items()
        assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    for component in COMPONENTS:  # ... which every component's main container declares
        spec = pod_spec(monitored, component)
        main = spec["containers"][0]
        assert "metrics" in [p["name"] for p in main["ports"]]

    # Only the CRDs, the CSIDriver and the admission policies are cluster-wide and shared;
    # every other object is the release's: in its namespace, or named after it.
    elsewhere = helm.template("fm", "storage")
    policies = {"flashmesh-storagepool-in-use", "flashmesh-volume-published",
                "flashmesh-volume-bound"}  # fmt: skip
    shared = {"CSIDriver": {"csi.flashmesh.dev"}, "ValidatingAdmissionPolicy": policies,
              "ValidatingAdmissionPolicyBinding": policies,
              "CustomResourceDefinition": CRD_NAMES}  # fmt: skip
    for obj in elsewhere:
        meta = obj["metadata"]
        if obj["kind"] in shared:
            assert meta["name"] in shared[obj["kind"]]
            continue
        assert meta["name"].startswith("fm-flashmesh-"), meta["name"]
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert meta["namespace"] == "storage"
        for subject in obj.get("subjects", []):
            assert subject["namespace"] == "storage"
    assert NS not in yaml.safe_dump_all(elsewhere)


def test_security_contexts(rendered: list[dict[str, Any]]) -> None:
    for component in COMPONENTS:
        spec = pod_spec(rendered, component)
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", [])]
        propagated = [m for m in mounts if m.get("mountPropagation") == "Bidirectional"]
        bidirectional = [m["mountPath"] for m in propagated]
        if component in PRIVILEGED:
            assert spec["hostNetwork"] is True
            for c in spec["containers"]:
                sc = c["securityContext"]
                if c["name"] == PRIVILEGED[component]:
                    assert sc == {
                        "privileged": True,
                        "runAsUser": 0,
                        "runAsNonRoot": False,
                        "allowPrivilegeEscalation": True,
                    }, (component, c["name"])
                else:  # sidecars: root for the sockets, nothing more
                    assert sc["privileged"] is False, (component, c["name"])
                    assert sc["allowPrivilegeEscalation"] is False
                    assert sc["readOnlyRootFilesystem"] is True
                    assert sc["capabilities"] == {"drop": ["ALL"]}
            expected = ["/var/lib/kubelet"] if component == "csi-node" else []
            assert bidirectional == expected
        else:
            pod_sc = spec["securityContext"]
            assert pod_sc["runAsNonRoot"] is True
            assert pod_sc["runAsUser"] != 0
            assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                assert not spec.get(key), (component, key)
            assert not [v for v in spec["volumes"] if "hostPath" in v], component
            assert not bidirectional
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc == {
                    "runAsNonRoot": True,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                }, (component, c["name"])


def test_commands_images_and_driver(helm: Helm, rendered: list[dict[str, Any]]) -> None:
    image = "flashmesh:0.1.0"  # the chart's appVersion when image.tag is empty
    operator = container(pod_spec(rendered, "operator"), "operator")
    assert operator["image"] == image
    assert operator["args"] == [
        "operator", "--standalone", f"--namespace={NS}", "--liveness=http://0.0.0.0:8080/healthz",
    ]  # fmt: skip
    assert workload(rendered, "operator")["spec"]["strategy"] == {"type": "Recreate"}
    assert workload(rendered, "operator")["spec"]["replicas"] == 1

    controller = pod_spec(rendered, "csi-controller")
    assert container(controller, "flashmesh")["args"] == [
        "csi", "--mode=controller", "--endpoint=unix:///csi/csi.sock",
        f"--namespace={NS}", "--fabric=default", "--wait=120",
    ]  # fmt: skip
    common = ["--csi-address=/csi/csi.sock", "--timeout=300s"]
    election = ["--leader-election", f"--leader-election-namespace={NS}"]
    assert {c["name"]: (c["image"], c["args"]) for c in controller["containers"][1:]} == {
        "csi-provisioner": (
            f"{SIDECARS}/csi-provisioner:v6.3.0",
            [*common, "--extra-create-metadata", *election],  # Topology is GA: no gate
        ),
        "csi-attacher": (f"{SIDECARS}/csi-attacher:v4.12.0", [*common, *election]),
        "csi-resizer": (f"{SIDECARS}/csi-resizer:v2.2.0", [*common, *election]),
        "csi-snapshotter": (f"{SIDECARS}/csi-snapshotter:v8.6.0", [*common, *election]),
        "liveness-probe": (
            f"{SIDECARS}/livenessprobe:v2.19.0",
            ["--csi-address=/csi/csi.sock", "--health-port=9808"],
        ),
    }

    node = pod_spec(rendered, "csi-node")
    plugin = container(node, "flashmesh")
    assert plugin["args"] == [
        "csi", "--mode=node", "--endpoint=unix:///csi/csi.sock",
        f"--namespace={NS}", "--fabric=default",
    ]  # fmt: skip
    env = {e["name"]: e for e in plugin["env"]}
    assert env["FLASHMESH_NODE_STATE"]["value"] == "/var/lib/flashmesh/node"
    registrar = container(node, "node-driver-registrar")
    assert registrar["image"] == f"{SIDECARS}/csi-node-driver-registrar:v2.17.0"
    assert registrar["args"] == [
        "--csi-address=/csi/csi.sock",
        "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.flashmesh.dev/csi.sock",
    ]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in node["volumes"]}
    assert host_paths["registration-dir"] == "/var/lib/kubelet/plugins_registry"
    assert host_paths["plugin-dir"] == "/var/lib/kubelet/plugins/csi.flashmesh.dev"
    # The host's own NVMe identity, read-only, for the node plugin and the agent alike.
    assert host_paths["etc-nvme"] == "/etc/nvme"
    etc = [m for m in plugin["volumeMounts"] if m["name"] == "etc-nvme"]
    assert etc == [{"name": "etc-nvme", "mountPath": "/etc/nvme", "readOnly": True}]
    assert node["nodeSelector"] == {"flashmesh.dev/gpu": "true"}
    # Every taint: a tainted node still has volumes only the node plugin can unmount.
    assert node["tolerations"] == [{"operator": "Exists"}]

    agent = pod_spec(rendered, "agent")
    main = container(agent, "agent")
    assert main["args"] == [
        "agent", "--node=$(NODE_NAME)", "--address=$(FABRIC_ADDRESS)",
        f"--namespace={NS}", "--resync=300",
    ]  # fmt: skip
    env = {e["name"]: e for e in main["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["FABRIC_ADDRESS"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert agent["nodeSelector"] == {"flashmesh.dev/storage": "true"}
    # Liveness from the agent's own passes and heartbeat (flashmesh.metrics' /healthz).
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # The cut-offs not done yet outlive the agent's pod (a rollout mid-cut-off), on the
    # host's /run, which a reboot clears with every controller.
    agent_paths = {v["name"]: v["hostPath"]["path"] for v in agent["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert (agent_paths["cutoffs"], mounts["cutoffs"]) == ("/run/flashmesh", "/run/flashmesh")
    assert (agent_paths["etc-nvme"], mounts["etc-nvme"]) == ("/etc/nvme", "/etc/nvme")
    # One LVM per node: the host's IPC, run state and metadata backups; and FlashMesh's
    # udev rule where the host's udev reads it (see flashmesh.dataplane.udev).
    assert agent["hostIPC"] is True
    for name, path in (("lvm-run", "/run/lvm"), ("lvm-backup", "/etc/lvm/backup"),
                       ("lvm-archive", "/etc/lvm/archive"), ("udev-rules", "/etc/udev/rules.d"),
                       ("udev", "/run/udev")):  # fmt: skip
        assert (agent_paths[name], mounts[name]) == (path, path), name
    plugin_mounts = {m["name"]: m["mountPath"] for m in plugin["volumeMounts"]}
    assert plugin_mounts["udev-rules"] == host_paths["udev-rules"] == "/etc/udev/rules.d"
    # Not udev's run state: dmsetup and mdadm in the container would then wait for the
    # host's udev, over an IPC namespace the node plugin does not share.
    assert "/run/udev" not in plugin_mounts.values()
    fixed = pod_spec(
        helm.template(RELEASE, NS, "--set", "agent.fabricAddress.value=10.77.0.5"), "agent"
    )
    env = {e["name"]: e for e in container(fixed, "agent")["env"]}
    assert env["FABRIC_ADDRESS"] == {"name": "FABRIC_ADDRESS", "value": "10.77.0.5"}

    # The same CSIDriver the lab registers for the sidecars it runs.
    [driver] = [o for o in rendered if o["kind"] == "CSIDriver"]
    assert driver["metadata"]["name"] == "csi.flashmesh.dev"
    assert driver["spec"] == csi_driver_object()["spec"]

    # Without snapshot support: no csi-snapshotter, and none of its rules.
    bare = helm.template(RELEASE, NS, "--set", "csiController.snapshotter.enabled=false")
    names = [c["name"] for c in pod_spec(bare, "csi-controller")["containers"]]
    assert "csi-snapshotter" not in names and "csi-provisioner" in names
    roles = [o for o in bare if o["kind"] == "ClusterRole"]
    [role] = [o for o in roles if o["metadata"]["name"] == f"{RELEASE}-csi-controller"]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "volumesnapshotcontents/status" not in resources
    assert "volumesnapshotclasses" not in resources


def test_disruption_budgets(helm: Helm, rendered: list[dict[str, Any]]) -> None:
    """Each Deployment has a PodDisruptionBudget of maxUnavailable 1 over exactly its pods:
    evictions take one at a time, yet never block a drain of a one-replica Deployment (as
    minAvailable 1 would); an unhealthy pod may always go. Values turn each off."""

    def budgets(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        found = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
        return {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in found}

    for objs in (rendered, helm.template(RELEASE, NS, "--set", "csiController.replicas=3")):
        found = budgets(objs)
        assert found.keys() == {"operator", "csi-controller"}
        for component, pdb in found.items():
            deployment = workload(objs, component)
            assert pdb["metadata"]["name"] == deployment["metadata"]["name"]
            assert pdb["metadata"]["namespace"] == NS
            assert pdb["spec"] == {
                "maxUnavailable": 1,
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
                "selector": deployment["spec"]["selector"],
            }
            # It selects this Deployment's pods and no other component's.
            selector = pdb["spec"]["selector"]["matchLabels"]
            for other in COMPONENTS:
                labels = workload(objs, other)["spec"]["template"]["metadata"]["labels"]
                assert (selector.items() <= labels.items()) == (other == component), other

    off = "operator.podDisruptionBudget.enabled=false"
    assert budgets(helm.template(RELEASE, NS, "--set", off)).keys() == {"csi-controller"}
    off = "csiController.podDisruptionBudget.enabled=false"
    assert budgets(helm.template(RELEASE, NS, "--set", off)).keys() == {"operator"}
    gone = helm.template(RELEASE, NS, "--set", "operator.enabled=false",
                         "--set", "csiController.enabled=false")  # fmt: skip
    assert budgets(gone) == {}


def test_operator_liveness(
    crds: LocalCluster, rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's livenessProbe reads kopf's liveness endpoint, which the chart's
    --liveness turns on: the flashmesh command hands that URL to kopf, and kopf answers
    on it while its event loop runs."""
    main = container(pod_spec(rendered, "operator"), "operator")
    probe = main["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9810}

    handed: list[str | None] = []

    def run(config: Any, metrics_port: int | None, liveness: str | None) -> int:
        handed.append(liveness)
        return 0

    monkeypatch.setattr(operator_main, "run", run)
    assert cli.main(main["args"]) == 0
    [endpoint] = handed
    assert endpoint is not None
    url = urlsplit(endpoint)
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "http", "0.0.0.0", ports["healthz"], probe["httpGet"]["path"],
    )  # fmt: skip

    # kopf serving that endpoint (here on a free local port), as the kubelet probes it. No
    # FlashMesh handlers: they would put finalizers on other tests' objects.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = url._replace(netloc=f"127.0.0.1:{port}").geturl()
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_kubeconfig(**kwargs)

    def answers() -> bool:
        try:
            with urllib.request.urlopen(local, timeout=3) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    monkeypatch.setenv("KUBECONFIG", str(crds.kubeconfig))
    args = ["run", "--standalone", "--all-namespaces", f"--liveness={local}"]
    with KopfRunner(args, registry=registry) as runner:
        assert processes.wait_until(answers, 30)
    assert runner.exception is None, runner.output
    assert not answers()  # and stops answering once the operator has stopped


_KEY = re.compile(r"^(\s*)([A-Za-z][\w.-]*):")


def test_every_value_is_documented() -> None:
    """Each key of values.yaml has a comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        if not _KEY.match(line):
            continue
        above = lines[number - 1].strip() if number else ""
        if not above.startswith("#"):
            undocumented.append(f"values.yaml:{number + 1}: {line.strip()}")
    assert not undocumented, "\n".join(undocumented)


# --- installed into the real API server -----------------------------------------------------


@dataclass
class Release:
    cluster: LocalCluster
    helm: Helm
    workdir: Path
    installed: bool = True
    objects: list[dict[str, Any]] = field(default_factory=list)


def _set_aside_foreign_csidriver(cluster: LocalCluster) -> dict[str, Any] | None:
    """A CSIDriver csi.flashmesh.dev another test made (the lab's sidecars register one)
    would make helm refuse to install: set it aside, to be put back after."""
    found = cluster.kube.get("storage.k8s.io/v1", "CSIDriver", "csi.flashmesh.dev")
    if found is None:
        return None
    annotations = found["metadata"].get("annotations") or {}
    if annotations.get("meta.helm.sh/release-name") == RELEASE:
        return None
    cluster.kube.delete("storage.k8s.io/v1", "CSIDriver", "csi.flashmesh.dev")
    return {k: found[k] for k in ("apiVersion", "kind", "spec")} | {
        "metadata": {"name": "csi.flashmesh.dev", "labels": found["metadata"].get("labels", {})}
    }


def _adopt_crds(cluster: LocalCluster) -> None:
    """The session's CRDs (applied by the lab, as an earlier chart's crds/ folder or a
    kubectl apply would have made them) handed to the release, as the chart's README says:
    helm then takes them over instead of refusing to install."""
    names = sorted(CRD_NAMES)
    cluster.kubectl("label", "crd", *names, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    cluster.kubectl(
        "annotate", "crd", *names, f"meta.helm.sh/release-name={RELEASE}",
        f"meta.helm.sh/release-namespace={NS}", "--overwrite",
    )  # fmt: skip


@pytest.fixture(scope="module")
def release(crds: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    workdir = tmp_path_factory.mktemp("helm-release")
    helm = Helm(workdir / "home", crds.kubeconfig)
    foreign = _set_aside_foreign_csidriver(crds)
    _adopt_crds(crds)
    helm.run(
        "install", RELEASE, str(CHART), "--namespace", NS, "--create-namespace",
        "--timeout", "2m",
    )  # fmt: skip
    rel = Release(crds, helm, workdir)
    rel.objects = helm.manifest(RELEASE, NS)
    try:
        yield rel
    finally:
        if rel.installed:
            helm.run("uninstall", RELEASE, "--namespace", NS, "--wait", check=False)
        if foreign is not None:
            crds.kube.create(foreign)


def resource_of(obj: dict[str, Any]) -> str:
    """kubectl's name for an object's type: kind.group (kind alone for the core group)."""
    group = obj["apiVersion"].rpartition("/")[0]
    return f"{obj['kind'].lower()}.{group}" if group else obj["kind"].lower()


def test_install_is_accepted(release: Release, rendered: list[dict[str, Any]]) -> None:
    cluster, helm = release.cluster, release.helm
    status = json.loads(helm.run("status", RELEASE, "--namespace", NS, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert kinds(release.objects) == kinds(rendered) == DEFAULT_KINDS

    manifest = release.workdir / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(release.objects))
    live = json.loads(cluster.kubectl("get", "-f", str(manifest), "-o", "json").stdout)["items"]
    assert len(live) == len(release.objects)
    by_key = {(o["kind"], o["metadata"]["name"]): o for o in live}
    for want in release.objects:
        got = by_key[(want["kind"], want["metadata"]["name"])]
        meta = got["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["annotations"]["meta.helm.sh/release-namespace"] == NS
        if "rules" in want:  # RBAC stored as written
            assert got["rules"] == want["rules"], want["metadata"]["name"]
        if want["kind"] in ("Deployment", "DaemonSet"):
            spec = got["spec"]["template"]["spec"]
            wanted = want["spec"]["template"]["spec"]
            assert [(c["image"], c["args"]) for c in spec["containers"]] == [
                (c["image"], c["args"]) for c in wanted["containers"]
            ]
            assert spec["serviceAccountName"] == wanted["serviceAccountName"]
        if want["kind"] == "CSIDriver":
            assert want["spec"].items() <= got["spec"].items()


def _pod(workload_obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    template = copy.deepcopy(workload_obj["spec"]["template"])
    component = template["metadata"]["labels"]["app.kubernetes.io/component"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"dry-run-{component}", "namespace": namespace},
        "spec": template["spec"],
    }


def _dry_run(cluster: LocalCluster, pod: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", "-o", "name", stdin=json.dumps(pod), check=False
    )


def test_pods_are_admitted(release: Release) -> None:
    """No pod runs here (no kubelet), but each component's pod passes the API server's
    validation and admission (priority classes, host paths, propagation, privilege); under
    the restricted Pod Security Standard only the two privileged ones are refused."""
    cluster = release.cluster
    workloads = [o for o in release.objects if o["kind"] in ("Deployment", "DaemonSet")]
    for obj in workloads:
        result = _dry_run(cluster, _pod(obj, NS))
        assert result.returncode == 0, (obj["metadata"]["name"], result.stderr)

    restricted = "flashmesh-pss-restricted"
    cluster.kubectl("create", "namespace", restricted)
    try:
        cluster.kubectl(
            "label", "namespace", restricted, "pod-security.kubernetes.io/enforce=restricted"
        )
        assert processes.wait_until(
            lambda: cluster.kube.get("v1", "ServiceAccount", "default", restricted) is not None,
            60,
        )
        refused = {}
        for obj in workloads:
            pod = _pod(obj, restricted)
            pod["spec"]["serviceAccountName"] = "default"
            result = _dry_run(cluster, pod)
            component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            refused[component] = result.returncode != 0
            if refused[component]:
                assert 'violates PodSecurity "restricted' in result.stderr, result.stderr
        assert refused == {
            "operator": False, "csi-controller": False, "csi-node": True, "agent": True,
        }  # fmt: skip
    finally:
        cluster.kubectl("delete", "namespace", restricted, "--wait=false", check=False)


# --- RBAC: each service account's permissions, as the API server answers them --------------

GLW = {"get", "list", "watch"}
EDIT = GLW | {"create", "update", "patch"}
EVENTS_SIDECAR = {"list", "watch", "create", "update", "patch"}

OPERATOR = {
    "storagepools.flashmesh.dev": GLW | {"patch"},
    "storagepools.flashmesh.dev/status": {"patch"},
    "storagenodes.flashmesh.dev": GLW | {"patch"},
    "storagenodes.flashmesh.dev/status": {"patch"},
    "trainingworkloads.flashmesh.dev": GLW | {"patch"},
    "trainingworkloads.flashmesh.dev/status": {"patch"},
    "volumes.flashmesh.dev": GLW,
    "snapshots.flashmesh.dev": GLW,
    "storageclasses.storage.k8s.io": EDIT | {"delete"},
    "volumesnapshotclasses.snapshot.storage.k8s.io": EDIT | {"delete"},
    "jobs.batch": EDIT,
    "deployments.apps": EDIT,
    "persistentvolumeclaims": EDIT,
    "volumesnapshots.snapshot.storage.k8s.io": EDIT,
    "pods": GLW,
    "nodes": GLW,
    "volumeattachments.storage.k8s.io": GLW,
    "events": {"create", "patch"},
    "customresourcedefinitions.apiextensions.k8s.io": GLW,
}
CSI_CONTROLLER = {
    "volumes.flashmesh.dev": EDIT | {"delete"},
    "volumes.flashmesh.dev/status": {"get", "update", "patch"},
    "snapshots.flashmesh.dev": EDIT | {"delete"},
    "snapshots.flashmesh.dev/status": {"get", "update", "patch"},
    "storagepools.flashmesh.dev": GLW,
    "storagenodes.flashmesh.dev": GLW,
    "csinodes.storage.k8s.io": GLW,
    "nodes": GLW,
    "persistentvolumes": GLW | {"create", "patch", "delete"},
    "persistentvolumeclaims": GLW | {"update"},
    "persistentvolumeclaims/status": {"patch"},
    "pods": GLW,
    "storageclasses.storage.k8s.io": GLW,
    "events": EVENTS_SIDECAR,
    "volumesnapshots.snapshot.storage.k8s.io": GLW | {"update"},
    "volumesnapshotcontents.snapshot.storage.k8s.io": GLW | {"update", "patch"},
    "volumesnapshotcontents.snapshot.storage.k8s.io/status": {"update", "patch"},
    "volumesnapshotclasses.snapshot.storage.k8s.io": GLW,
    "volumeattachments.storage.k8s.io": GLW | {"patch"},
    "volumeattachments.storage.k8s.io/status": {"patch"},
    "volumeattributesclasses.storage.k8s.io": GLW,
}
AGENT = {
    "storagenodes.flashmesh.dev": GLW | {"create", "patch"},
    "storagenodes.flashmesh.dev/status": {"patch", "update"},
    "storagepools.flashmesh.dev": GLW,
    "volumes.flashmesh.dev": GLW | {"update", "patch"},
    "volumes.flashmesh.dev/status": {"patch"},
    "snapshots.flashmesh.dev": GLW | {"update", "patch"},
    "snapshots.flashmesh.dev/status": {"patch"},
    "csinodes.storage.k8s.io": GLW,
    "events": {"create", "patch"},
}
LEASES = "leases.coordination.k8s.io"
# component -> (cluster-wide, and in the release namespace besides)
EXPECTED: dict[str, tuple[dict[str, set[str]], dict[str, set[str]]]] = {
    "operator": (OPERATOR, {LEASES: GLW}),
    "csi-controller": (CSI_CONTROLLER, {LEASES: GLW | {"create", "update", "delete"}}),
    "csi-node": (
        {
            "volumes.flashmesh.dev": {"get"},
            "volumes.flashmesh.dev/status": {"patch"},
            "events": {"create"},
        },
        {},  # no Secret: each node's key is a file on that node
    ),
    "agent": (AGENT, {LEASES: {"get", "create", "update", "patch"}, "secrets": GLW}),
}

_ROW = re.compile(r"^(\S*)\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s*$")


def account(component: str) -> str:
    return f"system:serviceaccount:{NS}:{RELEASE}-{component}"


def can_i_list(cluster: LocalCluster, user: str, namespace: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list` as a table resource -> verbs (rows of one resource merged;
    a row limited to resourceNames keyed `resource[names]`; non-resource URLs left out)."""
    out = cluster.kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace).stdout
    table: dict[str, set[str]] = {}
    lines = out.splitlines()
    assert lines and lines[0].split()[0] == "Resources", out
    for line in lines[1:]:
        match = _ROW.match(line)
        assert match, f"unparsed row of kubectl auth can-i --list: {line!r}"
        resource, _urls, names, verbs = match.groups()
        if not resource:
            continue
        key = f"{resource}[{names}]" if names else resource
        table.setdefault(key, set()).update(verbs.split())
    return table


def beyond(table: dict[str, set[str]], baseline: dict[str, set[str]]) -> dict[str, set[str]]:
    """What table allows that every service account is allowed anyway."""
    extra = {r: verbs - baseline.get(r, set()) for r, verbs in table.items()}
    return {r: verbs for r, verbs in extra.items() if verbs}


def can_i(cluster: LocalCluster, component: str, verb: str, what: str, namespace: str) -> bool:
    result = cluster.kubectl(
        "auth", "can-i", verb, what, f"--as={account(component)}", "-n", namespace, check=False
    )
    return result.stdout.strip() == "yes"


# The questions an auditor asks, answered by the API server one by one:
# (component, verb, resource, namespace, allowed).
QUESTIONS = [
    ("operator", "get", "secrets", NS, False),
    ("csi-controller", "get", "secrets", NS, False),
    # A node plugin cannot read any node's DH-HMAC-CHAP key Secret, its own or another's.
    ("csi-node", "list", "secrets", NS, False),
    ("csi-node", "get", "secrets/dhchap-gpu-1", NS, False),
    ("csi-node", "watch", "secrets", NS, False),
    ("csi-node", "list", "secrets", "default", False),
    ("csi-node", "get", "secrets", "kube-system", False),
    ("csi-node", "get", "storagenodes.flashmesh.dev", NS, False),
    ("csi-node", "update", "volumes.flashmesh.dev", NS, False),
    ("agent", "get", "secrets", NS, True),
    ("agent", "get", "secrets", "kube-system", False),
    ("agent", "delete", "storagenodes.flashmesh.dev", NS, False),
    ("agent", "update", "leases.coordination.k8s.io", "default", False),
    *[(c, "*", "*", NS, False) for c in COMPONENTS],
    *[(c, "escalate", "clusterroles", NS, False) for c in COMPONENTS],
    *[(c, "create", "pods", NS, False) for c in COMPONENTS],
]


def test_each_service_account_has_exactly_its_permissions(release: Release) -> None:
    cluster = release.cluster
    nobody = f"system:serviceaccount:{NS}:nobody-without-bindings"
    users = {"nobody": nobody, **{c: account(c) for c in COMPONENTS}}
    # In another namespace only the ClusterRoles count; in the release's, Roles add to them.
    # (kubectl calls in parallel: each costs a process start.)
    with ThreadPoolExecutor(max_workers=4) as pool:
        lists = {
            (who, ns): pool.submit(can_i_list, cluster, user, ns)
            for who, user in users.items()
            for ns in ("default", NS)
        }
        answers = [(q, pool.submit(can_i, cluster, *q[:4])) for q in QUESTIONS]
        tables = {key: future.result() for key, future in lists.items()}
    for component, (cluster_wide, in_namespace) in EXPECTED.items():
        elsewhere, here = tables[component, "default"], tables[component, NS]
        assert beyond(elsewhere, tables["nobody", "default"]) == cluster_wide, component
        merged = {
            r: cluster_wide.get(r, set()) | in_namespace.get(r, set())
            for r in {*cluster_wide, *in_namespace}
        }
        assert beyond(here, tables["nobody", NS]) == merged, component
        for table in (elsewhere, here):
            assert "*" not in table and "*.*" not in table, component
            assert not [r for r, verbs in table.items() if "*" in verbs], component
    wrong = [q for q, answer in answers if answer.result() != q[4]]
    assert not wrong, f"kubectl auth can-i answered otherwise for {wrong}"


# --- upgrade -------------------------------------------------------------------------------


def _volume_description(cluster: LocalCluster) -> str:
    crd = cluster.kube.get(*CRD, "volumes.flashmesh.dev")
    assert crd is not None
    assert crd["metadata"]["annotations"].items() >= KEEP.items()
    description: str = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"]
    return description


def test_upgrade_upgrades_the_crds(release: Release) -> None:
    """A new chart's CRD reaches the cluster with helm upgrade (a crds/ folder never would);
    an upgrade that stops rendering the CRDs deletes none; the next one takes them back."""
    cluster, helm = release.cluster, release.helm

    def upgrade(chart: Path, *args: str) -> list[dict[str, Any]]:
        helm.run("upgrade", RELEASE, str(chart), "--namespace", NS, "--timeout", "2m", *args)
        return helm.manifest(RELEASE, NS)

    newer = release.workdir / "newer-chart"
    shutil.copytree(CHART, newer)
    path = newer / "files" / "crds" / "volume.yaml"
    before = "Written by the CSI controller."
    after = "Written by the CSI controller (a newer chart)."
    assert path.read_text().count(before) == 1
    path.write_text(path.read_text().replace(before, after))
    original = _volume_description(cluster)
    assert original.endswith(before)

    assert kinds(upgrade(newer)) == DEFAULT_KINDS
    assert _volume_description(cluster).endswith(after)

    objects = upgrade(CHART, "--set", "crds.install=false")
    assert CRD[1] not in kinds(objects)
    present = cluster.kubectl("get", "crd", *sorted(CRD_NAMES), "-o", "name").stdout.split()
    assert len(present) == 5
    assert _volume_description(cluster).endswith(after)  # left alone, not deleted

    # Taken back into the release. (With no values given, helm upgrade reuses the last
    # release's: crds.install=false would stay.)
    assert kinds(upgrade(CHART, "--reset-values")) == DEFAULT_KINDS
    assert _volume_description(cluster) == original
    release.objects = helm.manifest(RELEASE, NS)


# --- uninstall (last: the release is gone after it) ----------------------------------------


def test_uninstall_removes_everything_but_the_crds(release: Release) -> None:
    cluster, helm = release.cluster, release.helm
    manifest = release.workdir / "manifest.yaml"
    # The CRDs are kept (helm.sh/resource-policy: keep): checked apart, below.
    made = [o for o in release.objects if o["kind"] != CRD[1]]
    assert len(made) == len(release.objects) - 5
    manifest.write_text(yaml.safe_dump_all(made))
    out = helm.run(
        "uninstall", RELEASE, "--namespace", NS, "--wait", "--cascade", "foreground",
        "--timeout", "2m",
    )  # fmt: skip
    release.installed = False
    kept = {line.split()[-1] for line in out.stdout.splitlines() if line.startswith(f"[{CRD[1]}]")}
    assert kept == CRD_NAMES, out.stdout

    # Every type the release made, and what its workloads make in turn.
    types = sorted({resource_of(o) for o in made})
    types += ["pod", "replicaset.apps", "controllerrevision.apps"]

    def leftovers() -> str:
        out = cluster.kubectl("get", ",".join(types), "-A", "-l", INSTANCE, "-o", "name")
        return out.stdout.strip()

    processes.wait_until(lambda: not leftovers(), 60)
    assert leftovers() == ""
    still = cluster.kubectl("get", "-f", str(manifest), "--ignore-not-found", "-o", "name")
    assert still.stdout.strip() == ""
    # helm keeps its release records as Secrets in the namespace: gone too.
    records = cluster.kubectl("get", "secrets", "-n", NS, "-l", f"owner=helm,name={RELEASE}")
    assert records.stdout.strip() == ""
    assert helm.run("status", RELEASE, "--namespace", NS, check=False).returncode != 0
    # The CRDs (and so every FlashMesh object) stay: their resource policy is keep.
    crds = cluster.kubectl("get", "crd", *sorted(CRD_NAMES), "-o", "name").stdout.split()
    assert len(crds) == 5
