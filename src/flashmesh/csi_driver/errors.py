"""The one table from FlashMesh's errors to the gRPC status codes the CSI spec prescribes.

Servicers raise; the server's interceptor answers with the code from here. A CsiError
carries its own code (the servicer decided it from the spec's table for that call)."""

from __future__ import annotations

import sys

import grpc

from flashmesh.core.capacity import CapacityError
from flashmesh.core.params import ParameterError
from flashmesh.core.placement import PlacementError
from flashmesh.dataplane.process import CommandError


class CsiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message a caller gets for an exception."""
    if isinstance(exc, CsiError):
        return exc.code, exc.message
    if isinstance(exc, ParameterError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, CapacityError):
        code = {"invalid": grpc.StatusCode.INVALID_ARGUMENT}.get(
            exc.kind, grpc.StatusCode.OUT_OF_RANGE
        )
        return code, str(exc)
    if isinstance(exc, PlacementError):
        code = (
            grpc.StatusCode.OUT_OF_RANGE
            if exc.kind == "never"
            else (grpc.StatusCode.RESOURCE_EXHAUSTED)
        )
        return code, str(exc)
    if isinstance(exc, CommandError) and exc.timed_out:
        # The node is slow, not the request wrong: the CO retries, and the step it left is
        # finished or redone then (the commands that must not stop half-way have no limit).
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry"
    # flashmesh.kube (and the large kubernetes client) is imported only by the components
    # that talk to the API: a node plugin starts without it, and cannot raise its errors.
    kube = sys.modules.get("flashmesh.kube")
    if kube is not None and isinstance(exc, kube.KubeError):
        # A conflict is another writer's change: the CO retries. The API server being
        # unreachable or refusing is not the caller's fault either.
        if exc.status == 409:
            return grpc.StatusCode.ABORTED, f"conflicting change, retry: {exc}"
        return grpc.StatusCode.UNAVAILABLE, f"Kubernetes API: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


# What a missing field is, for the message that names it.
HINTS = {
    "name": "the CO names each volume and snapshot",
    "node_id": "it is the node's host NQN (NodeGetInfo)",
    "capacity_range": "say the size to grow to",
    "staging_target_path": "FlashMesh stages every volume",
}


def require(request: object, *fields: str) -> None:
    """INVALID_ARGUMENT naming the first of these fields that the request leaves empty."""
    for name in fields:
        try:
            present = request.HasField(name)  # type: ignore[attr-defined]
        except ValueError:  # not a message field: a string, number or list
            present = bool(getattr(request, name))
        if not present:
            hint = HINTS.get(name)
            raise invalid(f"{name} is missing" + (f": {hint}" if hint else ""))
