"""The `flashmesh` command: operator | csi | agent | status | lab | bench."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _agent(args: argparse.Namespace) -> int:
    from flashmesh.dataplane import agent

    return agent.main(
        args.node,
        args.address,
        args.kubeconfig,
        args.resync,
        args.once,
        args.namespace,
        args.metrics_port,
    )


def _csi(args: argparse.Namespace) -> int:
    from flashmesh.csi_driver import main

    return main.run(
        args.mode,
        args.endpoint or ["unix:///csi/csi.sock"],
        args.kubeconfig,
        args.namespace,
        args.fabric,
        args.wait,
        args.metrics_port,
    )


def _operator(args: argparse.Namespace) -> int:
    from flashmesh.operator import main
    from flashmesh.operator.handlers import OperatorConfig

    config = OperatorConfig(args.namespace, args.resync, args.kubeconfig)
    return main.run(config, args.metrics_port, args.liveness)


def _status(args: argparse.Namespace) -> int:
    from flashmesh import status

    return status.main(args.kubeconfig)


def _bench(args: argparse.Namespace) -> int:
    # The benchmarks live in the checkout's bench/ folder beside src/: a development tool.
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "runner.py").is_file():
        print(f"flashmesh bench: no bench/ folder at {root}: run it from a FlashMesh checkout",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.path.insert(0, str(root))
    runner = importlib.import_module("bench.runner")
    if args.list:
        print("\n".join(runner.BENCHMARKS))
        return 0
    if args.table:
        print(f"wrote {runner.rebuild_page()}")
        return 0
    try:
        names = runner.resolve(args.names)
    except ValueError as e:
        print(f"flashmesh bench: {e}", file=sys.stderr)
        return 2
    from flashmesh.lab.binaries import cache_dir

    workdir = Path(args.dir) if args.dir else cache_dir() / "bench"
    _, results = runner.run(names, workdir)
    return 1 if any(r.error for r in results) else 0


def _lab(args: argparse.Namespace) -> int:
    # Imported here: the lab is a development tool, and the product's subcommands must not
    # pay for (or depend on) it.
    from flashmesh.lab import commands

    return commands.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmesh",
        description="FlashMesh: pooled NVMe over Fabrics storage for AI clusters on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the storage agent on a storage node")
    agent.add_argument("--node", required=True, help="this node's name (its StorageNode)")
    agent.add_argument("--address", required=True, help="the node's fabric address to serve on")
    agent.add_argument("--kubeconfig", help="default: the pod's service account")
    agent.add_argument(
        "--resync",
        type=float,
        default=300.0,
        help="seconds between passes when nothing changes (changes are watched)",
    )
    agent.add_argument("--once", action="store_true", help="one pass, then exit")
    agent.add_argument(
        "--namespace", default="flashmesh-system", help="where its Lease and the key Secrets live"
    )
    agent.add_argument(
        "--metrics-port", type=int, help="serve /metrics here (default: $FLASHMESH_METRICS_PORT)"
    )
    agent.set_defaults(func=_agent)

    csi = sub.add_parser("csi", help="run the CSI driver (controller and/or node service)")
    csi.add_argument("--mode", choices=["controller", "node", "all"], required=True)
    csi.add_argument(
        "--endpoint",
        action="append",
        help="unix:///path/to/socket (default unix:///csi/csi.sock), or host:port; repeatable",
    )
    csi.add_argument("--kubeconfig", help="default: the pod's service account")
    csi.add_argument(
        "--namespace", default="flashmesh-system", help="where the agents' Leases live"
    )
    csi.add_argument(
        "--fabric", default="default", help="the NVMe-oF fabric this driver serves (topology)"
    )
    csi.add_argument(
        "--wait", type=float, default=120.0, help="seconds a call waits for the storage agents"
    )
    csi.add_argument(
        "--metrics-port", type=int, help="serve /metrics here (default: $FLASHMESH_METRICS_PORT)"
    )
    csi.set_defaults(func=_csi)

    operator = sub.add_parser(
        "operator", help="run the operator (StoragePools, StorageNodes, TrainingWorkloads)"
    )
    operator.add_argument("--kubeconfig", help="default: the pod's service account")
    operator.add_argument(
        "--namespace", default="flashmesh-system", help="where the agents' Leases live"
    )
    operator.add_argument(
        "--resync", type=float, default=10.0, help="seconds between reconciles of a pool"
    )
    operator.add_argument(
        "--standalone", action="store_true", help="one replica, no peering (always on)"
    )
    operator.add_argument(
        "--metrics-port", type=int, help="serve /metrics here (default: $FLASHMESH_METRICS_PORT)"
    )
    operator.add_argument(
        "--liveness", help="kopf's health endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    operator.set_defaults(func=_operator)

    status = sub.add_parser("status", help="show the pools, nodes, volumes and paths")
    status.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    status.set_defaults(func=_status)

    bench = sub.add_parser(
        "bench", help="run benchmarks against same-run baselines (from a checkout; root for VMs)"
    )
    bench.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run, or all")
    bench.add_argument("--list", action="store_true", help="list the benchmarks")
    bench.add_argument(
        "--table", action="store_true",
        help="rebuild docs/benchmarks.md from the latest result of each benchmark",
    )  # fmt: skip
    bench.add_argument("--dir", help="working folder (default: in the lab cache)")
    bench.set_defaults(func=_bench)

    lab = sub.add_parser(
        "lab", help="the local lab: a real control plane (and VMs) on this machine"
    )
    lab.set_defaults(func=_lab)
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    cluster = lab_sub.add_parser("cluster", help="a local Kubernetes control plane with KWOK nodes")
    cluster.add_argument("action", choices=["up", "down", "status"])
    cluster.add_argument("--dir", help="the cluster's folder (default: in the lab cache)")
    cluster.add_argument("--nodes", type=int, default=0, help="KWOK nodes to add on `up`")

    demo = lab_sub.add_parser(
        "demo",
        help="FlashMesh end to end: control plane, VMs, a TrainingWorkload's data path (root)",
    )
    demo.add_argument(
        "--cluster-only", action="store_true",
        help="only the control plane with KWOK nodes, the CRDs and the samples (no VMs, no root)",
    )  # fmt: skip
    kubelet = lab_sub.add_parser(
        "kubelet",
        help="the lab's kubelet STAND-IN: runs the pods of lab VMs' nodes in the VMs",
    )
    kubelet.add_argument("--node", action="append", required=True, help="a lab VM; repeatable")
    kubelet.add_argument("--cluster-dir", help="the cluster's folder (default: the lab cache)")
    demo.add_argument("--dir", help="the demo's folder (default: in the lab cache)")

    up = lab_sub.add_parser("up", help="boot the VM lab: storage and GPU VMs on Debian's kernel")
    up.add_argument("--storage", type=int, default=2, help="storage VMs (default 2)")
    up.add_argument("--gpus", type=int, default=1, help="GPU VMs (default 1)")
    for name, text in (
        ("down", "stop every VM and remove the lab"),
        ("status", "list the VMs, their addresses and host NQNs"),
    ):
        lab_sub.add_parser(name, help=text)
    run = lab_sub.add_parser("exec", help="run a shell command in a VM")
    run.add_argument("vm")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    run.add_argument("--timeout", type=float, default=300)
    for p in lab_sub.choices.values():
        if p is not cluster and p is not demo:
            p.add_argument("--dir", help="the lab's folder (default: in the lab cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
