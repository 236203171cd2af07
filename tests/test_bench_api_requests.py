"""The api-requests benchmark's pure parts: audit log counting, rates and its Result."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from bench import api_requests, api_results, runner
from bench.api_audit import audited, is_control_plane, per_second
from bench.report import from_json, to_json

BEGIN = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
END = datetime(2026, 12, 6, 12, 1, 0, tzinfo=UTC)


def event(stamp: str, verb: str, resource: str, agent: str, source: str, **more: object) -> str:
    return json.dumps({
        "stage": more.pop("stage", "ResponseComplete"), "verb": verb, "userAgent": agent,
        "sourceIPs": [source], "stageTimestamp": stamp,
        "objectRef": {"resource": resource, **more} if resource else None,
    })  # fmt: skip


def test_audited_counts_requests_that_ended_in_the_window_by_client(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    vm = api_requests.STORAGE[0].address(0)
    log.write_text("\n".join([
        event("2026-12-06T12:00:01.000001Z", "list", "volumes", "OpenAPI-Generator/31", vm),
        event("2026-12-06T12:00:02.5Z", "patch", "volumes", "OpenAPI-Generator/31", vm,
              subresource="status"),
        event("2026-12-06T12:00:03Z", "update", "leases", "kwok/v0.6 (linux)", "127.0.0.1"),
        event("2026-12-06T12:00:04Z", "get", "", "Python-urllib/3.12", "127.0.0.1"),
        event("2026-12-06T12:00:05Z", "list", "volumes", "x", vm, stage="ResponseStarted"),
        event("2026-12-06T12:01:00Z", "list", "volumes", "OpenAPI-Generator/31", vm),
    ]) + "\n")  # fmt: skip
    counts = audited(log, BEGIN, END, api_requests.who)
    assert counts == {
        ("agents", "LIST", "volumes", ""): 1,
        ("agents", "PATCH", "volumes", "status"): 1,
        ("control plane", "PUT", "leases", ""): 1,
    }
    assert is_control_plane("kube-controller-manager/v1.31.0 (linux/amd64) kubernetes/abc")
    assert not is_control_plane("kopf/1.37")


def test_per_second_leaves_out_series_that_did_not_move() -> None:
    before = {("LIST", "volumes", ""): 10.0, ("GET", "leases", ""): 4.0}
    after = {("LIST", "volumes", ""): 70.0, ("GET", "leases", ""): 4.0, ("PUT", "x", ""): 6.0}
    assert per_second(before, after, 60) == {("LIST", "volumes", ""): 1.0, ("PUT", "x", ""): 0.1}


def window(agents: float, controller: float) -> api_results.Window:
    return api_results.Window(
        60, {("LIST", "volumes", ""): agents + controller + 1}, {("LIST", "volumes", ""): 2.0**20},
        {("agents", "LIST", "volumes", ""): agents, ("CSI controller", "GET", "leases", ""):
         controller, ("control plane", "PUT", "leases", ""): 1}, {"kwok/v0.6": 60},
    )  # fmt: skip


def test_result_compares_1000_volumes_with_100_and_keeps_the_breakdown() -> None:
    windows = {"100": window(2, 1), "1000": window(4, 1), "stopped": window(0, 0)}
    result = api_results.result(windows, "commit abc", 60, (100, 1000), 52, 3)
    first = result.comparisons[0]
    assert (first.value, first.baseline, first.ratio) == (5, 3, 5 / 3)
    assert {c.metric for c in result.comparisons} >= {"LIST volumes", "GET leases"}
    doc = to_json([result], {}, "")
    again = from_json(json.loads(json.dumps(doc)))[0]
    assert again.details["windows"]["1000"]["flashmesh"] == {"GET leases": 1, "LIST volumes": 4}
    assert "api-requests" in runner.BENCHMARKS
