"""The lab's process spawning: a server started to die with its parent is ended when that
parent ends, and is started without running any Python in a forked child (a preexec_fn
forks, and gRPC's atfork handlers in a process with channels open could kill the child
before it executed: a csi-attacher that never started, its workload stalled 10 min)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flashmesh.lab import processes

SPAWNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flashmesh.lab import processes
    proc = processes.spawn(["sleep", "300"], Path(sys.argv[1]), die_with_parent=True)
    print(proc.pid, flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def test_a_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    parent = subprocess.run(
        [sys.executable, "-c", SPAWNER, str(tmp_path / "sleep.log"), "0"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    pid = int(parent.stdout.split()[0])
    # Its parent ended: the kernel sends SIGTERM; the orphan is gone (reaped by init).
    assert processes.wait_until(lambda: not processes.is_ours(pid, "/usr/bin/sleep"), 10)


def test_a_spawned_server_is_its_own_executable_at_once(tmp_path: Path) -> None:
    proc = processes.spawn(["sleep", "300"], tmp_path / "sleep.log", die_with_parent=True)
    try:
        # No moment where the PID is still the launcher: stop() and running() check it,
        # and the args name the server, as callers read them back to start it again.
        assert processes.is_ours(proc.pid, "/usr/bin/sleep")
        assert proc.args == ["sleep", "300"]
    finally:
        processes.end(proc)


def test_spawning_never_runs_python_in_a_forked_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """subprocess forks (not vforks) only for a preexec_fn; none is given."""
    seen: list[object] = []
    real = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        seen.append(kwargs.get("preexec_fn"))
        return real(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", popen)
    proc = processes.spawn(["true"], tmp_path / "true.log", die_with_parent=True)
    proc.wait(10)
    assert seen == [None]
