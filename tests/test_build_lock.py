"""The tools build runs once at a time: scripts/setup.sh leaves the CSI sidecars,
csi-sanity and helm building in the background, holding tools/build.sh's lock, and whatever
needs them (flashmesh.lab.binaries, a second tools/build.sh) waits for that build to end.
No Go here: the "built" tools are stand-in files in a temporary cache."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from flashmesh.lab import binaries

BUILD = binaries.TOOLS / "build.sh"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLASHMESH_CACHE", str(tmp_path))
    (tmp_path / "bin").mkdir()
    return tmp_path


@pytest.fixture
def held(cache: Path) -> Iterator[IO[str]]:
    """The build lock, held as a running build holds it."""
    with (cache / "bin" / ".build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield lock


def fake_helm(cache: Path) -> None:
    helm = binaries.locate_csi().helm
    helm.parent.mkdir(parents=True, exist_ok=True)
    helm.write_text("#!/bin/sh\n")
    helm.chmod(0o755)


def run_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD), *args], capture_output=True, text=True, timeout=60, env=os.environ
    )


def test_check_says_what_is_not_built_and_builds_nothing(cache: Path) -> None:
    missing = run_build("--check", "helm", "sanity")
    assert missing.returncode == 1, missing.stderr
    assert "not built yet: helm csi-sanity" in missing.stderr
    fake_helm(cache)
    assert run_build("--check", "helm").returncode == 0
    assert not (cache / "bin" / ".build.lock").exists()  # --check takes no lock


def test_a_second_build_waits_for_the_running_one(cache: Path) -> None:
    fake_helm(cache)
    with (cache / "bin" / ".build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = subprocess.Popen(
            ["bash", str(BUILD), "helm"], stderr=subprocess.PIPE, text=True, env=os.environ
        )
        assert second.stderr is not None
        said = second.stderr.readline()  # it says it waits, then blocks on the lock
        assert "waiting for the build already running" in said, said
        assert second.poll() is None
        fcntl.flock(lock, fcntl.LOCK_UN)
        _, rest = second.communicate(timeout=60)
    assert second.returncode == 0, rest
    assert "helm: cached in" in rest


def test_the_tools_are_located_only_once_the_build_has_ended(
    cache: Path, held: IO[str], capfd: pytest.CaptureFixture[str]
) -> None:
    found: list[binaries.CsiTools] = []
    waiter = threading.Thread(target=lambda: found.append(binaries.locate_csi()), daemon=True)
    ticking = threading.Thread(
        target=binaries.wait_for_builds, kwargs={"progress_every": 0.05}, daemon=True
    )
    waiter.start()
    ticking.start()
    # Both block while the lock is held; the one with a short period says so again.
    said = stderr_until(
        capfd,
        "still waiting for the background build",
        "waiting for the build of the CSI sidecars, csi-sanity and helm",
    )
    assert "still waiting for the background build" in said
    assert "waiting for the build of the CSI sidecars, csi-sanity and helm" in said
    assert waiter.is_alive() and not found
    fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(30)
    ticking.join(30)
    assert found and not waiter.is_alive() and not ticking.is_alive()


def stderr_until(capfd: pytest.CaptureFixture[str], *texts: str, limit: float = 30) -> str:
    """Captured stderr, read until every one of `texts` appears in it or `limit` seconds
    pass (the waiters print from their threads, in either order)."""
    said, pause = "", threading.Event()
    for _ in range(int(limit / 0.05)):
        said += capfd.readouterr().err
        if all(text in said for text in texts):
            break
        pause.wait(0.05)
    return said


def test_without_a_lock_file_nothing_waits(cache: Path) -> None:
    binaries.wait_for_builds()  # returns at once: no build ever ran here
    assert not (cache / "bin" / ".build.lock").exists()
