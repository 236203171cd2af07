"""csi-sanity v5.4 (built from its Go module) against FlashMesh's driver in the lab: the
controller on the lab network, a node plugin and csi-sanity itself in each GPU VM (the
mount and block passes run at once, then the one spec that must run alone), the agents in
the two storage VMs; striped volumes (2 segments), mount and block access."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agents import POOL
from csi import (
    NODE_SOCKET,
    controller,
    controller_log,
    node_log,
    start_node_plugin,
    stop_node_plugin,
)
from helpers import GPU0, GPU1, Scenario

from flashmesh.lab.binaries import locate_csi
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab

pytestmark = pytest.mark.kernel

# The two passes run at once, each from its own GPU VM with its own node plugin: mount on
# gpu-0, block on gpu-1 (csi-sanity names every volume uniquely, so they share the
# controller and the agents without meeting).
VMS = {"mount": GPU0.name, "block": GPU1.name}
SIZE = 64 << 20
# The one spec that counts every volume of the driver: it lists, creates one and expects
# the list one longer, so a volume the other pass made meanwhile fails it. The mount pass
# skips it, and it runs by itself once both passes are done.
ALONE = "check the presence of new volumes and absence of deleted ones"


@dataclass
class Run:
    rc: int
    log: str
    reports: list[Path]


@pytest.fixture(scope="module")
def runs(lab: Lab, agents: LocalCluster) -> Iterator[dict[str, Run]]:
    """Both csi-sanity passes, started together and awaited."""
    with controller(lab, agents) as address:
        for vm in VMS.values():
            start_node_plugin(lab, agents, vm)
        try:
            params = lab.workdir / "sanity-params.yaml"
            params.write_text(f'pool: {POOL}\nstripeWidth: "2"\n')
            jobs = {access: lab.spawn(vm, sanity_command(access, access, address, params.name))
                    for access, vm in VMS.items()}  # fmt: skip
            done = {access: lab.wait(VMS[access], job, timeout=3600)
                    for access, job in jobs.items()}  # fmt: skip
            alone = lab.wait(
                VMS["mount"],
                lab.spawn(VMS["mount"], sanity_command("alone", "mount", address, params.name)),
                timeout=600,
            )
            yield {
                "mount": _run([("mount", done["mount"].rc), ("alone", alone.rc)], lab),
                "block": _run([("block", done["block"].rc)], lab),
            }
        finally:
            stop_node_plugin(lab, VMS["block"])


def _run(parts: list[tuple[str, int]], lab: Lab) -> Run:
    """One access type's result, from the invocations that made it (by name, exit code)."""
    return Run(
        max(rc for _, rc in parts),
        "\n".join(
            (lab.workdir / f"sanity-{name}.log").read_text(errors="replace") for name, _ in parts
        ),
        [lab.workdir / f"sanity-{name}.xml" for name, _ in parts],
    )


def sanity_command(name: str, access: str, address: str, params: str) -> str:
    sanity = locate_csi().csi_sanity
    work = f"/run/csi-sanity-{name}"
    # The controller's specs do not depend on the access type (it validates a capability of
    # either kind the same way): they run once, with mount; block runs the node's specs.
    focus = {
        "block": "--ginkgo.focus='Node Service' ",
        "mount": f"--ginkgo.skip='{ALONE}' ",
        "alone": f"--ginkgo.focus='{ALONE}' ",
    }[name]
    return (
        f"rm -rf {work} && mkdir -p {work} && cd {work} && "
        f"exec {sanity} --csi.endpoint=unix://{NODE_SOCKET} "
        f"--csi.controllerendpoint=dns:///{address} "
        f"--csi.stagingdir={work}/staging --csi.mountdir={work}/mount "
        f"--csi.testvolumesize={SIZE} --csi.testvolumeexpandsize={2 * SIZE} "
        f"--csi.testvolumeparameters=/lab/{params} --csi.testvolumeaccesstype={access} "
        f"--csi.junitfile=/lab/sanity-{name}.xml -ginkgo.timeout=2h {focus}"
        f"> /lab/sanity-{name}.log 2>&1"
    )


@pytest.mark.parametrize("access", ["mount", "block"])
def test_csi_sanity_passes(lab: Lab, runs: dict[str, Run], access: str, scenario: Scenario) -> None:
    run = runs[access]
    cases = [c for report in run.reports for c in ET.parse(report).getroot().iter("testcase")]
    passed, skipped, failed = [], Counter[str](), []
    for case in cases:
        name = case.get("name", "")
        skip = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif skip is not None:
            skipped[(skip.get("message") or "no reason given").strip()[:160]] += 1
        else:
            passed.append(name)
    reasons = "; ".join(f"{n} x {why}" for why, n in skipped.most_common())
    print(f"csi-sanity {access}: {len(passed)} passed, {sum(skipped.values())} skipped ({reasons})")
    assert run.rc == 0 and not failed, (
        f"failed: {failed}\n{run.log[-6000:]}\n--- controller ---\n{controller_log(lab)}"
        f"\n--- node ---\n{node_log(lab, VMS[access])}"
    )
    assert len(passed) > (20 if access == "block" else 40)
    if access == "mount":
        assert any(ALONE in name for name in passed), f"the spec {ALONE!r} did not run"
    scenario.done(
        f"csi-sanity {access} (from {VMS[access]}, alongside the other pass), 2-way stripes: "
        f"{len(passed)} specs passed, {sum(skipped.values())} skipped ({reasons or 'none'})"
    )
