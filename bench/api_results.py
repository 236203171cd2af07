"""The api-requests benchmark's windows and its Result: requests per second by verb,
resource and subresource, FlashMesh's share from the audit log, checked against the
metric's totals with FlashMesh stopped."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.api_audit import AuditedCluster, Key, audited, per_second, request_counters, user_agents
from bench.report import Result, from_json
from flashmesh.lab.progress import say

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "api-requests"
FLASHMESH = ("agents", "operator", "CSI controller")


@dataclass
class Window:
    seconds: float
    requests: dict[Key, float]  # every client, from apiserver_request_total, per second
    response_bytes: dict[Key, float]  # every client, apiserver_response_sizes_sum, per second
    audit: dict[tuple[str, str, str, str], float]  # (who, verb, resource, sub), per second
    user_agents: dict[str, int]
    # name -> (passes, mean seconds) of the components' own reconcile histograms
    passes: dict[str, tuple[float, float]] = field(default_factory=dict)

    def flashmesh(self, component: str | None = None) -> dict[Key, float]:
        """FlashMesh's requests per second (one component's, if named), from the audit log."""
        wanted = (component,) if component else FLASHMESH
        out: dict[Key, float] = defaultdict(float)
        for (client, *key), rate in self.audit.items():
            if client in wanted:
                out[key[0], key[1], key[2]] += rate
        return dict(out)


Histograms = Callable[[], dict[str, tuple[float, float]]]


def histogram(url: str, name: str, **labels: str) -> tuple[float, float]:
    """(count, sum) of a histogram on a /metrics page, over the series with these labels;
    zeros when the page or the series is missing (other code may name it otherwise)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return 0.0, 0.0
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if labels.items() <= s.labels.items():
                count += s.value if s.name == f"{name}_count" else 0.0
                total += s.value if s.name == f"{name}_sum" else 0.0
    return count, total


def measure(
    cluster: AuditedCluster, seconds: float, what: str, who: Callable[[str, str], str],
    histograms: Histograms = dict,
) -> Window:  # fmt: skip
    """Requests during `seconds` from now: the API server's counters before and after, and
    its audit log's requests that ended in between; with the components' passes (count
    and mean seconds) from their histograms."""
    say(f"measuring {what} for {seconds:.0f} s")
    passes0 = histograms()
    requests0, sizes0 = request_counters(cluster)
    begin, t0 = datetime.now(UTC), time.monotonic()
    while (left := seconds - (time.monotonic() - t0)) > 0:
        time.sleep(min(20.0, left))
        say(f"measuring {what}: {min(seconds, time.monotonic() - t0):.0f} of {seconds:.0f} s")
    requests1, sizes1 = request_counters(cluster)
    end, took = datetime.now(UTC), time.monotonic() - t0
    passes = {}
    for name, (count, total) in histograms().items():
        n = count - passes0[name][0]
        if n > 0:
            passes[name] = (n, (total - passes0[name][1]) / n)
    time.sleep(2)  # the audit log's last lines of the window are written
    audit = audited(cluster.audit_log, begin, end, who)
    return Window(
        took,
        per_second(requests0, requests1, took),
        per_second(sizes0, sizes1, took),
        {k: n / took for k, n in audit.items()},
        dict(user_agents(cluster.audit_log, begin, end).most_common()),
        passes,
    )


def label(key: Key) -> str:
    verb, resource, sub = key
    return f"{verb} {resource}{'/' + sub if sub else ''}"


def earlier(source: str) -> dict[str, Any] | None:
    """The details of the latest api-requests result in bench/results/ measured on other
    code than `source` (the before of a before/after), or None."""
    found = None
    for path in sorted(RESULTS.glob("*.json")):
        for r in from_json(json.loads(path.read_text())):
            if r.name == NAME and not r.error and r.details.get("source") not in (None, source):
                found = r.details
    return found


