"""The lab reruns a scenario once after a guest kernel panic: the rerun must set up
afresh every fixture whose setup failed, module-scoped ones included."""

from __future__ import annotations

import pytest

# A session whose protocol reruns every failed test once, as e2e/conftest.py does after a
# guest kernel panic.
RERUN_CONFTEST = """
import pytest
from _pytest.runner import runtestprotocol
from flashmesh.lab.rerun import forget_failed_fixtures

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(report.failed for report in reports):
        forget_failed_fixtures(item)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
"""

SCENARIOS = """
import pytest

SETUPS = []
TEARDOWNS = []

@pytest.fixture(scope="module")
def lab_run():
    SETUPS.append(1)
    if len(SETUPS) == 1:
        raise RuntimeError("gpu-0 died while running a job")
    yield len(SETUPS)
    TEARDOWNS.append(1)

def test_mount(lab_run):
    assert lab_run == 2

def test_block(lab_run):
    assert lab_run == 2

def test_set_up_twice_torn_down_once():
    assert (len(SETUPS), len(TEARDOWNS)) == (2, 1)
"""


def run(pytester: pytest.Pytester, conftest: str, scenarios: str) -> pytest.RunResult:
    """The scenarios in a session of their own, rerun as the conftest says."""
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_scenarios=scenarios)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def test_a_module_fixture_that_failed_is_set_up_again_on_the_rerun(
    pytester: pytest.Pytester,
) -> None:
    run(pytester, RERUN_CONFTEST, SCENARIOS).assert_outcomes(passed=3)


KEPT = """
import pytest

SETUPS = []

@pytest.fixture(scope="module")
def lab_run():
    SETUPS.append(1)
    return len(SETUPS)

FAILS = []

def test_fails_once(lab_run):
    FAILS.append(1)
    assert len(FAILS) == 2

def test_one_setup(lab_run):
    assert len(SETUPS) == 1
"""


def test_a_fixture_that_succeeded_is_kept(pytester: pytest.Pytester) -> None:
    run(pytester, RERUN_CONFTEST, KEPT).assert_outcomes(passed=2)


# The module fixture's process died with the VM: a rerun that kept it would fail again.
ALIVE_CONFTEST = RERUN_CONFTEST.replace(
    "forget_failed_fixtures(item)", "forget_failed_fixtures(item, every_module_one=True)"
)
DIED_WITH_THE_VM = """
import pytest

PLUGINS = []

@pytest.fixture(scope="module")
def node_plugin():
    plugin = {"alive": True}
    PLUGINS.append(plugin)
    yield plugin
    plugin["stopped"] = True

def test_panics_under_it(node_plugin):
    if len(PLUGINS) == 1:
        node_plugin["alive"] = False  # the VM it ran in panicked
    assert node_plugin["alive"]

def test_the_next_scenario_has_a_live_one(node_plugin):
    assert node_plugin["alive"] and len(PLUGINS) == 2 and PLUGINS[0]["stopped"]
"""


def test_after_a_panic_a_module_fixture_that_succeeded_is_set_up_again_too(
    pytester: pytest.Pytester,
) -> None:
    run(pytester, ALIVE_CONFTEST, DIED_WITH_THE_VM).assert_outcomes(passed=2)
