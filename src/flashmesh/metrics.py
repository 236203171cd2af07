"""Serving Prometheus metrics: every component exposes /metrics on the port named by
FLASHMESH_METRICS_PORT (the Helm chart sets it), or the one given on the command line. A
component that can tell whether it is stuck also answers /healthz there (200, or 503 and
why), for its liveness probe."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

PORT_ENV = "FLASHMESH_METRICS_PORT"
log = logging.getLogger(__name__)

# None when live; otherwise why not (the probe's answer, and the log's).
Health = Callable[[], str | None]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds
        pass


def app(health: Health | None) -> Callable[..., Iterable[bytes]]:
    """/healthz from health(), everything else Prometheus's exposition."""
    metrics = make_wsgi_app()

    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if health is None or environ.get("PATH_INFO") != "/healthz":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        why = health()
        if why is not None:
            log.warning("not live: %s", why)
        status = "200 OK" if why is None else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{why or 'ok'}\n".encode()]

    return route


def serve(port: int | None, address: str = "0.0.0.0", health: Health | None = None) -> int | None:
    """Starts the /metrics (and, with health, /healthz) endpoint in a daemon thread; the
    port, or None when off (no port given and none in the environment, or port 0)."""
    if port is None:
        raw = os.environ.get(PORT_ENV, "")
        if not raw:
            return None
        try:
            port = int(raw)
        except ValueError:
            raise SystemExit(f"{PORT_ENV}={raw!r} is not a port number: use 1..65535") from None
    if not port:
        return None
    server = make_server(address, port, app(health), _Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", address, port)
    return port