def result(windows: dict[str, Window], source: str, window: float, steps: Sequence[int],
           nodes: int, per_vm: int) -> Result:  # fmt: skip
    small, big = (windows[str(n)] for n in steps)
    stopped = windows["stopped"]
    r = Result(NAME, f"API requests in steady state, {steps[-1]:,} Volumes",
               baseline=f"the same with {steps[0]:,} Volumes (or the code named)")  # fmt: skip
    total = {n: sum(windows[str(n)].flashmesh().values()) for n in steps}
    r.add(f"FlashMesh requests, all, {source}", "1/s", total[steps[1]], total[steps[0]])
    for component in FLASHMESH:
        r.add(f"by the {component}", "1/s", sum(big.flashmesh(component).values()),
              sum(small.flashmesh(component).values()))  # fmt: skip
    keys = sorted(set(big.flashmesh()) | set(small.flashmesh()),
                  key=lambda k: -big.flashmesh().get(k, 0))  # fmt: skip
    for key in keys:
        r.add(label(key), "1/s", big.flashmesh().get(key, 0), small.flashmesh().get(key, 0))

    def minus_stopped(what: dict[Key, float], alone: dict[Key, float]) -> float:
        return sum(what.values()) - sum(alone.values())

    mib = 2**20
    r.add("responses to FlashMesh (metric, minus FlashMesh stopped)", "MiB/s",
          minus_stopped(big.response_bytes, stopped.response_bytes) / mib,
          minus_stopped(small.response_bytes, stopped.response_bytes) / mib)  # fmt: skip
    r.add("all requests (metric, minus FlashMesh stopped)", "1/s",
          minus_stopped(big.requests, stopped.requests),
          minus_stopped(small.requests, stopped.requests))  # fmt: skip
    for name, (n, mean) in big.passes.items():
        then = small.passes.get(name)
        r.add(f"{name}, passes per minute", "1/min", n * 60 / big.seconds,
              then and then[0] * 60 / small.seconds)  # fmt: skip
        r.add(f"{name}, mean duration", "s", mean, then and then[1])
    r.add("the control plane alone (metric, FlashMesh stopped)", "1/s",
          sum(stopped.requests.values()))  # fmt: skip
    before = earlier(source)
    if before:
        then = before["windows"][str(steps[-1])]["flashmesh"]
        r.add(f"FlashMesh requests, all, {source} vs {before['source']}", "1/s",
              total[steps[1]], sum(then.values()))  # fmt: skip
        now = {label(k): v for k, v in big.flashmesh().items()}
        for name in sorted(set(then) | set(now)):
            r.add(f"{name}, vs {before['source']}", "1/s", now.get(name, 0), then.get(name, 0))
    r.notes += [
        f"FlashMesh from {source}: the operator, the CSI controller (no sidecars: nothing"
        f" calls it in steady state) and two storage agents in lab VMs serving"
        f" {per_vm} Volumes each; the other Volumes sit on {nodes - 2} KWOK storage nodes whose"
        " StorageNodes and Leases say they serve. Default intervals (agent pass 2 s,"
        " operator pool resync 10 s), as the chart deploys them.",
        f"Each figure is requests per second over a {window:.0f} s window once every"
        " component has settled. Totals come from the API server's apiserver_request_total;"
        " FlashMesh's share and its parts come from the API server's audit log (Metadata"
        " level: user agent and source address per request): the lab control plane's own"
        " clients (kube-controller-manager, kube-scheduler, KWOK, the API server) are set"
        " apart and the rest is FlashMesh's, agents by the VMs' addresses, the operator by"
        " the bridge address it is given, the controller by loopback.",
        "The metric's rows check that attribution: every request counted during the window"
        " less a last window with FlashMesh stopped (the control plane alone, at"
        f" {steps[-1]:,} Volumes); response sizes come from apiserver_response_sizes_sum."
        " The audit log counts server-side apply as PATCH, the metric as APPLY.",
        "The goal: FlashMesh's requests per second do not grow with the Volumes (a ratio"
        " near 1.00x) and grow with storage nodes only by Lease renewals.",
        "A poller whose passes are bound by CPU (the agents' in software-emulated VMs, the"
        " operator's on two shared cores) makes fewer requests per second when each pass"
        " takes longer with more Volumes: read the response bytes and the passes' rows"
        " beside the request rates.",
    ]
    r.details = {
        "source": source,
        "window_seconds": window,
        "storage_nodes": nodes,
        "windows": {
            name: {
                "seconds": w.seconds,
                "flashmesh": {label(k): v for k, v in sorted(w.flashmesh().items())},
                "by_component": {
                    c: {label(k): v for k, v in sorted(w.flashmesh(c).items())} for c in FLASHMESH
                },
                "control_plane": sum(v for (c, *_), v in w.audit.items() if c == "control plane"),
                "metric_requests": {label(k): v for k, v in sorted(w.requests.items())},
                "metric_response_bytes": {label(k): v for k, v in sorted(w.response_bytes.items())},
                "user_agents": w.user_agents,
                "passes": {k: {"count": n, "mean_seconds": m} for k, (n, m) in w.passes.items()},
            }
            for name, w in windows.items()
        },
    }
    return r
