"""The kernel lab for e2e scenarios: four VMs booted once per session inside the session's
lab namespace (see the repository's conftest.py): two storage nodes with emulated NVMe
drives and two GPU nodes that connect to them; and the storage agents, started once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from _pytest.runner import runtestprotocol
from agents import (
    NODES,
    agent_running,
    fabric_up,
    lease_renewed,
    leave_nothing_behind,
    node_name,
    node_status,
    run_agents,
    start_agent,
)
from helpers import GPU0, GPU1, STORAGE0, STORAGE1, Scenario

from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.netns import LabNetwork
from flashmesh.lab.rerun import forget_failed_fixtures
from flashmesh.lab.vm import Lab

# The session's lab and agents, once made: the rerun hook and the revival need them.
_SESSION: dict[str, object] = {}


# The scenarios that run the CSI sidecars, csi-sanity or helm: scripts/setup.sh may still
# be building those in the background when the tests start, so they come last.
NEED_CSI_TOOLS = ("test_csi_kubernetes.py", "test_csi_sanity.py", "test_workload.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The demo boots a lab of its own: in a session that runs it with the others, it runs
    before the first scenario boots the session's lab. The scenarios that need the CSI
    tools run after every other scenario."""
    demo = [i for i in items if i.path.name == "test_demo.py"]
    rest = [i for i in items if i.path.name != "test_demo.py"]
    first = next((n for n, i in enumerate(rest) if i.path.parent.name == "e2e"), len(rest))
    scenarios = rest[first:]
    later = [i for i in scenarios if i.path.name in NEED_CSI_TOOLS]
    sooner = [i for i in scenarios if i.path.name not in NEED_CSI_TOOLS]
    items[:] = rest[:first] + demo + sooner + later


@pytest.fixture(scope="session")
def lab(
    lab_network: LabNetwork, tmp_path_factory: pytest.TempPathFactory, summary: list[str]
) -> Iterator[Lab]:
    with Lab(tmp_path_factory.mktemp("lab") / "vms", network=lab_network) as booted:
        booted.up([STORAGE0, STORAGE1, GPU0, GPU1])
        _SESSION["lab"], _SESSION["summary"] = booted, summary
        try:
            yield booted
        finally:
            _SESSION.clear()


@pytest.fixture(scope="session")
def agents(lab: Lab, crds: LocalCluster) -> Iterator[LocalCluster]:
    """A storage agent running in each storage VM, with its pool and StorageNodes."""
    for cluster in run_agents(lab, crds):
        _SESSION["agents"] = cluster
        yield cluster


@pytest.fixture(autouse=True)
def _healthy_vms(request: pytest.FixtureRequest) -> None:
    """A VM that died in one scenario (its guest kernel panicked) is booted again before
    the next, so one crash does not fail every scenario after it. When the session runs
    agents, a storage VM without one (revived here, or rebooted by a scenario that knows
    nothing of agents) gets its fabric and its agent back, and is Ready before the next."""
    if "lab" not in request.fixturenames:
        return
    lab: Lab = request.getfixturevalue("lab")
    revived = lab.revive()
    cluster = _SESSION.get("agents")
    if not isinstance(cluster, LocalCluster):
        return
    for spec in NODES:
        if spec.name in revived or not agent_running(lab, spec):
            before = lease_renewed(cluster, spec.name)
            fabric_up(lab, spec)
            start_agent(lab, spec)
            name = node_name(spec.name)
            processes.wait_until(
                lambda n=name, vm=spec.name, b=before: (
                    lease_renewed(cluster, vm) != b
                    and node_status(cluster, n).get("phase") == "Ready"
                ),
                300,
            )


def _panics(lab: Lab) -> int:
    """Guest kernel panics so far, over every VM's console log."""
    return sum(
        log.read_text(errors="replace").count("Kernel panic")
        for log in (lab.workdir / "logs").glob("*.console.log")
    )


_PANICS_BEFORE = pytest.StashKey[int]()
_PANICKED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Notes, while the lab is still up, that a failing phase saw a guest kernel panic."""
    outcome = yield
    report = outcome.get_result()
    lab = _SESSION.get("lab")
    seen = item.stash.get(_PANICS_BEFORE, None)
    if report.failed and isinstance(lab, Lab) and seen is not None and _panics(lab) > seen:
        item.stash[_PANICKED] = True
    if report.failed and isinstance(lab, Lab):
        report.sections.append(("lab logs (their last lines)", _log_tails(lab)))


def _log_tails(lab: Lab, lines: int = 25) -> str:
    """The last lines of every component's log in the lab's folder: the lab (and these
    logs) are gone when the session ends, and a CI run leaves only its output."""
    parts = []
    logs = sorted(lab.workdir.glob("*.log")) + sorted((lab.workdir / "logs").glob("*.log"))
    # The CSI driver's first: a long output is cut in its middle, and the calls a
    # scenario makes are the driver's.
    logs.sort(key=lambda log: not log.name.startswith("csi-"))
    for log in logs:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.relative_to(lab.workdir)}\n" + "\n".join(tail))
    return "\n".join(parts)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """A kernel scenario that fails while a VM's guest kernel panics runs once more, on the
    VM booted again, and the summary says so. Under software emulation Debian's kernel
    sometimes panics on its own (double faults in its allocator, rxe's softirq), in about
    one full run in three; a second panic in the same scenario fails it."""
    lab = _SESSION.get("lab")
    if not isinstance(lab, Lab) or item.get_closest_marker("kernel") is None:
        return None
    lines = _SESSION.get("summary")  # (the last item's first attempt tears the lab down)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    item.stash[_PANICS_BEFORE] = _panics(lab)
    item.stash[_PANICKED] = False
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(r.failed for r in reports) and item.stash[_PANICKED]:
        if isinstance(lines, list):
            lines.append(
                f"{item.name}: a guest kernel panicked while it ran; run again on the rebooted VM"
            )
        del item.stash[_PANICS_BEFORE]  # the second attempt is not retried
        # A module fixture's error would fail it again, and what a module fixture started
        # in the VM that panicked (a node plugin) is gone: both are set up afresh.
        forget_failed_fixtures(item, every_module_one=True)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


@pytest.fixture(autouse=True)
def _agents_left_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each scenario with the agents, whatever it left (a failed scenario stops
    before its own clean-up) is deleted through the agents, so the next scenario finds
    empty targets and its exact checks of configfs and LVM hold."""
    yield
    if "agents" in request.fixturenames:
        leave_nothing_behind(request.getfixturevalue("lab"), request.getfixturevalue("agents"))


@pytest.fixture
def scenario(request: pytest.FixtureRequest, summary: list[str]) -> Scenario:
    return Scenario(request.node.name, summary, time.monotonic())
