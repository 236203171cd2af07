"""Serving Prometheus metrics: every component exposes /metrics on the port named by
FLASHMESH_METRICS_PORT (the Helm chart sets it), or the one given on the command line."""

from __future__ import annotations

import logging
import os

from prometheus_client import start_http_server

PORT_ENV = "FLASHMESH_METRICS_PORT"
log = logging.getLogger(__name__)


def serve(port: int | None, address: str = "0.0.0.0") -> int | None:
    """Starts the /metrics endpoint in a daemon thread; the port, or None when off
    (no port given and none in the environment, or port 0)."""
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
    start_http_server(port, addr=address)
    log.info("metrics on http://%s:%d/metrics", address, port)
    return port
