"""The gRPC server on a unix socket (or a TCP address in the lab): every call logged with
its secrets redacted, timed, and every exception answered with the code from errors.py."""

from __future__ import annotations

import logging
import os
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


class CallLogger(grpc.ServerInterceptor):  # type: ignore[misc]
    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request: Any, context: grpc.ServicerContext) -> Any:
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


def serve(endpoints: str | list[str], register: list[Callable[[grpc.Server], None]]) -> grpc.Server:
    """One server on every endpoint (the lab's controller serves the sidecars on a socket and
    the VMs over TCP)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=[CallLogger()])
    for add in register:
        add(server)
    for endpoint in [endpoints] if isinstance(endpoints, str) else endpoints:
        address = endpoint_address(endpoint)
        if server.add_insecure_port(address) == 0 and not address.startswith("unix://"):
            raise OSError(f"cannot listen on {endpoint}")
        log.info("CSI server listening on %s", address)
    server.start()
    return server
