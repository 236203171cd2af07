"""Benchmark results: percentiles, comparisons against a baseline measured in the same run,
the JSON record and the Markdown table. Pure: no I/O here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between the closest ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Comparison:
    """One figure of FlashMesh beside the same figure of its baseline."""

    metric: str
    unit: str
    value: float
    baseline: float | None = None
    better: Literal["lower", "higher"] = "lower"

    @property
    def ratio(self) -> float | None:
        """FlashMesh over the baseline; None when there is no baseline to divide by."""
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


@dataclass
class Result:
    """What one benchmark measured. `baseline` names what FlashMesh was compared with."""

    name: str
    title: str
    baseline: str = ""
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    # Machine-readable figures beyond the table (kept in the JSON only), e.g. a breakdown.
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, unit: str, value: float, baseline: float | None = None,
            better: Literal["lower", "higher"] = "lower") -> None:  # fmt: skip
        self.comparisons.append(Comparison(metric, unit, value, baseline, better))


def to_json(results: Sequence[Result], machine: dict[str, Any], started: str) -> dict[str, Any]:
    return {
        "started": started,
        "machine": machine,
        "results": [
            {**asdict(r), "comparisons": [{**asdict(c), "ratio": c.ratio} for c in r.comparisons]}
            for r in results
        ],
    }


def from_json(doc: dict[str, Any]) -> list[Result]:
    results = []
    for r in doc["results"]:
        comparisons = [
            Comparison(
                c["metric"], c["unit"], c["value"], c.get("baseline"), c.get("better", "lower")
            )
            for c in r.get("comparisons", [])
        ]
        results.append(Result(r["name"], r["title"], r.get("baseline", ""), comparisons,
                              list(r.get("notes", [])), r.get("error"),
                              dict(r.get("details") or {})))  # fmt: skip
    return results


def _number(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown(
    results: Sequence[Result],
    machine: dict[str, Any],
    started: str,
    runs: dict[str, str] | None = None,
) -> str:
    """The benchmarks page: the machine, then one table per benchmark (`runs`: when each
    benchmark's own run started, when they come from several runs)."""
    when = (
        f"Run started {started} with `flashmesh bench all`"
        if not runs
        else "The latest result of each benchmark (its run's start is under its title)"
    )
    lines = [
        "# Benchmarks",
        "",
        f"{when} on {machine.get('description', '?')}.",
        "Every figure is compared with a baseline measured in the same run on the same machine;",
        "absolute numbers from software-emulated VMs say little, the ratios say more.",
        "",
    ]
    for r in results:
        lines += [f"## {r.title} (`{r.name}`)", ""]
        if runs and r.name in runs:
            lines += [f"Run started {runs[r.name]}.", ""]
        if r.error:
            lines += [f"**Failed:** {r.error}", ""]
        if r.comparisons:
            lines += [
                f"| metric | FlashMesh | {r.baseline or 'baseline'} | ratio |",
                "|---|---:|---:|---:|",
            ]
            for c in r.comparisons:
                ratio = "-" if c.ratio is None else f"{c.ratio:.2f}x ({c.better} is better)"
                lines.append(
                    f"| {c.metric} ({c.unit}) | {_number(c.value)} | {_number(c.baseline)} "
                    f"| {ratio} |"
                )
            lines.append("")
        lines += [f"- {n}" for n in r.notes]
        if r.notes:
            lines.append("")
    return "\n".join(lines)
