"""Runs benchmarks by name, then writes bench/results/<timestamp>.json and
docs/benchmarks.md. A benchmark that fails is recorded as failed and the run goes on."""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.report import Result, from_json, markdown, to_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

# name -> module with `run(workdir: Path) -> Result`, in the order `all` runs them.
BENCHMARKS = {
    "operator-scale": "bench.operator_scale",
    "api-requests": "bench.api_requests",
    "idle-vm": "bench.idle_vm",
    "provisioning": "bench.provisioning",
    "attach": "bench.attach",
    "data-path": "bench.data_path",
    "bandwidth": "bench.bandwidth",
    "feeding": "bench.feeding",
}


def machine() -> dict[str, object]:
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    cores = os.cpu_count() or 0
    gib = round(mem_kib / 2**20)
    return {
        "cores": cores,
        "memory_gib": gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "description": f"{cores} cores, {gib} GiB, Linux {platform.release()}; "
        "lab VMs are QEMU with software emulation (TCG), so their CPUs are slow",
    }


def resolve(names: Sequence[str]) -> list[str]:
    """`all` or known names, in run order; an unknown name is a ValueError naming the known."""
    if list(names) == ["all"] or not names:
        return list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(
            f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)} or all"
        )
    return [n for n in BENCHMARKS if n in names]


def run_one(name: str, workdir: Path) -> Result:
    """One benchmark in this process; a failure becomes a failed Result."""
    module = importlib.import_module(BENCHMARKS[name])
    try:
        result: Result = module.run(workdir)
    except Exception as e:  # recorded, so the other benchmarks still run
        traceback.print_exc()
        result = Result(name, name, error=f"{type(e).__name__}: {e}")
    return result


def run(
    names: Sequence[str], workdir: Path, say: Callable[[str], None] = print
) -> tuple[Path, list[Result]]:
    """Runs each in its own process (a lab's network namespace, VMs and servers end with
    it); returns the JSON file written and the results."""
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    results: list[Result] = []
    for name in resolve(names):
        say(f"benchmark {name}: running")
        out = workdir / f"{name}.result.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        rc = subprocess.run(
            [sys.executable, "-m", "bench.runner", name, str(workdir / name), str(out)],
            cwd=ROOT, env=env, check=False,
        ).returncode  # fmt: skip
        if out.is_file():
            result = from_json({"results": [json.loads(out.read_text())]})[0]
        else:
            result = Result(name, name, error=f"its process exited {rc} without a result")
        results.append(result)
        say(f"benchmark {name}: {'FAILED: ' + result.error if result.error else 'done'}")
    host = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{started}.json"
    out.write_text(json.dumps(to_json(results, host, started), indent=2) + "\n")
    say(f"results: {out}")
    if [r.name for r in results] == list(BENCHMARKS):  # the page shows whole runs only
        PAGE.parent.mkdir(parents=True, exist_ok=True)
        PAGE.write_text(markdown(results, host, started) + "\n")
        say(f"table: {PAGE}")
    return out, results


def rebuild_page() -> Path:
    """docs/benchmarks.md from the latest result of every benchmark in bench/results/
    (a failed result only when no run of it succeeded)."""
    latest: dict[str, tuple[str, Result, dict[str, object]]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        for result in from_json(doc):
            kept = latest.get(result.name)
            if kept is None or not result.error or kept[1].error:
                latest[result.name] = (doc["started"], result, doc["machine"])
    if not latest:
        raise ValueError(f"no results in {RESULTS}: run `flashmesh bench all` first")
    names = [n for n in BENCHMARKS if n in latest]
    host = latest[names[-1]][2]
    page = markdown([latest[n][1] for n in names], host, "",
                    runs={n: latest[n][0] for n in names})  # fmt: skip
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page + "\n")
    return PAGE


if __name__ == "__main__":  # one benchmark, in the process `run` starts for it
    _name, _workdir, _out = sys.argv[1:4]
    _result = run_one(_name, Path(_workdir))
    Path(_out).write_text(json.dumps(to_json([_result], {}, "")["results"][0]) + "\n")
