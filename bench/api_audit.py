"""Counting a lab control plane's API requests: the API server's own request counters
(apiserver_request_total, by verb, resource and subresource) and its audit log, which
names each request's user agent and source address, so requests can be told apart by
who made them. Also the FlashMesh source tree of a given commit, to run old code."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import tempfile
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.progress import say

ROOT = Path(__file__).resolve().parent.parent
# (verb, resource, subresource) as the API server's metrics spell them, e.g. LIST volumes.
Key = tuple[str, str, str]
# Metadata level: who, what and when, no bodies. Only the stage a request ends in is kept,
# which is also when apiserver_request_total counts it (a WATCH when it closes).
POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
"""
# The lab control plane's own clients; every other client of the lab's API server during
# a measured window is FlashMesh (the benchmark itself makes no request then).
CONTROL_PLANE_AGENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# The audit log's verbs in the metric's words (server-side apply is PATCH in the log and
# APPLY in the metric; deletecollection is DELETE in both).
VERBS = {"get": "GET", "list": "LIST", "watch": "WATCH", "create": "POST", "update": "PUT",
         "patch": "PATCH", "delete": "DELETE", "deletecollection": "DELETE"}  # fmt: skip


class AuditedCluster(LocalCluster):
    """The lab's control plane with the API server's audit log on (Metadata level)."""

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def _spawn(self, name: str, argv: list[str]) -> None:
        if name == "kube-apiserver":
            policy = self.workdir / "audit-policy.yaml"
            policy.write_text(POLICY)
            argv = [*argv, f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                    "--audit-log-format=json"]  # fmt: skip
        super()._spawn(name, argv)


def request_counters(cluster: LocalCluster) -> tuple[dict[Key, float], dict[Key, float]]:
    """apiserver_request_total and apiserver_response_sizes_sum (bytes) from the API
    server's /metrics, summed by verb, resource and subresource."""
    pki = cluster.pki
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(f"{cluster.server}/metrics", timeout=30, context=context) as r:
        text = r.read().decode()
    requests: dict[Key, float] = defaultdict(float)
    sizes: dict[Key, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in ("apiserver_request_total", "apiserver_response_sizes_sum"):
                continue
            key = (s.labels.get("verb", ""), s.labels.get("resource", ""),
                   s.labels.get("subresource", ""))  # fmt: skip
            if not key[1]:
                continue  # non-resource paths: /metrics (this scrape), /healthz, discovery
            (requests if s.name == "apiserver_request_total" else sizes)[key] += s.value
    return requests, sizes


def per_second(
    before: dict[Key, float], after: dict[Key, float], seconds: float
) -> dict[Key, float]:
    """Each series' increase per second between two scrapes (series that did not move left
    out)."""
    moved = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: d / seconds for k, d in moved.items() if d > 0}


def _time(stamp: str) -> datetime:
    # RFC 3339 with microseconds and a Z; fromisoformat reads +00:00.
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def audited(
    log: Path, begin: datetime, end: datetime, who: Callable[[str, str], str]
) -> Counter[tuple[str, str, str, str]]:
    """Resource requests that ended within [begin, end), counted by (who, verb, resource,
    subresource); `who(user_agent, source_address)` names the client."""
    counts: Counter[tuple[str, str, str, str]] = Counter()
    with log.open() as lines:
        for line in lines:
            event = json.loads(line)
            ref = event.get("objectRef")
            if event.get("stage") != "ResponseComplete" or not ref or not ref.get("resource"):
                continue
            if not begin <= _time(event["stageTimestamp"]) < end:
                continue
            verb = VERBS.get(event["verb"], event["verb"].upper())
            source = (event.get("sourceIPs") or [""])[0]
            client = who(event.get("userAgent", ""), source)
            counts[client, verb, ref["resource"], ref.get("subresource", "")] += 1
    return counts


def user_agents(log: Path, begin: datetime, end: datetime) -> Counter[str]:
    """Requests per user agent (its product token) within [begin, end), for the record."""
    found: Counter[str] = Counter()
    with log.open() as lines:
        for line in lines:
            event = json.loads(line)
            if (
                event.get("stage") == "ResponseComplete"
                and begin <= _time(event["stageTimestamp"]) < end
            ):
                found[event.get("userAgent", "").split(" ")[0]] += 1
    return found


def is_control_plane(user_agent: str) -> bool:
    return user_agent.split("/")[0] in CONTROL_PLANE_AGENTS


def _git(*args: str) -> str:
    # The checkout may belong to another user than the one running the lab (root).
    argv = ["git", "-c", f"safe.directory={ROOT}", "-C", str(ROOT), *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def source_tree(at: str | None) -> Iterator[tuple[Path, str]]:
    """FlashMesh's src folder to run and what it is: the work tree's own, or a commit's,
    checked out as a detached worktree in a temporary folder removed afterwards."""
    if not at:
        head = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "src")
        yield ROOT / "src", f"the work tree at {head}" + (" with changes in src/" if dirty else "")
        return
    commit = _git("rev-parse", "--verify", f"{at}^{{commit}}")
    folder = Path(tempfile.mkdtemp(prefix="flashmesh-at-"))
    folder.chmod(0o755)  # the lab's VMs read it over 9p
    say(f"checking out commit {commit[:12]} in {folder}")
    _git("worktree", "add", "--detach", str(folder / "tree"), commit)
    try:
        yield folder / "tree" / "src", f"commit {commit[:12]}"
    finally:
        _git("worktree", "remove", "--force", str(folder / "tree"))
        shutil.rmtree(folder, ignore_errors=True)
