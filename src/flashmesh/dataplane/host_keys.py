"""Where DH-HMAC-CHAP host keys live: Kubernetes Secrets in FlashMesh's namespace, labelled
flashmesh.dev/dhchap-key=true and annotated flashmesh.dev/host-nqn=<host NQN>, the key
under data.key. The agents write each allowed host's key into nvmet; a node plugin passes
its own host's key to `nvme connect`. A key never reaches a CR, a log line or an Event."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from flashmesh.core import resources
from flashmesh.kube import Kube

KEY_LABEL = f"{resources.GROUP}/dhchap-key"
HOST_NQN_ANNOTATION = f"{resources.GROUP}/host-nqn"
KEY_HINT = (
    f"a Secret in FlashMesh's namespace labelled {KEY_LABEL}=true, annotated "
    f"{HOST_NQN_ANNOTATION}=<host NQN>, with the key under data.key"
)


def host_keys(kube: Kube, namespace: str) -> dict[str, str]:
    """Host NQN -> DH-HMAC-CHAP secret."""
    return keys_from_secrets(kube.list("v1", "Secret", namespace, f"{KEY_LABEL}=true"))


def keys_from_secrets(secrets: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Host NQN -> DH-HMAC-CHAP secret, from the key Secrets (labelled KEY_LABEL=true)."""
    keys = {}
    for secret in secrets:
        nqn = (secret["metadata"].get("annotations") or {}).get(HOST_NQN_ANNOTATION)
        data = (secret.get("data") or {}).get("key")
        if nqn and data:
            keys[nqn] = base64.b64decode(data).decode().strip()
    return keys
