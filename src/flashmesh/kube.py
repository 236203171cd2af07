"""The one place that talks to the Kubernetes API (besides kopf's own watching).

A thin layer over the kubernetes client's dynamic client: objects go in and out as plain
dicts, and an API error becomes a KubeError that keeps the server's field causes, so a
caller can say which field was refused and why. An API server that cannot be reached, or
does not answer within the request timeout, is a KubeError too (503): a caller retries it
like any other unavailability instead of hanging or crashing on a transport error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError
from urllib3.exceptions import HTTPError

# Seconds to connect and to wait for an answer, per try (urllib3 tries an idempotent
# request up to 4 times). A watch asks the server to end it after WATCH_SECONDS and to
# send bookmarks meanwhile, so a minute without a byte is a hung server or a cut network.
REQUEST_TIMEOUT = (10.0, 60.0)
WATCH_SECONDS = 45
# Items per page of a LIST: a large kind is read in pages, never in one huge answer.
PAGE_SIZE = 500
# Objects as the API server sends them (named here: inside Kube, `list` is a method).
Objects = list[dict[str, Any]]


@dataclass(frozen=True)
class Cause:
    field: str
    message: str
    reason: str = ""


@dataclass
class KubeError(Exception):
    """An error status from the API server."""

    status: int
    reason: str
    message: str
    causes: list[Cause] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"

    @classmethod
    def from_body(cls, status: int, body: str | bytes | None) -> KubeError:
        try:
            data = json.loads(body or "{}")
        except ValueError:
            data = {"message": str(body)}
        details = data.get("details") or {}
        causes = [
            Cause(c.get("field", ""), c.get("message", ""), c.get("reason", ""))
            for c in details.get("causes") or []
        ]
        return cls(status, data.get("reason", ""), data.get("message", ""), causes)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _translate(exc: Exception) -> KubeError:
    if isinstance(exc, DynamicApiError):
        return KubeError.from_body(exc.status, exc.body)
    if isinstance(exc, ApiException):
        return KubeError.from_body(exc.status or 0, exc.body)
    if isinstance(exc, HTTPError):
        return KubeError(503, "ServiceUnavailable", f"the API server did not answer: {exc}")
    raise exc


class BoundedApiClient(client.ApiClient):
    """The kubernetes client waits for an answer forever unless each call names a timeout;
    this one bounds every request, the dynamic client's discovery included."""

    def __init__(self, configuration: client.Configuration, timeout: tuple[float, float]) -> None:
        super().__init__(configuration)
        self.timeout = timeout

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        # Every request of the client's, typed or dynamic, passes here with this keyword.
        kwargs["_request_timeout"] = kwargs.get("_request_timeout") or self.timeout
        return super().call_api(*args, **kwargs)


