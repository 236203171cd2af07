"""API requests: FlashMesh's steady-state Kubernetes API requests per second, with 100 and
with 1,000 Volumes in the cluster, for the work tree or a given commit of FlashMesh.

Two storage agents run in lab VMs (real LVM and nvmet), each serving a few Volumes; the
other Volumes sit on 50 KWOK storage nodes whose StorageNodes and Leases say they serve
(as in operator-scale). The operator and the CSI controller run beside the API server,
all of them with their default intervals (what the chart deploys). Once everything has
settled, the API server's own counters (apiserver_request_total) are read before and
after a fixed window. Its audit log (Metadata level) names each request's user agent and
source address: requests of the lab control plane's own clients are set apart, the rest
is FlashMesh (the benchmark makes no request during a window), told apart by address
(agents in the VMs, the operator on the bridge address, the controller on loopback). A
last window with FlashMesh stopped gives the control plane alone, against which the
metric's totals are checked.

Run `flashmesh bench api-requests` for the work tree, or
`python -m bench.api_requests --at COMMIT [--window SECONDS]` for a commit (root); the
runner passes both on as $FLASHMESH_BENCH_AT and $FLASHMESH_BENCH_WINDOW, which also work
with `flashmesh bench api-requests`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import api_results
from bench.api_audit import AuditedCluster, is_control_plane, source_tree
from bench.api_results import histogram
from bench.common import sample, scrape, timed_wait
from bench.idle_vm import cpu_seconds
from bench.report import Result
from flashmesh.core import naming, resources
from flashmesh.lab import processes
from flashmesh.lab.binaries import locate_csi
from flashmesh.lab.netns import LabNetwork, bridge_address
from flashmesh.lab.progress import say
from flashmesh.lab.vm import Drive, Lab, LabError, VmSpec

API = resources.API_VERSION
AT = "FLASHMESH_BENCH_AT"
WINDOW = "FLASHMESH_BENCH_WINDOW"
NS = "flashmesh-system"
POOL = "bench"
STORAGE_LABEL = {"flashmesh.dev/storage": "true"}
FAKE_NODES = 50
PER_VM = 3
STEPS = (100, 1000)
# Long enough for every component's first passes after a change to be over (the operator
# resyncs a pool every 10 s by default, the agents pass every 2 s).
SETTLE = 30.0
STORAGE = tuple(
    VmSpec(f"storage-{i}", 1 + i, drives=(Drive(2048),), memory_mib=512) for i in range(2)
)
OPERATOR_METRICS = 9810
PYTHON = sys.executable


def fake_node_status() -> dict[str, Any]:
    return {
        "phase": "Ready",
        "volumeGroup": {"name": naming.pool_volume_group(POOL), "size": "4Ti", "free": "4Ti",
                        "thinPool": {"name": "thin", "size": "4Ti"}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat",
                        "message": "serving"}],
    }  # fmt: skip


def volume(i: int, node: str, size: str) -> dict[str, Any]:
    csi_name = f"pvc-api-{i:05d}"
    # Labelled with its segment's node as the CSI controller does, for code whose agents
    # watch by that label (code from before the labels ignores them).
    labels: dict[str, str] = getattr(naming, "node_labels", lambda nodes: {})([node])
    return {
        "apiVersion": API, "kind": "Volume",
        "metadata": {"name": naming.volume_id(csi_name), "labels": labels},
        "spec": {"csiName": csi_name, "pool": POOL, "size": size,
                 "layout": {"stripeWidth": 1, "replicas": 1},
                 "segments": [{"index": 0, "replica": 0, "node": node, "size": size}]},
    }  # fmt: skip


def who(user_agent: str, source: str) -> str:
    """Which client made a request, from its user agent and source address."""
    if is_control_plane(user_agent):
        return "control plane"
    if source in {s.address(0) for s in STORAGE}:
        return "agents"
    if source == bridge_address(0):
        return "operator"
    return "CSI controller"  # loopback: the only other client left running in a window


def histograms() -> dict[str, tuple[float, float]]:
    """The agents' passes (both VMs together) and the operator's pool reconciles so far."""
    agents = [histogram(f"http://{s.address(0)}:9813/metrics",
                        "flashmesh_agent_reconcile_duration_seconds") for s in STORAGE]  # fmt: skip
    return {
        "agent pass": (sum(c for c, _ in agents), sum(t for _, t in agents)),
        "operator pool reconcile": histogram(
            f"http://127.0.0.1:{OPERATOR_METRICS}/metrics",
            "flashmesh_operator_reconcile_duration_seconds", kind="StoragePool",
        ),
    }  # fmt: skip


class Components:
    """FlashMesh's operator, CSI controller and storage agents from one source tree;
    stop() is safe to call twice (it also runs when the benchmark fails)."""

    def __init__(self, cluster: AuditedCluster, lab: Lab, src: Path, logs: Path) -> None:
        self.cluster, self.lab, self.src, self.logs = cluster, lab, src, logs
        self.procs: list[Any] = []
        self.agents: list[str] = []

    def _host(self, args: list[str], log: str) -> None:
        self.procs.append(processes.spawn(
            [PYTHON, "-m", "flashmesh.cli", *args], self.logs / log, die_with_parent=True,
            env={"PYTHONPATH": str(self.src)},
        ))  # fmt: skip

    def start(self) -> None:
        lab, cluster = self.lab, self.cluster
        agent_config = lab.workdir / "agent.kubeconfig"  # /lab/agent.kubeconfig in a VM
        agent_config.write_text(cluster.portable_kubeconfig(bridge_address(0)))
        for spec in STORAGE:
            say(f"starting the storage agent in {spec.name}")
            lab.spawn(spec.name, f"export PYTHONPATH={self.src}\n"
                                 "echo $$ > /run/bench-agent.pid\n"
                                 f"exec {PYTHON} -m flashmesh.cli agent --node {spec.name} "
                                 f"--address {spec.address(0)} --namespace {NS} "
                                 "--kubeconfig /lab/agent.kubeconfig --metrics-port 9813 "
                                 f">> /lab/agent-{spec.name}.log 2>&1")  # fmt: skip
            self.agents.append(spec.name)
        say("starting the CSI controller and the operator")
        socket = lab.workdir / "csi-controller.sock"
        self._host(["csi", "--mode", "controller", "--endpoint", f"unix://{socket}",
                    "--kubeconfig", str(cluster.kubeconfig), "--namespace", NS,
                    "--metrics-port", "9811"], "csi-controller.log")  # fmt: skip
        # The operator reaches the API server on the bridge address, so that its requests
        # come from an address of its own (the file goes with the cluster's folder).
        operator_config = cluster.workdir / "operator.kubeconfig"
        operator_config.write_text(cluster.portable_kubeconfig(bridge_address(0)))
        self._host(["operator", "--kubeconfig", str(operator_config), "--namespace", NS,
                    "--metrics-port", str(OPERATOR_METRICS)], "operator.log")  # fmt: skip
        if not processes.wait_until(socket.is_socket, 300):
            raise RuntimeError(f"the CSI controller did not start: see {self.logs}")

    def stop(self) -> None:
        for proc in self.procs:
            processes.end(proc)
        for name in self.agents:
            try:
                self.lab.exec(name, "kill $(cat /run/bench-agent.pid); sleep 1", check=False)
            except LabError as e:  # a VM already gone takes its agent with it
                say(f"stopping the agent in {name}: {e}")
        self.agents.clear()

    def keep_logs(self) -> None:
        for log in self.lab.workdir.glob("agent-*.log"):
            (self.logs / log.name).write_bytes(log.read_bytes())


def make_volumes(kube: Any, first: int, last: int) -> None:
    """Volumes first..last-1 (numbers below PER_VM * 2 on the VMs, the rest on KWOK nodes)."""
    for i in range(first, last):
        if i < PER_VM * len(STORAGE):
            kube.create(volume(i, STORAGE[i % len(STORAGE)].name, "16Mi"))
        else:
            kube.create(volume(i, f"fake-{i % FAKE_NODES:02d}", "1Gi"))


def wait(what: str, condition: Callable[[], bool], timeout: float) -> None:
    """Like timed_wait, polling every 2 s: these conditions LIST Volumes or scrape the
    operator, and the components being waited for share the machine's two cores."""
    begin = time.monotonic()
    if not processes.wait_until(condition, timeout, interval=2.0):
        raise RuntimeError(f"{what}: not within {timeout:.0f} s")
    say(f"{what} ({time.monotonic() - begin:.1f} s)")


