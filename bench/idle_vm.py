"""Idle lab VM: the host CPU one booted VM with nothing to do costs, from its QEMU process.

A lab VM runs under software emulation, so whatever its guest does while idle is taken
from every other VM and from the control plane. Measured: the QEMU process's CPU time
(user + system, from /proc/<pid>/stat) over a window after boot, as a share of one host
core, for the lab's init as it is (commands woken through a virtio-serial port) against
the init of commit 4515da2 (a loop that globbed the shared folder and forked `sleep 0.1`
ten times a second), both booted the same way on the same machine in this run.

`python -m bench.idle_vm [--window S]` runs it alone (root: the VM needs a network
namespace)."""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import Result
from flashmesh.lab import vm as labvm
from flashmesh.lab.progress import say
from flashmesh.lab.vm import Lab, VmSpec

BASELINE_COMMIT = "4515da2"
WINDOW = 60.0
SETTLE = 10.0
ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_share(workdir: Path, stage2: Path, window: float) -> float:
    """One VM booted with the given init, left alone: its CPU share of one host core."""
    original = labvm.STAGE2
    labvm.STAGE2 = stage2
    try:
        with Lab(workdir) as lab:
            lab.up([VmSpec("idle-0", 180)])
            lab.exec("idle-0", "true")  # the command path works
            time.sleep(SETTLE)  # boot-time work (module loads, first writes) ends
            pid = lab.pid("idle-0")
            begin, cpu = time.monotonic(), cpu_seconds(pid)
            time.sleep(window)  # the measurement itself: a fixed window of idleness
            used = cpu_seconds(pid) - cpu
            return used / (time.monotonic() - begin)
    finally:
        labvm.STAGE2 = original


def baseline_init(folder: Path) -> Path:
    """The init of the baseline commit, from git."""
    text = subprocess.run(
        ["git", "show", f"{BASELINE_COMMIT}:src/flashmesh/lab/guest/init-stage2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = folder / "init-stage2.baseline"
    path.write_text(text)
    path.chmod(0o755)
    return path


def run(workdir: Path, window: float = WINDOW) -> Result:
    result = Result(
        "idle-vm",
        "Idle lab VM: host CPU of its QEMU process",
        f"the lab's init at {BASELINE_COMMIT} (0.1 s polling loop), booted the same way",
    )
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_init(Path(tmp))
        say(f"idle VM with the baseline init: measuring {window:.0f} s")
        before = idle_share(workdir / "baseline", old, window)
        say(f"baseline: {before:.1%} of a core; now the current init")
        now = idle_share(workdir / "current", labvm.STAGE2, window)
        say(f"current: {now:.1%} of a core")
    result.add("idle VM CPU", "% of a core", round(now * 100, 2), round(before * 100, 2))
    result.notes.append(
        f"QEMU process CPU (user+system) over {window:.0f} s, {SETTLE:.0f} s after the VM "
        "answered its first command; 1 vCPU under TCG"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=WINDOW)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fm-idle-") as tmp:
        result = run(Path(tmp), args.window)
    for c in result.comparisons:
        print(f"{c.metric}: {c.value} {c.unit} (baseline {c.baseline})")


if __name__ == "__main__":
    main()
