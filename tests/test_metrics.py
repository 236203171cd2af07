"""The /metrics endpoint every component serves: off unless a port is given (on the
command line or in FLASHMESH_METRICS_PORT), a bad port refused by name."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from flashmesh import metrics
from flashmesh.dataplane.agent.loop import STUCK_AFTER, Agent
from flashmesh.operator import metrics as operator_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_off_without_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.PORT_ENV, raising=False)
    assert metrics.serve(None) is None
    monkeypatch.setenv(metrics.PORT_ENV, "0")
    assert metrics.serve(None) is None


def test_a_bad_port_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(metrics.PORT_ENV, "ninety")
    with pytest.raises(SystemExit, match="FLASHMESH_METRICS_PORT='ninety' is not a port"):
        metrics.serve(None)


def test_the_port_from_the_environment_serves_the_series(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv(metrics.PORT_ENV, str(port))
    assert metrics.serve(None, address="127.0.0.1") == port
    operator_metrics.POOL_CAPACITY.labels("served").set(1 << 30)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert 'flashmesh_pool_capacity_bytes{pool="served"} 1.073741824e+09' in text
    operator_metrics.forget_pool("served")
    operator_metrics.forget_pool("never-seen")  # nothing to forget is no error


def test_healthz_answers_from_the_components_own_health() -> None:
    port = free_port()
    why: list[str | None] = [None]
    assert metrics.serve(port, address="127.0.0.1", health=lambda: why[0]) == port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
        assert reply.status == 200 and reply.read() == b"ok\n"
    why[0] = "no reconcile pass has ended for 901 s"
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert failed.value.code == 503
    assert failed.value.read() == b"no reconcile pass has ended for 901 s\n"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert b"flashmesh_" in reply.read()


def test_the_agent_is_live_while_its_passes_end_and_its_heartbeat_runs() -> None:
    agent = Agent(kube=None, node="storage-0", address="10.0.0.1", resync_every=300)  # type: ignore[arg-type]
    start = agent._passed_at
    assert agent.health(start + 899) is None  # an idle agent's pass is due every 300 s
    assert agent.health(start + 901) == "no reconcile pass has ended for 901 s"
    agent._passed_at = start + 900  # a pass ended (a failing one counts: it is not stuck)
    assert agent.health(start + 901) is None
    agent._beating = True
    assert agent.health(start + STUCK_AFTER + 1) == (
        f"the Lease heartbeat has not run for {STUCK_AFTER + 1:.0f} s"
    )
