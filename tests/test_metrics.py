"""The /metrics endpoint every component serves: off unless a port is given (on the
command line or in FLASHMESH_METRICS_PORT), a bad port refused by name."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from flashmesh import metrics
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