def settle(kube: Any, count: int) -> None:
    """Until the agents report every VM Volume ready and the operator counts all `count`,
    then SETTLE seconds more."""
    on_vms = [naming.volume_id(f"pvc-api-{i:05d}") for i in range(PER_VM * len(STORAGE))]

    def ready(name: str) -> bool:
        status = (kube.get(API, "Volume", name) or {}).get("status") or {}
        segments = status.get("segments") or []
        return bool(segments) and all(s.get("ready") for s in segments)

    wait("the agents report their Volumes ready", lambda: all(map(ready, on_vms)), 1200)

    def counted() -> bool:
        return sample(scrape(OPERATOR_METRICS), "flashmesh_volumes", pool=POOL) == count

    wait(f"the operator counts all {count:,} Volumes", counted, 900)
    say(f"letting the components settle for {SETTLE:.0f} s")
    time.sleep(SETTLE)


def run(workdir: Path) -> Result:
    window = float(os.environ.get(WINDOW) or 60)
    at = os.environ.get(AT) or None
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    windows: dict[str, api_results.Window] = {}
    with source_tree(at) as (src, source), ExitStack() as down:
        say(f"measuring FlashMesh from {source}")
        network = LabNetwork(links=1)
        network.create()
        down.callback(network.destroy)
        network.enter()  # the VMs reach the API server on the bridge
        cluster = AuditedCluster(workdir / "cluster", extra_addresses=[bridge_address(0)],
                                 bind_all=True)  # fmt: skip
        say("starting the control plane with the API server's audit log")
        cluster.start()
        down.callback(cluster.stop)
        crds = sorted((src.parent / "crds").glob("*.yaml")) + locate_csi().crd_files()
        files = [a for f in crds for a in ("-f", str(f))]
        cluster.kubectl("apply", "--server-side", "--field-manager=bench", *files)
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *files)
        kube = cluster.kube
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        say(f"adding {FAKE_NODES} KWOK storage nodes, their StorageNodes and Leases")
        for n in range(FAKE_NODES):
            name = f"fake-{n:02d}"
            cluster.add_fake_node(name, labels=STORAGE_LABEL, wait_ready=False)
            kube.create({"apiVersion": API, "kind": "StorageNode",
                         "metadata": {"name": name, "labels": STORAGE_LABEL}})  # fmt: skip
            kube.patch(API, "StorageNode", name, {"status": fake_node_status()},
                       subresource="status")  # fmt: skip
            kube.renew_lease(NS, naming.node_lease(name), name, 4 * 3600)
        for spec in STORAGE:
            kube.create({"apiVersion": API, "kind": "StorageNode",
                         "metadata": {"name": spec.name, "labels": STORAGE_LABEL}})  # fmt: skip
        say(f"booting {len(STORAGE)} storage VMs (software emulation: a few minutes)")
        lab = Lab(workdir / "vms", network=network)
        down.callback(lab.down)
        lab.up(list(STORAGE))
        fm = Components(cluster, lab, src, logs)
        down.callback(fm.keep_logs)  # (callbacks run last first: before the VMs go)
        down.callback(fm.stop)
        fm.start()
        kube.create({
            "apiVersion": API, "kind": "StoragePool", "metadata": {"name": POOL},
            "spec": {"nodeSelector": {"matchLabels": STORAGE_LABEL},
                     "drives": {"pathPatterns": ["/dev/nvme*n1"], "minSize": "1Gi"},
                     "transports": ["tcp"]},
        })  # fmt: skip
        nodes = FAKE_NODES + len(STORAGE)

        def pool_ready() -> bool:
            status = (kube.get(API, "StoragePool", POOL) or {}).get("status") or {}
            return status.get("nodesReady") == nodes

        timed_wait(f"the pool serving on all {nodes} storage nodes", pool_ready, 900)
        made = 0
        vm_cpu: dict[str, float] = {}
        for count in STEPS:
            say(f"writing Volumes {made + 1:,} to {count:,}")
            make_volumes(kube, made, count)
            made = count
            settle(kube, count)
            cpu0, t0 = vms_cpu(lab), time.monotonic()
            windows[str(count)] = api_results.measure(
                cluster, window, f"{count:,} Volumes", who, histograms
            )
            # A storage VM's CPU with its agent running: its QEMU process, per VM.
            vm_cpu[str(count)] = (vms_cpu(lab) - cpu0) / (time.monotonic() - t0) / len(STORAGE)
        say("stopping FlashMesh for the control plane's own window")
        fm.stop()
        time.sleep(10)  # watches and requests in flight end, and are counted, before it
        windows["stopped"] = api_results.measure(cluster, window, "FlashMesh stopped", who)
    result = api_results.result(windows, source, window, STEPS, nodes, PER_VM)
    for volumes, share in vm_cpu.items():
        result.add(f"storage VM CPU, agent running ({int(volumes):,} Volumes)", "% of a core",
                   round(share * 100, 2))  # fmt: skip
    result.details["storage_vm_cpu"] = vm_cpu
    return result


def vms_cpu(lab: Lab) -> float:
    """CPU seconds the storage VMs' QEMU processes have used so far, together."""
    return sum(cpu_seconds(lab.pid(spec.name)) for spec in STORAGE)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.api_requests --at COMMIT`: this benchmark through the runner (its
    own process, the results JSON), for a commit's code."""
    parser = argparse.ArgumentParser(prog="python -m bench.api_requests", description=__doc__)
    parser.add_argument("--at", help="a git commit of FlashMesh (default: the work tree)")
    parser.add_argument("--window", type=float, default=60, help="seconds per window")
    parser.add_argument("--dir", help="working folder (default: in the lab cache)")
    args = parser.parse_args(argv)
    from bench import runner
    from flashmesh.lab.binaries import cache_dir

    os.environ[AT] = args.at or ""
    os.environ[WINDOW] = str(args.window)
    workdir = Path(args.dir) if args.dir else cache_dir() / "bench"
    _, results = runner.run(["api-requests"], workdir)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