class Kube:
    """Create, read, update and delete any kind by apiVersion and kind."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self._dynamic: DynamicClient | None = None

    @classmethod
    def from_kubeconfig(
        cls,
        path: str | Path | None = None,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
        user_agent: str | None = None,
    ) -> Kube:
        """From a kubeconfig file, or in a pod from its service account. The user agent
        names the component in the API server's logs and audit records."""
        configuration = client.Configuration()
        if path is None:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=str(path), client_configuration=configuration)
        api_client = BoundedApiClient(configuration, request_timeout)
        if user_agent:
            api_client.user_agent = user_agent
        return cls(api_client)

    def close(self) -> None:
        self.api_client.close()

    @property
    def dynamic(self) -> DynamicClient:
        # Discovery is lazy and cached; it is refreshed when a kind is not found, so
        # CRDs installed after start-up are seen.
        if self._dynamic is None:
            self._dynamic = DynamicClient(self.api_client)
        return self._dynamic

    def _resource(self, api_version: str, kind: str) -> Any:
        try:
            return self.dynamic.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            raise KubeError(
                404, "NotFound", f"the API server serves no {kind} in {api_version}"
            ) from None
        except HTTPError as exc:  # discovery could not reach the server
            raise _translate(exc) from exc

    def _call(self, method: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
        """One request; its answer as a dict."""
        try:
            out = method(**kwargs)
        except (DynamicApiError, ApiException, HTTPError) as exc:
            raise _translate(exc) from exc
        return dict(out.to_dict())

    def create(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        res = self._resource(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace")
        kwargs = {"dry_run": "All"} if dry_run else {}
        return self._call(res.create, body=obj, namespace=namespace, **kwargs)

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        res = self._resource(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace")
        return self._call(res.replace, body=obj, namespace=namespace)

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._call(self._resource(api_version, kind).get, name=name, namespace=namespace)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        return self.list_with_version(api_version, kind, namespace, label_selector)[0]

    def list_with_version(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> tuple[Objects, str]:
        """Every object, read in pages of PAGE_SIZE, and the resourceVersion of the list
        (where a watch of the same objects starts)."""
        res = self._resource(api_version, kind)
        items: Objects = []
        token: str | None = None
        while True:
            out = self._call(
                res.get,
                namespace=namespace,
                label_selector=label_selector,
                limit=PAGE_SIZE,
                _continue=token,
            )
            items += [dict(item) for item in out.get("items") or []]
            meta = out.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def watch(
        self,
        api_version: str,
        kind: str,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) for each change after resource_version, with bookmarks, until
        the server ends the watch (after about WATCH_SECONDS). An expired resource version
        is a KubeError 410: the caller lists again."""
        res = self._resource(api_version, kind)
        try:
            for event in self.dynamic.watch(
                res,
                namespace=namespace,
                label_selector=label_selector,
                resource_version=resource_version,
                timeout=WATCH_SECONDS,
                allow_watch_bookmarks=True,
            ):
                yield str(event["type"]), dict(event["raw_object"])
        except (DynamicApiError, ApiException, HTTPError) as exc:
            raise _translate(exc) from exc

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: dict[str, Any],
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch, of the object or of a subresource such as status."""
        res = self._resource(api_version, kind)
        if subresource:
            res = res.subresources[subresource]
        return self._call(
            res.patch,
            name=name,
            namespace=namespace,
            body=patch,
            content_type="application/merge-patch+json",
        )

    def apply_status(
        self, obj: dict[str, Any], field_manager: str, namespace: str | None = None
    ) -> dict[str, Any]:
        """Server-side apply of the status fields in obj, owned by field_manager: several
        writers (one agent per node) each own their own entries of a list-map."""
        res = self._resource(obj["apiVersion"], obj["kind"]).subresources["status"]
        return self._call(
            res.patch,
            name=obj["metadata"]["name"],
            namespace=namespace,
            body=obj,
            content_type="application/apply-patch+yaml",
            field_manager=field_manager,
            force_conflicts=True,
        )

    def event(
        self,
        obj: dict[str, Any],
        reason: str,
        message: str,
        warning: bool = False,
        component: str = "flashmesh",
    ) -> None:
        """A Kubernetes Event about obj, as `kubectl describe` shows them."""
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        now = _now()
        self.create(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
                "involvedObject": {
                    "apiVersion": obj["apiVersion"],
                    "kind": obj["kind"],
                    "name": meta["name"],
                    "uid": meta.get("uid"),
                    "namespace": meta.get("namespace"),
                },
                "reason": reason,
                "message": message,
                "type": "Warning" if warning else "Normal",
                "source": {"component": component},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
        )

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        """Deletes the object; False when it was already gone."""
        try:
            self._call(self._resource(api_version, kind).delete, name=name, namespace=namespace)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # --- finalizers and leases ----------------------------------------------------------

    def add_finalizer(
        self, api_version: str, kind: str, name: str, finalizer: str, namespace: str | None = None
    ) -> bool:
        """Adds a finalizer unless the object has it or is being deleted; False when the
        object is gone or being deleted. A replace guarded by resourceVersion never drops
        another writer's finalizer: a conflict reads the object again."""
        return self._edit_finalizers(api_version, kind, name, namespace, finalizer, add=True)

    def remove_finalizer(
        self, api_version: str, kind: str, name: str, finalizer: str, namespace: str | None = None
    ) -> bool:
        """Removes a finalizer; False when the object (or the finalizer) is already gone."""
        return self._edit_finalizers(api_version, kind, name, namespace, finalizer, add=False)

    def _edit_finalizers(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        finalizer: str,
        add: bool,
    ) -> bool:
        for _ in range(5):
            data = self.get(api_version, kind, name, namespace)
            if data is None:
                return False
            meta = data["metadata"]
            current = list(meta.get("finalizers") or [])
            if add and meta.get("deletionTimestamp"):
                return False
            if (finalizer in current) == add:
                return add
            meta["finalizers"] = (
                [*current, finalizer] if add else [f for f in current if f != finalizer]
            )
            try:
                self.replace(data)
            except KubeError as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    return False
                raise
            return True
        raise KubeError(409, "Conflict", f"{kind} {name}: finalizers kept changing; try again")

    def renew_lease(self, namespace: str, name: str, holder: str, duration_seconds: int) -> None:
        """Creates or renews a coordination.k8s.io Lease: a heartbeat that costs one small
        write, read by whoever judges the holder's health."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration_seconds,
            "renewTime": now,
        }
        api = "coordination.k8s.io/v1"
        try:
            self.patch(api, "Lease", name, {"spec": spec}, namespace=namespace)
        except KubeError as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": api,
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {**spec, "acquireTime": now},
            }
            self.create(body)
