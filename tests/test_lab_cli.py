"""`flashmesh lab cluster up|status|down` as a person runs it, next to the test session's own
cluster (ports and folders per run, so the two never collide), and nothing left after down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashmesh.lab.cluster import LocalCluster, port_is_listening

pytestmark = pytest.mark.cluster


def flashmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashmesh.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_up_status_down_leaves_no_process_and_no_port(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    workdir = tmp_path / "cli-cluster"
    try:
        up = flashmesh("lab", "cluster", "up", "--dir", str(workdir), "--nodes", "1")
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={workdir / 'admin.kubeconfig'}" in up.stdout
        state = json.loads((workdir / "state.json").read_text())
        assert set(state["pids"]) == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
        }
        assert state["ports"]["apiserver"] != cluster.state.ports["apiserver"]

        status = flashmesh("lab", "cluster", "status", "--dir", str(workdir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "1/1 Ready" in status.stdout

        again = flashmesh("lab", "cluster", "up", "--dir", str(workdir))
        assert again.returncode == 0 and "already running" in again.stderr
        assert json.loads((workdir / "state.json").read_text())["pids"] == state["pids"]
    finally:
        down = flashmesh("lab", "cluster", "down", "--dir", str(workdir))
    assert down.returncode == 0, down.stderr

    for name, pid in state["pids"].items():
        assert not Path(f"/proc/{pid}").exists() or not _runs(pid, state["executables"][name])
    for name, port in state["ports"].items():
        assert not port_is_listening(state["address"], port), f"{name} still listens on {port}"
    assert not workdir.exists()
    # The session's own cluster is untouched.
    assert all(cluster.running().values())

    gone = flashmesh("lab", "cluster", "status", "--dir", str(workdir))
    assert gone.returncode == 1 and "no cluster" in gone.stdout
    assert flashmesh("lab", "cluster", "down", "--dir", str(workdir)).returncode == 0


def _runs(pid: int, executable: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)") == executable
    except OSError:
        return False
