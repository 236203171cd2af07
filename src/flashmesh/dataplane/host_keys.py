"""Where DH-HMAC-CHAP host keys live: Kubernetes Secrets in FlashMesh's namespace, labelled
flashmesh.dev/dhchap-key=true and annotated flashmesh.dev/host-nqn=<host NQN>, the key
under data.key. The agents write each allowed host's key into nvmet; a node plugin passes
its own host's key to `nvme connect`. A key never reaches a CR, a log line or an Event."""

from __future__ import annotations

import base64
import binascii
import re
import zlib
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
            # Bytes that are not text stay in, replaced, for malformed() to refuse that host
            # (raising here would stop the agent's whole pass).
            keys[nqn] = base64.b64decode(data).decode(errors="replace").strip()
    return keys


# DHHC-1:<hash>:<base64 of the secret and its CRC-32>: as nvme gen-dhchap-key writes it.
_KEY = re.compile(r"DHHC-1:(0[0-3]):([A-Za-z0-9+/]+={0,2}):")


def key_problem(key: str) -> str | None:
    """Why the kernel would refuse this DH-HMAC-CHAP secret (None: it is well formed). The
    checks are the kernel's own: the DHHC-1 form, a secret of 32, 48 or 64 bytes, and its
    CRC-32. The answer never quotes the key."""
    found = _KEY.fullmatch(key)
    if found is None:
        return "it is not of the form DHHC-1:<00-03>:<base64>: (nvme gen-dhchap-key writes it)"
    try:
        raw = base64.b64decode(found.group(2), validate=True)
    except binascii.Error:
        return "its base64 part does not decode"
    secret, crc = raw[:-4], raw[-4:]
    if len(secret) not in (32, 48, 64):
        return f"its secret is {max(len(secret), 0)} bytes, not 32, 48 or 64"
    if zlib.crc32(secret) != int.from_bytes(crc, "little"):
        return "its CRC-32 does not match (a truncated or mistyped key)"
    return None


def malformed(keys: dict[str, str]) -> dict[str, str]:
    """Host NQN -> why, for each key the kernel would refuse: that host alone is refused."""
    out = {}
    for host, key in keys.items():
        why = key_problem(key)
        if why:
            out[host] = (
                f"the DH-HMAC-CHAP key Secret of {host} is malformed: {why}; fix its data.key"
            )
    return out
