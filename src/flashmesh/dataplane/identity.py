"""The node's NVMe host NQN, from its SMBIOS UUID (as `nvme gen-hostnqn` derives it): a
stable identity of the machine, unlike an /etc/nvme/hostnqn or machine id that a cloned
image carries to every copy. Two nodes that still share one are caught by the agent."""

from __future__ import annotations

from pathlib import Path

from flashmesh.core import naming

SMBIOS_UUID = Path("/sys/class/dmi/id/product_uuid")


class IdentityError(RuntimeError):
    pass


def host_nqn(source: Path = SMBIOS_UUID) -> str:
    try:
        identity = source.read_text().strip()
    except OSError as exc:
        raise IdentityError(
            f"cannot read the node identity from {source} ({exc.strerror}): the host NQN "
            "derives from the SMBIOS UUID, which needs /sys mounted and root"
        ) from exc
    if not identity:
        raise IdentityError(
            f"{source} is empty: the machine has no SMBIOS UUID to derive a host NQN"
        )
    return naming.host_nqn(identity)
