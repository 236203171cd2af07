"""The storage agent in two storage VMs against the real API server: it registers each node
with its real drives, exports a Volume's two segments, lets exactly the allowed host in
(verified I/O over a stripe of both), cuts off a removed host, and leaves nothing behind
when the Volume is deleted."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import (
    GPU0,
    MIB,
    STORAGE0,
    STORAGE1,
    WRONG_KEY_REFUSALS,
    Scenario,
    assert_verified,
    fio_result,
    sh,
)

from flashmesh.core import naming, resources
from flashmesh.dataplane.agent import HOST_NQN_ANNOTATION, KEY_LABEL
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.netns import bridge_address
from flashmesh.lab.vm import Lab, VmSpec, host_nqn

pytestmark = pytest.mark.kernel

API = resources.API_VERSION
POOL = "agents"
NODES = (STORAGE0, STORAGE1)
GPU = GPU0.name


UNEXPORT_ALL = (
    "from flashmesh.dataplane.target import configfs as c, planner as p, model as m; "
    "fs = c.Fs(c.NVMET_ROOT); c.apply(fs, p.plan(m.Target(), c.observe(fs)))"
)


def node_name(vm: str) -> str:
    """The agents' StorageNode names, apart from the samples other tests create."""
    return f"agent-{vm}"


def agent_log(lab: Lab, vm: str) -> str:
    return (lab.workdir / f"agent-{vm}.log").read_text(errors="replace")[-3000:]


def start_agent(lab: Lab, spec: VmSpec) -> None:
    """The agent as a long-running process in the VM, its log in the lab's share."""
    lab.spawn(
        spec.name,
        f"exec {sys.executable} -m flashmesh.cli agent --node {node_name(spec.name)} "
        f"--address {spec.address(0)} --kubeconfig /lab/agent.kubeconfig --interval 1 "
        f">> /lab/agent-{spec.name}.log 2>&1",
    )


@pytest.fixture(scope="module")
def agents(lab: Lab, crds: LocalCluster) -> Iterator[LocalCluster]:
    """The pool and StorageNodes the operator will own (spec.pool set by hand until it
    lands), and an agent running in each storage VM."""
    kube = crds.kube
    kube.create({
        "apiVersion": API, "kind": "StoragePool", "metadata": {"name": POOL},
        "spec": {"nodeSelector": {"matchLabels": {"pool": POOL}},
                 "drives": {"pathPatterns": ["/dev/nvme*n1"], "minSize": "900Mi"},
                 "transports": ["rdma", "tcp"]},
    })  # fmt: skip
    kubeconfig = lab.workdir / "agent.kubeconfig"  # in the lab's share: every VM sees it
    kubeconfig.write_text(crds.portable_kubeconfig(bridge_address(0)))
    # storage-0 has soft-RoCE on its fabric link, storage-1 has not; storage-1's third drive
    # holds a filesystem that the pool's selection matches.
    sh(lab, STORAGE0.name, "rxe_up eth0")
    ext4 = lab.drive_serial(STORAGE1.name, 2)
    sh(lab, STORAGE1.name, f"mkfs.ext4 -q -F $(drive_by_serial {ext4})")
    for spec in NODES:
        kube.create({"apiVersion": API, "kind": "StorageNode",
                     "metadata": {"name": node_name(spec.name), "labels": {"pool": POOL}},
                     "spec": {"pool": POOL}})  # fmt: skip
        start_agent(lab, spec)
    try:
        yield crds
    finally:
        for spec in NODES:
            lab.exec(spec.name, "pkill -f 'flashmesh.cli agent' || true", check=False)
            # Whatever a failed test left exported goes, so later scenarios find a clean
            # target: FlashMesh's own planner, asked for nothing.
            lab.exec(spec.name, f"{sys.executable} -c '{UNEXPORT_ALL}'", check=False)


