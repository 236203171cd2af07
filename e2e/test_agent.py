"""The storage agent in two storage VMs against the real API server: it registers each node
with its real drives, exports a Volume's two segments, lets exactly the allowed host in
(verified I/O over a stripe of both), cuts off a removed host, and leaves nothing behind
when the Volume is deleted."""

from __future__ import annotations

from typing import Any

import pytest
from agents import (
    API,
    NAMESPACE,
    NODES,
    POOL,
    agent_log,
    agent_passes,
    all_ready,
    create_volume,
    delete_and_wait,
    exported,
    logical_volumes,
    node_name,
    node_status,
    restart_storage,
    segments,
    set_hosts,
    start_agent,
    stop_agent,
)
from helpers import (
    GPU0,
    GPU1,
    LIB,
    MIB,
    STORAGE0,
    STORAGE1,
    WRONG_KEY_REFUSALS,
    Scenario,
    assert_verified,
    fio_result,
    sh,
)

from flashmesh.core import naming
from flashmesh.dataplane.agent import HOST_NQN_ANNOTATION, KEY_LABEL
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab, host_nqn

pytestmark = pytest.mark.kernel

GPU = GPU0.name


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
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Ready"]["status"] == "True"
        # The host NQN from the VM's SMBIOS UUID, claimed by this node only.
        assert status["hostNQN"] == host_nqn(spec.name)
        assert conditions["HostNQNUnique"]["status"] == "True"
        # The heartbeat: a Lease renewed on every pass.
        lease = f"flashmesh-agent-{name}"

        def renewed(lease: str = lease) -> str:
            found = agents.kube.get("coordination.k8s.io/v1", "Lease", lease, NAMESPACE)
            return str((found or {}).get("spec", {}).get("renewTime", ""))

        first = renewed()
        assert first, f"no Lease {NAMESPACE}/{lease}"
        assert processes.wait_until(lambda f=first: renewed() > f, 60)

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
    # So was the drive with conflicting signatures (blkid's exit 8 read as blank before).
    both = sh(lab, STORAGE1.name, f"drive_by_serial {lab.drive_serial(STORAGE1.name, 3)}")
    both = both.strip()
    conflicting = (
        f"{both} holds several conflicting signatures (blkid: ambivalent result): "
        "wipe it (wipefs -a) or exclude it by path"
    )
    assert conflicting in drives["message"], drives["message"]
    assert lab.exec(STORAGE1.name, f"blkid -p {both}", check=False).rc == 8
    events = agents.kube.list("v1", "Event", namespace="default")
    about = [e for e in events if e["involvedObject"]["name"] == node_name(STORAGE1.name)]
    assert any(e["reason"] == "DriveInUse" and ext4 in e["message"] for e in about), about
    assert sh(lab, STORAGE1.name, f"blkid -p -o value -s TYPE {ext4}").strip() == "ext4"
    scenario.done(
        "2 agents registered their real drives and VGs; rdma advertised only with rxe; "
        "a drive holding ext4 and one with conflicting signatures refused with a condition "
        "and an Event, untouched"
    )


