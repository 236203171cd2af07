"""Informers against the real API server: a cache that follows every change with one list,
and watches that survive an API server restart, an expired resource version and a cut
network, each resuming without losing a change."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flashmesh import informer as informers
from flashmesh.informer import Informer
from flashmesh.kube import Kube, KubeError
from flashmesh.lab.cluster import LocalCluster

pytestmark = pytest.mark.cluster
NS = "informer-test"
WAIT = 60.0


def counter(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def config_map(name: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NS, "labels": {"informer-test": "yes"}},
        "data": {"value": value},
    }


def value_of(informer: Informer, name: str) -> str | None:
    obj = informer.get(name, NS)
    return None if obj is None else str((obj.get("data") or {}).get("value"))


@pytest.fixture(scope="module")
def kube(cluster: LocalCluster) -> Iterator[Kube]:
    kube = cluster.kube
    if kube.get("v1", "Namespace", NS) is None:
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    yield kube
    for cm in kube.list("v1", "ConfigMap", NS, "informer-test=yes"):
        kube.delete("v1", "ConfigMap", cm["metadata"]["name"], NS)


def watch_config_maps(kube: Kube) -> Informer:
    informer = Informer(kube, "v1", "ConfigMap", NS, "informer-test=yes").start()
    assert informer.wait_synced(WAIT)
    return informer


def test_the_cache_follows_changes_after_one_list(kube: Kube) -> None:
    kube.create(config_map("before", "1"))
    lists = counter(informers.LISTS, "ConfigMap", "initial")
    informer = watch_config_maps(kube)
    told: list[tuple[str, str | None]] = []
    informer.add_listener(lambda key, old, new: told.append((key, new and new["data"]["value"])))
    try:
        assert value_of(informer, "before") == "1"
        kube.create(config_map("after", "a"))
        kube.patch("v1", "ConfigMap", "before", {"data": {"value": "2"}}, namespace=NS)
        kube.delete("v1", "ConfigMap", "after", NS)
        assert informer.wait_for(
            lambda: value_of(informer, "before") == "2" and informer.get("after", NS) is None,
            WAIT,
        )
        assert (f"{NS}/after", "a") in told and (f"{NS}/after", None) in told
        # One list at the start; every change after it came by the watch.
        assert counter(informers.LISTS, "ConfigMap", "initial") == lists + 1
    finally:
        informer.stop()


def test_a_list_is_read_in_pages(kube: Kube, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        kube.create(config_map(f"page-{i}", str(i)))
    monkeypatch.setattr("flashmesh.kube.PAGE_SIZE", 2)
    items, version = kube.list_with_version("v1", "ConfigMap", NS, "informer-test=yes")
    names = {o["metadata"]["name"] for o in items}
    assert {f"page-{i}" for i in range(5)} <= names and version


def test_the_watch_survives_an_api_server_restart(kube: Kube, cluster: LocalCluster) -> None:
    informer = watch_config_maps(kube)
    try:
        kube.create(config_map("restart", "before"))
        assert informer.wait_for(lambda: value_of(informer, "restart") == "before", WAIT)
        restarts = sum(
            counter(informers.RESTARTS, "ConfigMap", cause)
            for cause in ("expired", "http-503", "error")
        )
        cluster.restart_apiserver()
        cluster.kube.patch("v1", "ConfigMap", "restart", {"data": {"value": "after"}}, namespace=NS)
        assert informer.wait_for(lambda: value_of(informer, "restart") == "after", WAIT)
        after = sum(
            counter(informers.RESTARTS, "ConfigMap", cause)
            for cause in ("expired", "http-503", "error")
        )
        assert after > restarts, "the watch was never broken: the restart proved nothing"
    finally:
        informer.stop()


def test_an_expired_resource_version_lists_again(kube: Kube, cluster: LocalCluster) -> None:
    """A version from before a restart of the API server is older than its new watch cache:
    the server answers 410 Gone, and an informer resuming from it lists again."""
    _, old = kube.list_with_version("v1", "ConfigMap", NS, "informer-test=yes")
    kube.create(config_map("expired", "missed"))  # a change the old version does not hold
    cluster.restart_apiserver()
    with pytest.raises(KubeError) as refused:
        for _ in kube.watch("v1", "ConfigMap", old, NS, "informer-test=yes"):
            pass
    assert refused.value.status == 410
    expired = counter(informers.LISTS, "ConfigMap", "expired")
    informer = Informer(kube, "v1", "ConfigMap", NS, "informer-test=yes").start(resume_from=old)
    try:
        assert informer.wait_for(lambda: value_of(informer, "expired") == "missed", WAIT)
        assert counter(informers.LISTS, "ConfigMap", "expired") == expired + 1
    finally:
        informer.stop()


class CuttableProxy:
    """A TCP relay to the API server whose connections can all be cut at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        with self.lock:
            cut, self.open = self.open, []
        for s in cut:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        return len(cut) // 2

    def close(self) -> None:
        self.server.close()
        self.cut()


def test_the_watch_survives_a_cut_network(
    kube: Kube, cluster: LocalCluster, tmp_path: Path
) -> None:
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    proxy = CuttableProxy((host, int(port)))
    config["clusters"][0]["cluster"]["server"] = f"https://{host}:{proxy.port}"
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    through = Kube.from_kubeconfig(tmp_path / "kubeconfig")
    informer = watch_config_maps(through)
    try:
        assert proxy.cut() >= 1, "no connection to cut: the watch does not run through it"
        kube.create(config_map("cut", "after the cut"))
        assert informer.wait_for(lambda: value_of(informer, "cut") == "after the cut", WAIT)
    finally:
        informer.stop()
        proxy.close()
        through.close()