def create_volume(kube: Any, csi_name: str, vms: list[str], segment: str, hosts: list[str]) -> str:
    """A Volume striped over one segment per VM's node, as the CSI controller will write
    it; its id."""
    vid = naming.volume_id(csi_name)
    segments = [
        {"index": i, "replica": 0, "node": node_name(vm), "size": segment}
        for i, vm in enumerate(vms)
    ]
    size = f"{len(vms) * int(segment.removesuffix('Mi'))}Mi"
    kube.create({
        "apiVersion": API, "kind": "Volume", "metadata": {"name": vid},
        "spec": {"csiName": csi_name, "pool": POOL, "size": size,
                 "layout": {"stripeWidth": len(vms), "replicas": 1},
                 "segments": segments, "hosts": hosts},
    })  # fmt: skip
    return vid


def node_status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return (cluster.kube.get(API, "StorageNode", name) or {}).get("status") or {}


def test_agents_register_their_nodes_with_the_real_drives(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    for spec in NODES:
        name = node_name(spec.name)
        ready = processes.wait_until(
            lambda n=name: node_status(agents, n).get("phase") == "Ready", 300
        )
        assert ready, f"{name}: {node_status(agents, name)}\n{agent_log(lab, spec.name)}"
        status = node_status(agents, name)
        serial = lab.drive_serial(spec.name, 1 if spec is STORAGE1 else 4)
        (chosen,) = [d for d in status["drives"] if d["selected"]]
        assert (chosen["serial"], chosen["size"], chosen["model"]) == (
            serial,
            "1Gi",
            "QEMU NVMe Ctrl",
        )
        assert all(not d["selected"] for d in status["drives"] if d["serial"] != serial)
        group = status["volumeGroup"]
        assert group["name"] == f"flashmesh-{POOL}" and group["thinPool"]["name"] == "thin"
        assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"

    # Soft-RoCE on storage-0's fabric address: rdma is advertised there, and only there.
    rdma0 = node_status(agents, node_name(STORAGE0.name))
    tcp = {"transport": "tcp", "address": STORAGE0.address(0), "port": 4420}
    assert rdma0["endpoints"] == [{**tcp, "transport": "rdma"}, tcp]
    (rxe,) = rdma0["rdmaDevices"]
    assert (rxe["name"], rxe["state"], rxe["linkLayer"], rxe["netdev"]) == (
        "rxe0",
        "ACTIVE",
        "Ethernet",
        "eth0",
    )
    plain = node_status(agents, node_name(STORAGE1.name))
    assert plain["endpoints"] == [
        {"transport": "tcp", "address": STORAGE1.address(0), "port": 4420}
    ]
    assert plain.get("rdmaDevices") == []

    # The drive holding a filesystem was refused, said so, and was left as it was.
    ext4 = sh(lab, STORAGE1.name, f"drive_by_serial {lab.drive_serial(STORAGE1.name, 2)}").strip()
    drives = {c["type"]: c for c in plain["conditions"]}["DrivesReady"]
    assert (drives["status"], drives["reason"]) == ("False", "DriveInUse")
    fix = f"{ext4} holds a ext4 signature: wipe it (wipefs -a) or exclude it by path"
    assert fix in drives["message"]
    events = agents.kube.list("v1", "Event", namespace="default")
    about = [e for e in events if e["involvedObject"]["name"] == node_name(STORAGE1.name)]
    assert any(e["reason"] == "DriveInUse" and ext4 in e["message"] for e in about), about
    assert sh(lab, STORAGE1.name, f"blkid -p -o value -s TYPE {ext4}").strip() == "ext4"
    scenario.done(
        "2 agents registered their real drives and VGs; rdma advertised only with rxe; "
        "a drive holding ext4 refused with a condition and an Event, untouched"
    )


def test_a_volume_is_exported_served_and_cleaned_up(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    gpu_nqn = host_nqn(GPU)
    vid = create_volume(kube, "pvc-agent-e2e", [n.name for n in NODES], "64Mi", [gpu_nqn])
    nqns = [naming.subsystem_nqn(vid, i, 0) for i in range(2)]

    def segments() -> list[dict[str, Any]]:
        volume = kube.get(API, "Volume", vid) or {}
        return list((volume.get("status") or {}).get("segments") or [])

    exported = processes.wait_until(
        lambda: len(segments()) == 2 and all(s["ready"] for s in segments()), 300
    )
    assert exported, f"{segments()}\n{agent_log(lab, STORAGE0.name)}"
    assert sorted(s["subsystemNQN"] for s in segments()) == nqns
    assert all(s["hosts"] == [gpu_nqn] for s in segments())

    # The allowed host connects to both segments and does verified I/O over a stripe.
    devices = [
        sh(lab, GPU, f"modprobe nvme-tcp\nnvme connect -t tcp -a {n.address(0)} -s 4420 "
                     f"-n {nqn} --ctrl-loss-tmo=5 --reconnect-delay=1\nnvme_device {nqn}").strip()
        for n, nqn in zip(NODES, nqns, strict=True)
    ]  # fmt: skip
    sh(lab, GPU, f"dmsetup create fmagent --table '0 262144 striped 2 128 "
                 f"{devices[0]} 0 {devices[1]} 0'")  # fmt: skip
    assert_verified(fio_result(sh(lab, GPU, "fio_verify /dev/mapper/fmagent 64M")), 64 * MIB)
    sh(lab, GPU, "dmsetup remove fmagent")

    # A node whose host NQN is not allowed is refused by the target kernel.
    refused = lab.exec(
        STORAGE1.name,
        f"modprobe nvme-tcp\nnvme connect -t tcp -a {STORAGE0.address(0)} -s 4420 -n {nqns[0]}",
        check=False,
    )
    assert refused.rc != 0, refused.output

    # Removing the host from the Volume cuts it off: its paths stop being live.
    data = kube.get(API, "Volume", vid)
    assert data is not None
    data["spec"]["hosts"] = []
    kube.replace(data)
    cut = processes.wait_until(
        lambda: all("=live" not in sh(lab, GPU, f"path_states {nqn}") for nqn in nqns), 180
    )
    assert cut, sh(lab, GPU, "nvme list-subsys")
    # Its next I/O fails (connected with ctrl-loss-tmo=5: the refused reconnects end it).
    read = lab.exec(GPU, f"dd if={devices[0]} of=/dev/null bs=4k count=1 iflag=direct",
                    timeout=240, check=False)  # fmt: skip
    assert read.rc != 0, read.output
    for nqn in nqns:
        sh(lab, GPU, f"nvme disconnect -n {nqn} || true")

    # Deleting the Volume leaves no subsystem, port link or logical volume behind.
    kube.delete(API, "Volume", vid)
    gone = processes.wait_until(lambda: kube.get(API, "Volume", vid) is None, 300)
    assert gone, f"{kube.get(API, 'Volume', vid)}\n{agent_log(lab, STORAGE0.name)}"
    for spec in NODES:
        configfs = sh(
            lab,
            spec.name,
            "ls /sys/kernel/config/nvmet/subsystems /sys/kernel/config/nvmet/ports/*/subsystems",
        )
        assert vid not in configfs, configfs
        lvs = sh(lab, spec.name, f"lvs --noheadings -o lv_name flashmesh-{POOL}").split()
        assert lvs == ["thin"], lvs
    scenario.done(
        "Volume exported on 2 nodes, host verified over a stripe, stranger refused, "
        "removed host cut off, deletion left nothing"
    )


def test_a_rebooted_storage_node_exports_the_same_namespace_and_io_resumes(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    vm = STORAGE1.name
    vid = create_volume(kube, "pvc-agent-reboot", [vm], "64Mi", [host_nqn(GPU)])
    nqn = naming.subsystem_nqn(vid, 0, 0)

    def ready() -> bool:
        status = (kube.get(API, "Volume", vid) or {}).get("status") or {}
        return any(s["ready"] for s in status.get("segments") or [])

    assert processes.wait_until(ready, 300), agent_log(lab, vm)
    device = sh(
        lab,
        GPU,
        f"nvme connect -t tcp -a {STORAGE1.address(0)} -s 4420 -n {nqn} "
        f"--ctrl-loss-tmo=-1 --reconnect-delay=1\nnvme_device {nqn}",
    ).strip()
    nguid = f"cat /sys/block/{device.removeprefix('/dev/')}/nguid"
    before = sh(lab, GPU, nguid).strip()
    assert before.replace("-", "") == naming.namespace_nguid(nqn).replace("-", "")
    assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 32M")), 32 * MIB)

    lab.kill(vm)  # pulled: nvmet's configfs is gone with the kernel
    lab.restart(vm)
    start_agent(lab, STORAGE1)
    assert processes.wait_until(
        lambda: sh(lab, GPU, f"path_states {nqn}").split() == [f"{STORAGE1.address(0)}=live"],
        300,
    ), agent_log(lab, vm)
    # The host kept its device (same namespace identifiers) and reads back what it wrote.
    assert sh(lab, GPU, nguid).strip() == before
    verified = fio_result(sh(lab, GPU, f"fio_verify {device} 32M --verify_only"))
    assert verified["error"] == 0 and verified["read"]["io_bytes"] == 32 * MIB
    sh(lab, GPU, f"nvme disconnect -n {nqn} || true")
    kube.delete(API, "Volume", vid)
    assert processes.wait_until(lambda: kube.get(API, "Volume", vid) is None, 300)
    scenario.done(
        "storage-1 pulled and rebooted: agent rebuilt the export, same NGUID, "
        "the connected host resumed and verified its data"
    )


def test_with_authentication_only_the_keyed_host_gets_in_and_keys_rotate(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    vm = STORAGE0.name
    gpu = host_nqn(GPU)
    keys = [sh(lab, GPU, f"nvme gen-dhchap-key -n {gpu}").strip() for _ in range(2)]
    if kube.get("v1", "Namespace", "flashmesh-system") is None:
        kube.create({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": "flashmesh-system"}})  # fmt: skip
    secret = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "dhchap-gpu-0", "namespace": "flashmesh-system",
                     "labels": {KEY_LABEL: "true"}, "annotations": {HOST_NQN_ANNOTATION: gpu}},
        "stringData": {"key": keys[0]},
    }  # fmt: skip
    kube.create(secret)
    kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": True}}})
    vid = create_volume(kube, "pvc-agent-auth", [vm], "32Mi", [gpu])
    nqn = naming.subsystem_nqn(vid, 0, 0)
    host_key = f"cat /sys/kernel/config/nvmet/hosts/{gpu}/dhchap_key"
    connect = (
        f"modprobe nvme-tcp\n"
        f"nvme connect -t tcp -a {STORAGE0.address(0)} -s 4420 -n {nqn} --dhchap-secret="
    )
    try:
        for active, stale in ((keys[0], keys[1]), (keys[1], keys[0])):
            assert processes.wait_until(
                lambda k=active: sh(lab, vm, host_key, check=False).strip() == k, 300
            ), agent_log(lab, vm)
            refused = lab.exec(GPU, f"{connect}'{stale}'", check=False)
            assert refused.rc != 0 and any(m in refused.output for m in WRONG_KEY_REFUSALS)
            device = sh(lab, GPU, f"{connect}'{active}'\nnvme_device {nqn}").strip()
            assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 16M")), 16 * MIB)
            sh(lab, GPU, f"nvme disconnect -n {nqn}")
            secret["stringData"] = {"key": keys[1]}  # rotate
            current = kube.get("v1", "Secret", "dhchap-gpu-0", "flashmesh-system")
            assert current is not None
            kube.replace({**secret, "metadata": current["metadata"]})
    finally:
        sh(lab, GPU, f"nvme disconnect -n {nqn} || true")
        kube.delete(API, "Volume", vid)
        kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": False}}})
        kube.delete("v1", "Secret", "dhchap-gpu-0", "flashmesh-system")
    assert processes.wait_until(lambda: kube.get(API, "Volume", vid) is None, 300)
    scenario.done(
        "DH-HMAC-CHAP from a Secret: stale key refused, right key verified, "
        "rotated key applied by the agent"
    )