def test_a_volume_connected_on_a_storage_node_is_never_pooled(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    """One machine both storage and GPU node: a FlashMesh volume connected there is, to
    lsblk and blkid, a blank NVMe drive as big as one; the agent's drive selection took
    it (the pool's pattern and minimum size match) and extended its volume group over
    someone's volume."""
    kube = agents.kube
    host, name = STORAGE0.name, node_name(STORAGE0.name)
    vid = create_volume(kube, "pvc-agent-looped", [STORAGE1.name], "1024Mi", [host_nqn(host)])
    nqn = naming.subsystem_nqn(vid, 0, 0)
    try:
        assert processes.wait_until(lambda: all_ready(kube, vid), 120), agent_log(lab, "storage-1")
        device = sh(
            lab,
            host,
            f"modprobe nvme-tcp\nnvme connect -t tcp -a {STORAGE1.address(0)} -s 4420 -n {nqn}"
            f" >/dev/null\nnvme_device {nqn}",
        ).strip()
        # The agent probes its drives when it starts (and on its slow resync).
        stop_agent(lab, STORAGE0)
        start_agent(lab, STORAGE0)
        why = f"{device} is an NVMe-oF namespace (tcp, subsystem {nqn})"

        def drives() -> dict[str, Any]:
            found = node_status(agents, name).get("conditions") or []
            return next((c for c in found if c["type"] == "DrivesReady"), {})

        refused = processes.wait_until(lambda: why in drives().get("message", ""), 300)
        assert refused, (drives(), agent_log(lab, host))
        assert drives()["reason"] == "DriveInUse"
        assert "only local drives are pooled" in drives()["message"]
        members = sh(lab, host, f"pvs --noheadings -o pv_name -S vg_name=flashmesh-{POOL}").split()
        assert device not in members and len(members) == 1, members
    finally:
        lab.exec(host, f"nvme disconnect -n {nqn} >/dev/null", check=False)
        delete_and_wait(kube, "Volume", vid)
    scenario.done(
        f"a 1 GiB FlashMesh volume connected on {host} (a storage node that is also a GPU "
        "node): refused as an NVMe-oF namespace, its volume group untouched"
    )


# GPU-1 writes and verifies in a loop until /lab/stop-io exists; each pass says whether it
# began before or after /lab/cut-done appeared, and how it ended.
# Dropping GPU-0 relinks the subsystems, so GPU-1 reconnects too. The guest's nvme-tcp
# (6.12) may send from the submitting process without MSG_NOSIGNAL: a send on the reset
# socket then raises SIGPIPE in fio, not an I/O error. The loop ignores SIGPIPE (fio
# inherits that) to check what matters here: every pass's data verified.
IO_LOOP = """
trap '' PIPE
rm -f /lab/io-loop.log
while [ ! -e /lab/stop-io ]; do
  when=before; [ -e /lab/cut-done ] && when=after
  if fio_verify /dev/mapper/fmagent 16M > /lab/io-pass.json 2>&1 \\
      && grep -q '"error" : 0' /lab/io-pass.json; then
    echo "ok $when" >> /lab/io-loop.log
  else
    echo "FAIL $when" >> /lab/io-loop.log; cat /lab/io-pass.json >> /lab/io-loop.log; exit 1
  fi
done
"""


def connect_stripe(lab: Lab, gpu: str, nqns: list[str], ctrl_loss_tmo: int) -> list[str]:
    """Connects a GPU VM to both segments and assembles them as /dev/mapper/fmagent."""
    devices = [
        sh(lab, gpu, f"modprobe nvme-tcp\nnvme connect -t tcp -a {n.address(0)} -s 4420 "
                     f"-n {nqn} --ctrl-loss-tmo={ctrl_loss_tmo} --reconnect-delay=1\n"
                     f"nvme_device {nqn}").strip()
        for n, nqn in zip(NODES, nqns, strict=True)
    ]  # fmt: skip
    sh(lab, gpu, f"dmsetup create fmagent --table '0 262144 striped 2 128 "
                 f"{devices[0]} 0 {devices[1]} 0'")  # fmt: skip
    return devices


def test_a_volume_is_exported_on_its_watch_event_and_no_unchanged_status_is_written(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    """The agent acts on the watch event of a Volume created while it runs, with no poll
    in between, and a pass that changes nothing writes nothing."""
    kube = agents.kube
    node = STORAGE1
    settled = processes.wait_until(
        lambda: agent_passes(node)["finished"] == sum(
            v for k, v in agent_passes(node).items() if k != "finished"
        ), 120
    )  # fmt: skip
    assert settled, agent_log(lab, node.name)
    before = agent_passes(node)
    vid = create_volume(kube, "pvc-agent-watched", [node.name], "16Mi", [])
    assert processes.wait_until(lambda: all_ready(kube, vid), 120), agent_log(lab, node.name)
    after = agent_passes(node)
    assert after["event"] > before["event"], (before, after)
    assert (after["retry"], after["resync"]) == (before["retry"], before["resync"]), (
        "a pass came from a timer, not from the Volume's watch event",
        before,
        after,
    )
    # A change that concerns the node but leaves every status as it is: one pass, no write.
    assert processes.wait_until(
        lambda: agent_passes(node)["finished"] == sum(
            v for k, v in agent_passes(node).items() if k != "finished"
        ), 60
    )  # fmt: skip
    writes = agents.request_counts()
    passes = agent_passes(node)
    kube.patch(API, "Volume", vid, {"metadata": {"labels": {"poked": "yes"}}})
    assert processes.wait_until(lambda: agent_passes(node)["finished"] > passes["finished"], 60), (
        agent_log(lab, node.name)
    )
    now = agents.request_counts()
    status_writes = {
        key: now[key] - writes[key]
        for key in now
        if key[2] == "status" and key[0] in ("PATCH", "APPLY", "PUT")
        and key[1] in ("volumes", "storagenodes", "snapshots")
        and now[key] != writes[key]
    }  # fmt: skip
    assert not status_writes, f"unchanged status written again: {status_writes}"
    assert delete_and_wait(kube, "Volume", vid), agent_log(lab, node.name)
    scenario.done(
        f"a Volume exported after {after['event'] - before['event']:.0f} event pass(es), "
        "no timer pass; a pass with nothing changed wrote no status"
    )


def test_a_volume_is_exported_served_and_cleaned_up(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    gpus = [host_nqn(GPU), host_nqn(GPU1.name)]
    vid = create_volume(kube, "pvc-agent-e2e", [n.name for n in NODES], "64Mi", gpus)
    nqns = [naming.subsystem_nqn(vid, i, 0) for i in range(2)]
    exported_ok = processes.wait_until(lambda: all_ready(kube, vid, 2), 300)
    assert exported_ok, f"{segments(kube, vid)}\n{agent_log(lab, STORAGE0.name)}"
    assert sorted(s["subsystemNQN"] for s in segments(kube, vid)) == nqns
    assert all(s["hosts"] == sorted(gpus) for s in segments(kube, vid))

    # Both allowed hosts connect to both segments; GPU-0 does verified I/O over a stripe.
    devices = connect_stripe(lab, GPU, nqns, ctrl_loss_tmo=5)
    assert_verified(fio_result(sh(lab, GPU, "fio_verify /dev/mapper/fmagent 64M")), 64 * MIB)
    sh(lab, GPU, "dmsetup remove fmagent")
    connect_stripe(lab, GPU1.name, nqns, ctrl_loss_tmo=120)

    # A node whose host NQN is not allowed is refused by the target kernel.
    refused = lab.exec(
        STORAGE1.name,
        f"modprobe nvme-tcp\nnvme connect -t tcp -a {STORAGE0.address(0)} -s 4420 -n {nqns[0]}",
        check=False,
    )
    assert refused.rc != 0, refused.output

    # GPU-1's I/O runs while GPU-0 is removed from the Volume, which cuts GPU-0 off.
    for marker in ("stop-io", "cut-done"):
        (lab.workdir / marker).unlink(missing_ok=True)
    io = lab.spawn(GPU1.name, f"set -e\nsource {LIB}\n{IO_LOOP}")
    log = lab.workdir / "io-loop.log"
    assert processes.wait_until(lambda: log.exists() and "ok" in log.read_text(), 120)
    set_hosts(kube, vid, [gpus[1]])
    cut = processes.wait_until(
        lambda: all("=live" not in sh(lab, GPU, f"path_states {nqn}") for nqn in nqns), 180
    )
    assert cut, sh(lab, GPU, "nvme list-subsys")
    (lab.workdir / "cut-done").touch()
    # GPU-0's next I/O fails (connected with ctrl-loss-tmo=5: the refused reconnects end it).
    read = lab.exec(GPU, f"dd if={devices[0]} of=/dev/null bs=4k count=1 iflag=direct",
                    timeout=240, check=False)  # fmt: skip
    assert read.rc != 0, read.output
    # GPU-1 kept working: every pass verified, including passes begun after the cut.
    assert processes.wait_until(lambda: "ok after" in log.read_text(), 180), log.read_text()
    (lab.workdir / "stop-io").touch()
    finished = lab.wait(GPU1.name, io, timeout=180)
    passes = log.read_text().split("\n")
    assert finished.rc == 0 and "FAIL" not in log.read_text(), log.read_text()
    for gpu in (GPU, GPU1.name):
        sh(lab, gpu, "dmsetup remove fmagent || true")
        for nqn in nqns:
            sh(lab, gpu, f"nvme disconnect -n {nqn} || true")

    # Deleting the Volume leaves no subsystem, port link or logical volume behind.
    assert delete_and_wait(kube, "Volume", vid), agent_log(lab, STORAGE0.name)
    for spec in NODES:
        subsystems, links = exported(lab, spec.name)
        assert vid not in " ".join(subsystems + links), (subsystems, links)
        assert list(logical_volumes(lab, spec.name)) == ["thin"]
    scenario.done(
        "Volume exported on 2 nodes, host verified over a stripe, stranger refused, "
        f"removed host cut off while the other kept verifying ({len(passes) - 1} passes), "
        "deletion left nothing"
    )


def test_a_rebooted_storage_node_exports_the_same_namespace_and_io_resumes(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    vm = STORAGE1.name
    vid = create_volume(kube, "pvc-agent-reboot", [vm], "64Mi", [host_nqn(GPU)])
    nqn = naming.subsystem_nqn(vid, 0, 0)

    assert processes.wait_until(lambda: all_ready(kube, vid), 300), agent_log(lab, vm)
    device = sh(
        lab,
        GPU,
        f"nvme connect -t tcp -a {STORAGE1.address(0)} -s 4420 -n {nqn} "
        f"--ctrl-loss-tmo=-1 --reconnect-delay=1\nnvme_device {nqn}",
    ).strip()
    nguid = f"cat /sys/block/{device.removeprefix('/dev/')}/nguid"
    before = sh(lab, GPU, nguid).strip()
    assert before.replace("-", "") == naming.namespace_nguid(nqn).replace("-", "")
    # Flushed before the pull: the namespace has a volatile write cache (the drive's, and a
    # thin pool commits new blocks' mappings on a flush), so only flushed writes are owed
    # across a power loss, as on any NVMe drive that reports one.
    written = sh(lab, GPU, f"fio_verify {device} 32M --end_fsync=1")
    assert_verified(fio_result(written), 32 * MIB)

    lab.kill(vm)  # pulled: nvmet's configfs is gone with the kernel
    restart_storage(lab, STORAGE1)
    assert processes.wait_until(
        lambda: sh(lab, GPU, f"path_states {nqn}").split() == [f"{STORAGE1.address(0)}=live"],
        300,
    ), agent_log(lab, vm)
    # The host kept its device (same namespace identifiers) and reads back what it wrote.
    assert sh(lab, GPU, nguid).strip() == before
    verified = fio_result(sh(lab, GPU, f"fio_verify {device} 32M --verify_only"))
    assert verified["error"] == 0 and verified["read"]["io_bytes"] == 32 * MIB
    sh(lab, GPU, f"nvme disconnect -n {nqn} || true")
    assert delete_and_wait(kube, "Volume", vid)
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
    secret = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "dhchap-gpu-0", "namespace": NAMESPACE,
                     "labels": {KEY_LABEL: "true"}, "annotations": {HOST_NQN_ANNOTATION: gpu}},
        "stringData": {"key": keys[0]},
    }  # fmt: skip
    kube.create(secret)
    kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": True}}})
    keyless = host_nqn(GPU1.name)
    vid = create_volume(kube, "pvc-agent-auth", [vm], "32Mi", [gpu, keyless])
    nqn = naming.subsystem_nqn(vid, 0, 0)
    host_key = f"cat /sys/kernel/config/nvmet/hosts/{gpu}/dhchap_key"
    connect = (
        f"modprobe nvme-tcp\n"
        f"nvme connect -t tcp -a {STORAGE0.address(0)} -s 4420 -n {nqn} --dhchap-secret="
    )

    def keyless_left_out(kube: Any, vid: str) -> bool:
        found = segments(kube, vid)
        why = f"no DH-HMAC-CHAP key for {keyless}"
        return (
            len(found) == 1
            and found[0]["hosts"] == [gpu]
            and why in (found[0].get("message") or "")
        )

    try:
        for active, stale in ((keys[0], keys[1]), (keys[1], keys[0])):
            assert processes.wait_until(
                lambda k=active: sh(lab, vm, host_key, check=False).strip() == k, 300
            ), agent_log(lab, vm)
            # A host without a key Secret is left out, and the status says why.
            assert processes.wait_until(lambda: keyless_left_out(kube, vid), 60), segments(
                kube, vid
            )
            refused = lab.exec(GPU, f"{connect}'{stale}'", check=False)
            assert refused.rc != 0 and any(m in refused.output for m in WRONG_KEY_REFUSALS)
            device = sh(lab, GPU, f"{connect}'{active}'\nnvme_device {nqn}").strip()
            assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 16M")), 16 * MIB)
            sh(lab, GPU, f"nvme disconnect -n {nqn}")
            secret["stringData"] = {"key": keys[1]}  # rotate
            current = kube.get("v1", "Secret", "dhchap-gpu-0", NAMESPACE)
            assert current is not None
            kube.replace({**secret, "metadata": current["metadata"]})
        # Authentication off: the kernel cannot clear a key, so the agent makes the host
        # entry again without one, and a keyless connect gets in.
        kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": False}}})
        assert processes.wait_until(
            lambda: sh(lab, vm, host_key, check=False).strip() in ("", "(null)"), 300
        ), agent_log(lab, vm)
        plain = f"modprobe nvme-tcp\nnvme connect -t tcp -a {STORAGE0.address(0)} -s 4420 -n {nqn}"
        device = sh(lab, GPU, f"{plain}\nnvme_device {nqn}").strip()
        assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 16M")), 16 * MIB)
    finally:
        sh(lab, GPU, f"nvme disconnect -n {nqn} || true")
        kube.delete(API, "Volume", vid)
        kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": False}}})
        kube.delete("v1", "Secret", "dhchap-gpu-0", NAMESPACE)
    assert processes.wait_until(lambda: kube.get(API, "Volume", vid) is None, 300)
    scenario.done(
        "DH-HMAC-CHAP from a Secret: stale key refused, right key verified, keyless host "
        "left out, rotated key applied by the agent, keyless once authentication is off"
    )
