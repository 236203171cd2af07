"""FlashMesh's benchmarks, run with `flashmesh bench NAME|all` from a checkout. Each one
measures FlashMesh and a baseline in the same run and reports their ratios (bench/report.py);
bench/runner.py records the results in bench/results/ and docs/benchmarks.md."""
