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


def test_a_module_fixture_that_failed_is_set_up_again_on_the_rerun(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(RERUN_CONFTEST)
    pytester.makepyfile(test_scenarios=SCENARIOS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_fixture_that_succeeded_is_kept(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RERUN_CONFTEST)
    pytester.makepyfile(
        test_kept="""
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
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
