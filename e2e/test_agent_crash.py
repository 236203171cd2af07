"""Crash safety: the agent SIGKILLed at 10 points (20 with FLASHMESH_CHAOS=full)
while it reconciles 10 volumes (making them, then deleting, growing and closing some), each
time just before one of its changes to the node (FLASHMESH_CRASH_AT); each pass is its own
process (forked by a guest script that imports FlashMesh once), killed by a real SIGKILL.
Restarted, the agent converges: every volume exported as its object says, and nothing left
over in configfs or LVM."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from agents import (
    API,
    agent_log,
    all_ready,
    create_volume,
    delete_and_wait,
    exported,
    logical_volumes,
    node_name,
    segments,
    set_hosts,
    start_agent,
    stop_agent,
)
from helpers import DIRECT_WRITE, GPU0, MIB, STORAGE0, Scenario, sh

from flashmesh.core import naming, resources
from flashmesh.core.resources import Volume
from flashmesh.csi_driver.controller import host_not_cut_off
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab, host_nqn

pytestmark = pytest.mark.kernel

VM = STORAGE0.name
CRASH_PASSES = Path(__file__).resolve().parent / "guest" / "crash_passes.py"
NVMET = "/sys/kernel/config/nvmet"
# (kills, changes made before each kill) per phase: 20 kills in all with
# FLASHMESH_CHAOS=full, 10 in CI's size (the same phases, each killed half as often).
FULL = os.environ.get("FLASHMESH_CHAOS") == "full"
MAKING = (14, 6) if FULL else (7, 6)
CHANGING = (6, 3) if FULL else (3, 3)
KILLS = MAKING[0] + CHANGING[0]


def killed_passes(lab: Lab, after: int | str, count: int) -> None:
    """`count` agent passes, each SIGKILLed just before its change number `after` (or its
    first change whose description starts with `after`)."""
    command = (
        f"{sys.executable} {CRASH_PASSES} {node_name(VM)} {STORAGE0.address(0)} "
        f"/lab/agent.kubeconfig {after} {count} 2>> /lab/agent-{VM}.log"
    )
    codes = json.loads(sh(lab, VM, command, timeout=1800).strip().splitlines()[-1])
    assert codes == [-9] * count, f"not all killed ({codes}): {agent_log(lab, VM)}"


def test_the_agent_killed_at_many_points_converges_and_leaks_nothing(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    gpu = host_nqn(GPU0.name)
    log_start = len((lab.workdir / f"agent-{VM}.log").read_bytes())
    stop_agent(lab, STORAGE0)
    vids = [create_volume(kube, f"pvc-agent-crash-{i}", [VM], "16Mi", [gpu]) for i in range(10)]
    deleted, grown, closed = vids[:4], vids[4:7], vids[7:]
    try:
        kills, after = MAKING
        killed_passes(lab, after, kills)
        for vid in deleted:
            kube.delete(API, "Volume", vid)
        for vid in grown:
            data = kube.get(API, "Volume", vid)
            assert data is not None
            data["spec"]["size"] = "24Mi"
            data["spec"]["segments"][0]["size"] = "24Mi"
            kube.replace(data)
        for vid in closed:
            set_hosts(kube, vid, [])
        kills, after = CHANGING
        killed_passes(lab, after, kills)
    finally:
        start_agent(lab, STORAGE0)

    log = (lab.workdir / f"agent-{VM}.log").read_bytes()[log_start:].decode(errors="replace")
    points = re.findall(r"crash point: SIGKILL before change \d+ \((\S+) ([^\s)]+)", log)
    assert len(points) == KILLS, log[-3000:]

    live = grown + closed
    converged = processes.wait_until(
        lambda: (
            all(kube.get(API, "Volume", v) is None for v in deleted)
            and all(all_ready(kube, v) for v in live)
        ),
        300,
    )
    assert converged, f"{[segments(kube, v) for v in live]}\n{agent_log(lab, VM)}"
    # Exactly what the objects say, and nothing else: subsystems, port links, hosts, LVs.
    nqns = {naming.subsystem_nqn(v, 0, 0) for v in live}
    subsystems, links = exported(lab, VM)
    ports = sh(lab, VM, f"ls {NVMET}/ports").split()
    assert set(subsystems) == nqns, subsystems
    assert sorted(links) == sorted(list(nqns) * len(ports)), links
    for vid in live:
        nqn = naming.subsystem_nqn(vid, 0, 0)
        allowed = sh(lab, VM, f"ls {NVMET}/subsystems/{nqn}/allowed_hosts").split()
        assert allowed == ([gpu] if vid in grown else []), (vid, allowed)
        nguid = sh(lab, VM, f"cat {NVMET}/subsystems/{nqn}/namespaces/1/device_nguid").strip()
        assert nguid == naming.namespace_nguid(nqn)
        assert sh(lab, VM, f"cat {NVMET}/subsystems/{nqn}/namespaces/1/enable").strip() == "1"
    assert sh(lab, VM, f"ls {NVMET}/hosts").split() == [gpu]
    expected = {naming.segment_lv(v, 0, 0): (24 if v in grown else 16) * MIB for v in live}
    assert logical_volumes(lab, VM) == {"thin": logical_volumes(lab, VM)["thin"], **expected}
    finalizer = f"{resources.GROUP}/agent-{node_name(VM)}"
    for vid in live:
        assert finalizer in (kube.get(API, "Volume", vid) or {})["metadata"]["finalizers"]

    for vid in live:
        assert delete_and_wait(kube, "Volume", vid), agent_log(lab, VM)
    kinds = sorted({f"{op} {arg.rsplit('/', 1)[-1]}" if "/" in arg else op for op, arg in points})
    scenario.done(
        f"agent SIGKILLed at {len(points)} points over 10 volumes, before {len(kinds)} kinds "
        f"of change ({', '.join(kinds)}); "
        "converged with no leftover subsystem, link, host or LV"
    )


def test_a_host_is_cut_off_even_when_the_agent_dies_between_unlink_and_cut_off(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    """The host leaves the Volume's hosts (as ControllerUnpublish makes it) and the agent is
    SIGKILLed after unlinking it, before ending its live controller: the host still writes.
    The agent restarted ends the controller, and the status says the host is cut off only
    then: once ControllerUnpublish would return, the host's next write fails."""
    kube = agents.kube
    gpu = host_nqn(GPU0.name)
    vid = create_volume(kube, "pvc-agent-fence", [VM], "16Mi", [gpu])
    nqn = naming.subsystem_nqn(vid, 0, 0)

    def cut_off() -> str | None:
        data = kube.get(API, "Volume", vid)
        return host_not_cut_off(Volume.from_dict(data) if data else None, gpu)

    try:
        assert processes.wait_until(lambda: all_ready(kube, vid), 120), agent_log(lab, VM)
        dev = sh(lab, GPU0.name, f"modprobe nvme-tcp\nnvme connect -t tcp "
                 f"-a {STORAGE0.address(0)} -s 4420 -n {nqn} --ctrl-loss-tmo=3 "
                 f"--reconnect-delay=1 >/dev/null\nnvme_device {nqn}").strip()  # fmt: skip
        assert sh(lab, GPU0.name, DIRECT_WRITE.format(dev=dev)).strip() == "0"
        stop_agent(lab, STORAGE0)
        set_hosts(kube, vid, [])
        killed_passes(lab, "disconnect", 1)
        allowed = sh(lab, VM, f"ls {NVMET}/subsystems/{nqn}/allowed_hosts").split()
        assert allowed == [], allowed
        # The gap: unlinked, yet its controller lives on (nvmet checks hosts at connect).
        assert sh(lab, GPU0.name, DIRECT_WRITE.format(dev=dev)).strip() == "0"
        assert cut_off() is not None, "the status said the host was gone before its cut-off"
        start_agent(lab, STORAGE0)
        assert processes.wait_until(lambda: cut_off() is None, 120), agent_log(lab, VM)
        code = sh(lab, GPU0.name, DIRECT_WRITE.format(dev=dev)).strip()
        assert code not in ("0", "124"), f"the cut-off host's write: dd exit {code}"
    finally:
        lab.exec(GPU0.name, f"nvme disconnect -n {nqn} >/dev/null", check=False)
        if lab.exec(VM, "pgrep -f 'flashmesh.cli agent'", check=False).rc != 0:
            start_agent(lab, STORAGE0)
        delete_and_wait(kube, "Volume", vid)
    scenario.done(
        f"agent SIGKILLed between unlinking {GPU0.name} and ending its controller: the host "
        "kept writing, the status kept it until the restarted agent cut it off, then its "
        f"next write failed (dd exit {code})"
    )
