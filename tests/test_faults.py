"""The crash point really kills the process, at the change it names and not before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import pytest

from flashmesh.dataplane import faults
from flashmesh.dataplane.lvm import Lvm, LvmError
from flashmesh.dataplane.process import Result

CHANGES = """
from flashmesh.dataplane import faults
for n in range(1, 6):
    faults.before_change(f"change {n}")
    print(f"made {n}", flush=True)
"""


def run(crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if crash_at:
        env[faults.ENV] = crash_at
    return subprocess.run([sys.executable, "-c", CHANGES], env=env, capture_output=True, text=True)


def test_the_process_is_killed_just_before_the_nth_change() -> None:
    done = run("3")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split("\n")[:-1] == ["made 1", "made 2"]


def test_without_the_variable_nothing_happens() -> None:
    done = run(None)
    assert done.returncode == 0 and done.stdout.count("made") == 5


def test_the_process_is_killed_just_before_the_change_it_names() -> None:
    done = run("change 4")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split("\n")[:-1] == ["made 1", "made 2", "made 3"]


def test_an_injected_failure_fails_only_the_changes_it_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran: list[list[str]] = []

    def runner(argv: Sequence[str], **_: object) -> Result:
        ran.append(list(argv))
        return Result(tuple(argv), 0, "", "")

    monkeypatch.setenv(faults.FAIL_ENV, "lvextend")
    lvm = Lvm(runner)
    with pytest.raises(
        LvmError, match=r"lvextend --yes .*: failed \(injected by FLASHMESH_FAIL_AT\)"
    ):
        lvm._run("lvextend", "--yes", "--size", "2g", "vg/lv")
    lvm._run("lvcreate", "--yes", "--name", "lv", "vg")
    assert ran == [["lvcreate", "--yes", "--name", "lv", "vg"]]  # the failed one never ran
    monkeypatch.delenv(faults.FAIL_ENV)
    assert not faults.failing("lvextend --yes")
