"""An API server that cannot be reached, or that never answers, is a KubeError (503) the
callers already treat as unavailability: never a hang, never a raw transport error."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flashmesh.kube import Kube, KubeError


def kubeconfig(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
    )
    return path


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers on them."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the with block ends


def test_a_server_that_never_answers_is_unavailable_not_a_hang(
    tmp_path: Path, silent_server: int
) -> None:
    kube = Kube.from_kubeconfig(kubeconfig(tmp_path, silent_server), request_timeout=(1, 1))
    with pytest.raises(KubeError) as err:
        kube.get("v1", "ConfigMap", "anything", "default")
    assert err.value.status == 503
    assert "did not answer" in str(err.value)


def test_a_refused_connection_is_unavailable(tmp_path: Path, closed_port: int) -> None:
    kube = Kube.from_kubeconfig(kubeconfig(tmp_path, closed_port), request_timeout=(1, 1))
    # The agent's heartbeat thread survives exactly KubeError: a transport error would have
    # ended it, and the node would have turned NotReady while its agent kept serving.
    calls: list[Callable[[], object]] = [
        lambda: kube.list("v1", "ConfigMap", "default"),
        lambda: kube.delete("v1", "ConfigMap", "anything", "default"),
        lambda: kube.renew_lease("default", "lease", "node", 40),
    ]
    for call in calls:
        with pytest.raises(KubeError) as err:
            call()
        assert err.value.status == 503
