"""The gRPC server on a unix socket (or a TCP address in the lab): every call logged with
its secrets redacted, timed, and every exception answered with the code from errors.py.

Calls that may wait (on agents, commands, a volume's lock) hold a worker thread each, so
at most BUSY_CALLS of them run at once; the server has RESERVED workers more, which always
answer Identity (Probe is the liveness probe: a driver whose Probe waits behind a burst of
CreateVolumes gets restarted by the kubelet, mid-mkfs) and the other instant calls, and
turn the calls beyond the limit away at once with UNAVAILABLE, which the sidecars and the
kubelet retry with backoff."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from flashmesh.csi_driver.errors import status_of
from flashmesh.csi_driver.metrics import OPERATION_SECONDS
from flashmesh.csi_driver.redact import redacted

log = logging.getLogger(__name__)

BUSY_CALLS = 32
RESERVED = 8
# Calls that answer from memory at once: never counted against BUSY_CALLS.
INSTANT = {"ControllerGetCapabilities", "NodeGetCapabilities", "NodeGetInfo"}


def instant(full_method: str) -> bool:
    service, _, method = full_method.rpartition("/")
    return service.endswith(".Identity") or method in INSTANT


class CallLogger(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, busy_calls: int = BUSY_CALLS) -> None:
        self.busy_calls = busy_calls
        self._busy = threading.BoundedSemaphore(busy_calls)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        limited = not instant(details.method)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if limited and not self._busy.acquire(blocking=False):
                OPERATION_SECONDS.labels(method, "UNAVAILABLE").observe(0)
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the driver is busy with {self.busy_calls} calls; retry",
                )
            try:
                return logged(request, context)
            finally:
                if limited:
                    self._busy.release()

        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            begin = time.monotonic()
            log.info("%s request: %s", method, redacted(request))
            try:
                response = inner(request, context)
            except Exception as exc:
                code, message = status_of(exc)
                OPERATION_SECONDS.labels(method, code.name).observe(time.monotonic() - begin)
                level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
                log.log(level, "%s -> %s: %s", method, code.name, message,
                        exc_info=code == grpc.StatusCode.INTERNAL)  # fmt: skip
                context.abort(code, message)
            took = time.monotonic() - begin
            OPERATION_SECONDS.labels(method, "OK").observe(took)
            log.info("%s -> OK (%.3f s)", method, took)
            return response

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def endpoint_address(endpoint: str) -> str:
    """unix:///path, /path or host:port, as grpc binds it; a stale socket file goes."""
    if endpoint.startswith("unix://"):
        endpoint = endpoint.removeprefix("unix://")
        endpoint = "/" + endpoint.lstrip("/")
    if endpoint.startswith("/"):
        path = Path(endpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            os.unlink(path)
        return f"unix://{path}"
    return endpoint


def serve(
    endpoints: str | list[str],
    register: list[Callable[[grpc.Server], None]],
    busy_calls: int = BUSY_CALLS,
) -> grpc.Server:
    """One server on every endpoint (the lab's controller serves the sidecars on a socket and
    the VMs over TCP)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=busy_calls + RESERVED),
        interceptors=[CallLogger(busy_calls)],
    )
    for add in register:
        add(server)
    for endpoint in [endpoints] if isinstance(endpoints, str) else endpoints:
        address = endpoint_address(endpoint)
        if server.add_insecure_port(address) == 0 and not address.startswith("unix://"):
            raise OSError(f"cannot listen on {endpoint}")
        log.info("CSI server listening on %s", address)
    server.start()
    return server
