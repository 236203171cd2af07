"""`flashmesh lab ...`: the local control plane and the demo, for people at a terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flashmesh.lab.binaries import cache_dir
from flashmesh.lab.cluster import STATE_FILE, ClusterError, LocalCluster, node_is_ready
from flashmesh.lab.crds import apply_examples, install_crds
from flashmesh.lab.progress import say
from flashmesh.lab.vm import STATE_FILE as LAB_STATE
from flashmesh.lab.vm import Drive, Lab, LabError, VmSpec, host_nqn

DEMO_STORAGE_NODES = 3
DEMO_GPU_NODES = 2


def default_dir() -> Path:
    return cache_dir() / "lab" / "cluster"


def default_demo_dir() -> Path:
    return cache_dir() / "lab" / "demo"


def _kubelet(args: argparse.Namespace) -> int:
    """The kubelet stand-in for a running lab and cluster, until interrupted."""
    import threading

    from flashmesh.lab.kubelet import StandInKubelet

    lab = Lab.load(Path(args.dir) if args.dir else default_lab_dir())
    lab.net.enter()  # the node plugins listen on the VMs' addresses
    cluster = LocalCluster.load(Path(args.cluster_dir) if args.cluster_dir else default_dir())
    kubelet = StandInKubelet(cluster, lab, args.node)
    kubelet.register()
    say(f"kubelet stand-in running for {', '.join(args.node)} (Ctrl-C stops it)")
    stop = threading.Event()
    try:
        kubelet.run(stop)
    except KeyboardInterrupt:
        stop.set()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.lab_command == "cluster":
            return _cluster(args)
        if args.lab_command == "demo":
            if args.cluster_only:
                return demo(Path(args.dir) if args.dir else default_dir())
            from flashmesh.lab import demo as full_demo

            return full_demo.main(Path(args.dir) if args.dir else default_demo_dir())
        if args.lab_command == "kubelet":
            return _kubelet(args)
        return _vm_lab(args)
    except (ClusterError, LabError) as exc:
        print(f"flashmesh lab: {exc}", file=sys.stderr)
        return 1


def _running(workdir: Path) -> LocalCluster | None:
    if not (workdir / STATE_FILE).exists():
        return None
    cluster = LocalCluster.load(workdir)
    return cluster if all(cluster.running().values()) and cluster.running() else None


def up(workdir: Path, nodes: int = 0) -> LocalCluster:
    """The cluster in workdir, started unless it already runs."""
    cluster = _running(workdir)
    if cluster is not None:
        say(f"cluster already running in {workdir}")
        return cluster
    if (workdir / STATE_FILE).exists():
        say(f"a cluster in {workdir} is only partly running: stopping what is left of it")
        LocalCluster.load(workdir).stop()
    cluster = LocalCluster(workdir, die_with_parent=False)
    cluster.start()
    for i in range(nodes):
        cluster.add_fake_node(f"kwok-node-{i}")
    return cluster


def _cluster(args: argparse.Namespace) -> int:
    workdir = Path(args.dir) if args.dir else default_dir()
    if args.action == "up":
        cluster = up(workdir, args.nodes)
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        return 0
    if args.action == "down":
        if not (workdir / STATE_FILE).exists():
            say(f"no cluster in {workdir}")
            return 0
        LocalCluster.load(workdir).stop()
        say("cluster stopped and its folder removed")
        return 0
    return status(workdir)


def status(workdir: Path) -> int:
    if not (workdir / STATE_FILE).exists():
        print(f"no cluster in {workdir} (start one with: flashmesh lab cluster up)")
        return 1
    cluster = LocalCluster.load(workdir)
    running = cluster.running()
    for name, alive in running.items():
        print(f"{name:<25} {'running' if alive else 'NOT RUNNING'}  pid {cluster.state.pids[name]}")
    print(f"{'api server':<25} {cluster.server}")
    print(f"{'kubeconfig':<25} {cluster.kubeconfig}")
    if not all(running.values()):
        return 1
    nodes = cluster.kube.list("v1", "Node")
    ready = sum(node_is_ready(n) for n in nodes)
    print(f"{'nodes':<25} {ready}/{len(nodes)} Ready")
    return 0


def demo(workdir: Path) -> int:
    """The local lab demo: a real control plane, FlashMesh's CRDs, simulated storage and GPU
    nodes, the sample objects, and what kubectl shows of them."""
    cluster = up(workdir)
    say("installing the FlashMesh CRDs")
    install_crds(cluster)
    existing = {n["metadata"]["name"] for n in cluster.kube.list("v1", "Node")}
    for i in range(DEMO_STORAGE_NODES):
        name = f"storage-{i}"
        if name not in existing:
            say(f"adding simulated storage node {name}")
            cluster.add_fake_node(
                name, labels={"flashmesh.dev/storage": "true"}, zone=f"zone-{'abc'[i % 3]}"
            )
    for i in range(DEMO_GPU_NODES):
        name = f"gpu-{i}"
        if name not in existing:
            say(f"adding simulated GPU node {name}")
            cluster.add_fake_node(name, labels={"nvidia.com/gpu.present": "true"}, gpus=8)
    say("applying the samples in crds/examples/")
    print(apply_examples(cluster), end="")
    for args in (
        ["get", "nodes", "-L", "topology.kubernetes.io/zone"],
        ["get", "flashmesh", "-A"],
        ["get", "storagepools", "-o", "wide"],
    ):
        print(f"\n$ kubectl {' '.join(args)}")
        print(cluster.kubectl(*args).stdout, end="")
    print(
        "\nThe control plane keeps running. Use it with:\n"
        f"  export KUBECONFIG={cluster.kubeconfig} PATH={cluster.binaries.kubectl.parent}:$PATH\n"
        "  kubectl explain storagepool.spec\n"
        "Stop it with: flashmesh lab cluster down"
    )
    return 0


# --- the VM lab -------------------------------------------------------------------------


def default_lab_dir() -> Path:
    return cache_dir() / "lab" / "vms"


def lab_specs(storage: int, gpus: int) -> list[VmSpec]:
    """Storage VMs storage-0.. with one 1 GiB emulated NVMe drive each, and GPU VMs gpu-0..
    with room for FlashMesh's Python components; all on both of the lab's links."""
    specs = [VmSpec(f"storage-{i}", 1 + i, drives=(Drive(1024),), links=2) for i in range(storage)]
    specs += [VmSpec(f"gpu-{i}", 101 + i, memory_mib=512, links=2) for i in range(gpus)]
    return specs


def _vm_lab(args: argparse.Namespace) -> int:
    workdir = Path(args.dir) if args.dir else default_lab_dir()
    running = (workdir / LAB_STATE).exists()
    if args.lab_command == "up":
        if running:
            say(f"a lab already runs in {workdir}: see flashmesh lab status")
            return 0
        lab = Lab(workdir, die_with_parent=False)
        try:
            lab.up(lab_specs(args.storage, args.gpus))
        except BaseException:
            lab.down()
            raise
        return lab_status(lab)
    if not running:
        print(f"no lab in {workdir} (start one with: flashmesh lab up)")
        return 0 if args.lab_command == "down" else 1
    lab = Lab.load(workdir)
    if args.lab_command == "down":
        lab.down()
        left = lab.leftovers()
        say("lab stopped: VMs, taps, namespace and folder removed" if not left else f"left: {left}")
        return 0 if not left else 1
    if args.lab_command == "status":
        return lab_status(lab)
    command = " ".join(args.command).removeprefix("-- ")
    result = lab.exec(args.vm, command, timeout=args.timeout, check=False)
    print(result.output, end="")
    return result.rc


def lab_status(lab: Lab) -> int:
    print(f"{'VM':<12} {'STATE':<8} {'ADDRESSES':<24} HOST NQN")
    for name, alive in lab.vms().items():
        spec = lab.spec(name)
        addresses = ",".join(spec.address(link) for link in range(spec.links))
        state = "running" if alive else "STOPPED"
        print(f"{name:<12} {state:<8} {addresses:<24} {host_nqn(name)}")
    print(f"namespace {lab.net.name} (run a shell there: ip netns exec {lab.net.name} bash)")
    return 0 if all(lab.vms().values()) else 1
