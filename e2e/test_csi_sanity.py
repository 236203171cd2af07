"""csi-sanity v5.4 (built from its Go module) against FlashMesh's driver in the lab: the
controller on the lab network, the node plugin and csi-sanity itself in a GPU VM, the
agents in the two storage VMs; striped volumes (2 segments), mount and block access."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator

import pytest
from agents import POOL
from csi import NODE_SOCKET, controller, controller_log, node_log, start_node_plugin
from helpers import GPU0, Scenario

from flashmesh.lab.binaries import locate_csi
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab

pytestmark = pytest.mark.kernel

VM = GPU0.name
SIZE = 64 << 20


@pytest.fixture(scope="module")
def driver(lab: Lab, agents: LocalCluster) -> Iterator[str]:
    with controller(lab, agents) as address:
        start_node_plugin(lab, agents, VM)
        yield address


@pytest.mark.parametrize("access", ["mount", "block"])
def test_csi_sanity_passes(lab: Lab, driver: str, access: str, scenario: Scenario) -> None:
    sanity = locate_csi().csi_sanity
    params = lab.workdir / "sanity-params.yaml"
    params.write_text(f'pool: {POOL}\nstripeWidth: "2"\n')
    report = f"sanity-{access}.xml"
    # The controller's specs do not depend on the access type (it validates a capability of
    # either kind the same way): they run once, with mount; block runs the node's specs.
    focus = "--ginkgo.focus='Node Service' " if access == "block" else ""
    run = lab.exec(
        VM,
        f"rm -rf /run/csi-sanity && mkdir -p /run/csi-sanity && cd /run/csi-sanity && "
        f"{sanity} --csi.endpoint=unix://{NODE_SOCKET} "
        f"--csi.controllerendpoint=dns:///{driver} "
        f"--csi.stagingdir=/run/csi-sanity/staging --csi.mountdir=/run/csi-sanity/mount "
        f"--csi.testvolumesize={SIZE} --csi.testvolumeexpandsize={2 * SIZE} "
        f"--csi.testvolumeparameters=/lab/{params.name} --csi.testvolumeaccesstype={access} "
        f"--csi.junitfile=/lab/{report} -ginkgo.timeout=2h {focus}"
        f"> /lab/sanity-{access}.log 2>&1",
        timeout=3600,
        check=False,
    )
    log = (lab.workdir / f"sanity-{access}.log").read_text(errors="replace")
    cases = ET.parse(lab.workdir / report).getroot().iter("testcase")
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
        f"failed: {failed}\n{log[-6000:]}\n--- controller ---\n{controller_log(lab)}"
        f"\n--- node ---\n{node_log(lab, VM)}"
    )
    assert len(passed) > (20 if access == "block" else 40)
    scenario.done(
        f"csi-sanity {access}, 2-way stripes: {len(passed)} specs passed, "
        f"{sum(skipped.values())} skipped ({reasons or 'none'})"
    )
