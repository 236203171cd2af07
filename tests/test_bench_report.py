"""The benchmarks' arithmetic and their record: percentiles, ratios, JSON, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import loader, runner
from bench.report import Comparison, Result, from_json, markdown, percentile, to_json

MACHINE = {"description": "2 cores, 24 GiB"}


@pytest.mark.parametrize(
    ("samples", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        ([float(i) for i in range(1, 101)], 95, 95.05),
    ],
)
def test_percentiles_interpolate_between_ranks(samples: list[float], q: float,
                                               expected: float) -> None:  # fmt: skip
    assert percentile(samples, q) == pytest.approx(expected)


def test_a_percentile_of_nothing_or_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"outside 0\.\.100"):
        percentile([1.0], 101)


def test_a_ratio_needs_a_baseline() -> None:
    assert Comparison("p50", "ms", 30.0, 10.0).ratio == pytest.approx(3.0)
    assert Comparison("RSS", "MiB", 30.0).ratio is None
    assert Comparison("x", "s", 1.0, 0.0).ratio is None


def test_results_survive_json_and_make_a_table() -> None:
    ok = Result("provisioning", "Provisioning", baseline="csi-driver-host-path")
    ok.add("PVC to Bound p50", "s", 2.0, 0.5)
    ok.add("PVCs per second", "1/s", 4.0, 16.0, better="higher")
    ok.notes.append("100 PVCs at once")
    failed = Result("attach", "Attach", error="RuntimeError: no VM")
    doc = json.loads(json.dumps(to_json([ok, failed], MACHINE, "2026-11-27T00-00-00Z")))
    assert doc["results"][0]["comparisons"][0]["ratio"] == pytest.approx(4.0)
    assert from_json(doc) == [ok, failed]
    page = markdown(from_json(doc), MACHINE, "2026-11-27T00-00-00Z")
    assert "2 cores, 24 GiB" in page
    assert "| PVC to Bound p50 (s) | 2.00 | 0.5 | 4.00x (lower is better) |" in page
    assert "| PVCs per second (1/s) | 4.00 | 16.00 | 0.25x (higher is better) |" in page
    assert "- 100 PVCs at once" in page
    assert "**Failed:** RuntimeError: no VM" in page


def test_benchmarks_are_chosen_by_name_or_all() -> None:
    assert runner.resolve(["all"]) == list(runner.BENCHMARKS)
    assert runner.resolve(["provisioning", "operator-scale"]) == [
        n for n in runner.BENCHMARKS if n in ("provisioning", "operator-scale")
    ]
    with pytest.raises(ValueError, match=r"unknown benchmark.*choose from"):
        runner.resolve(["fast"])


def test_utilisation_is_compute_over_run_time() -> None:
    assert loader.utilisation(0.04, 10, 0.5) == pytest.approx(0.8)
    assert loader.utilisation(0.04, 10, 0.3) == 1.0  # never above 1
    with pytest.raises(ValueError):
        loader.utilisation(0.04, 10, 0)


def test_the_largest_count_kept_stops_at_the_first_that_fell_short() -> None:
    assert loader.largest_kept({1: 0.99, 2: 0.95, 4: 0.91, 8: 0.7}) == 4
    assert loader.largest_kept({1: 0.99, 2: 0.8, 4: 0.95}) == 1
    assert loader.largest_kept({1: 0.5}) == 0


def test_the_loader_reads_what_it_prepared(tmp_path: Path) -> None:
    data = tmp_path / "samples"
    assert loader.main(["prepare", str(data), "--samples", "12", "--sample-kib", "4"]) == 0
    assert sorted(p.name for p in data.iterdir()) == loader.sample_names(12)
    assert 0 < loader.run(data, accelerators=2, batch=2, compute_ms=1, batches=3) <= 1
    with pytest.raises(SystemExit, match="too few samples"):
        loader.run(data, accelerators=4, batch=2, compute_ms=1, batches=3)


def test_the_page_shows_each_benchmarks_latest_good_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(runner, "PAGE", tmp_path / "benchmarks.md")
    with pytest.raises(ValueError, match="no results"):
        runner.rebuild_page()
    (tmp_path / "results").mkdir()
    good = Result("provisioning", "Provisioning", "mock")
    good.add("PVC to Bound, p50", "s", 2.0, 1.0)
    broken = Result("provisioning", "Provisioning", error="RuntimeError: later run broke")
    scale = Result("operator-scale", "Operator scale")
    scale.add("operator RSS", "MiB", 75.0, 67.0)
    for started, results in (("2026-01-01T00-00-00Z", [good, scale]),
                             ("2026-01-02T00-00-00Z", [broken])):  # fmt: skip
        doc = to_json(results, MACHINE, started)
        (tmp_path / "results" / f"{started}.json").write_text(json.dumps(doc))
    page = runner.rebuild_page().read_text()
    assert "PVC to Bound, p50" in page and "later run broke" not in page
    assert page.index("operator-scale") < page.index("`provisioning`")  # the run order
    assert page.count("Run started 2026-01-01T00-00-00Z.") == 2
