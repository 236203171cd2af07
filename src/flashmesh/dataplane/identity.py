"""The node's NVMe host identity (host NQN and host ID), the one the host already uses where it
has one.

Since Linux 6.5 the kernel keeps one host ID per host NQN: a connect that names a known NQN
with another ID is refused with EINVAL ("found same hostnqn ... but different hostid"). A GPU
node whose nvme-cli (or another NVMe-oF array's tooling) connects with /etc/nvme/hostnqn and
/etc/nvme/hostid must therefore see FlashMesh connect with the very same pair: FlashMesh
reuses /etc/nvme when both files hold a valid NQN and UUID. Without them it derives the pair
from the SMBIOS UUID, as `nvme gen-hostnqn` does (a stable identity of the machine). Either
way, when the kernel's own controllers already pair the NQN with another host ID, that ID is
taken: never a pair the kernel refuses. Two nodes that share an identity (a cloned image's
/etc/nvme, two machines with one SMBIOS UUID) are caught by the agent.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from flashmesh.core import naming

SMBIOS_UUID = Path("/sys/class/dmi/id/product_uuid")
ETC_NVME = Path("/etc/nvme")
NVME_CLASS = Path("/sys/class/nvme")
_UUID_NQN = "nqn.2014-08.org.nvmexpress:uuid:"
_NQN_MAX = 223  # NVMe base specification: an NQN is at most 223 bytes


class IdentityError(RuntimeError):
    pass


@dataclass(frozen=True)
class HostIdentity:
    nqn: str
    hostid: str
    source: str  # where the pair came from, for a person reading the log


def host_identity(
    smbios: Path = SMBIOS_UUID, etc: Path = ETC_NVME, controllers: Path = NVME_CLASS
) -> HostIdentity:
    return _kernel_paired(_from_etc(etc) or _from_smbios(smbios), controllers)


def _kernel_paired(found: HostIdentity, controllers: Path) -> HostIdentity:
    known = _kernel_hostid(found.nqn, controllers)
    if known and known != found.hostid:
        return HostIdentity(
            found.nqn, known, f"{found.source}, with the host ID the kernel pairs with it"
        )
    return found


def kept_identity(
    record: Path,
    upgraded: bool,
    smbios: Path = SMBIOS_UUID,
    etc: Path = ETC_NVME,
    controllers: Path = NVME_CLASS,
) -> HostIdentity:
    """The node plugin's identity, the same for the node's whole life: a CSI node ID must
    not change while volumes are published to it (ControllerUnpublish names it). Read from
    `record` when there; otherwise chosen now and written there. `upgraded`: the node has
    staged volumes but no record (a FlashMesh that derived its NQN from the SMBIOS UUID
    alone): it keeps that NQN. The host ID may still follow the kernel's pairing."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(record.read_text())
        nqn, hostid = str(data["nqn"]), _uuid(str(data["hostid"]))
        if nqn.startswith("nqn.") and hostid:
            found = HostIdentity(nqn, hostid, f"{record}, as chosen when this node started")
            return _kernel_paired(found, controllers)
    if upgraded:
        found = _kernel_paired(_from_smbios(smbios), controllers)
    else:
        found = host_identity(smbios, etc, controllers)
    record.parent.mkdir(parents=True, exist_ok=True)
    temp = record.with_suffix(".tmp")
    temp.write_text(json.dumps({"nqn": found.nqn, "hostid": found.hostid, "source": found.source}))
    temp.replace(record)
    return found


def host_id_now(nqn: str, chosen: str, etc: Path = ETC_NVME, controllers: Path = NVME_CLASS) -> str:
    """The host ID to connect with now: the one the kernel pairs with the NQN, if any (it
    refuses any other); else /etc/nvme's, when /etc/nvme/hostnqn is this NQN (the host's
    other tools connect with that pair, and would be refused after FlashMesh connected
    with another); else the one chosen at start. Read at every connect: /etc/nvme may be
    written after the node plugin started."""
    known = _kernel_hostid(nqn, controllers)
    if known:
        return known
    mine = _from_etc(etc)
    if mine is not None and mine.nqn == nqn:
        return mine.hostid
    return chosen


def host_nqn(smbios: Path = SMBIOS_UUID, etc: Path = ETC_NVME) -> str:
    return host_identity(smbios, etc).nqn


def _from_etc(etc: Path) -> HostIdentity | None:
    """/etc/nvme's pair when it is whole and valid; a hostnqn alone of the uuid form has
    its host ID in it (as nvme-cli reads it)."""
    nqn = _read(etc / "hostnqn")
    if not nqn or len(nqn.encode()) > _NQN_MAX or not nqn.startswith("nqn.") or " " in nqn:
        return None
    hostid = _uuid(_read(etc / "hostid"))
    if hostid is None and nqn.startswith(_UUID_NQN):
        hostid = _uuid(nqn.removeprefix(_UUID_NQN))
    if hostid is None:
        return None
    return HostIdentity(nqn, hostid, f"{etc}/hostnqn and hostid")


def _from_smbios(source: Path) -> HostIdentity:
    try:
        machine = source.read_text().strip()
    except OSError as exc:
        raise IdentityError(
            f"cannot read the node identity from {source} ({exc.strerror}) and /etc/nvme "
            "has no valid hostnqn and hostid: the host NQN derives from the SMBIOS UUID, "
            "which needs /sys mounted and root"
        ) from exc
    if not machine:
        raise IdentityError(
            f"{source} is empty and /etc/nvme has no valid hostnqn and hostid: the machine "
            "has no identity to derive a host NQN from"
        )
    nqn = naming.host_nqn(machine)
    return HostIdentity(nqn, nqn.removeprefix(_UUID_NQN), f"the SMBIOS UUID ({source})")


def _kernel_hostid(nqn: str, controllers: Path) -> str | None:
    """The host ID the kernel's NVMe-oF controllers pair with this NQN, if any."""
    for ctrl in sorted(controllers.glob("nvme*")):
        if _read(ctrl / "hostnqn") == nqn:
            known = _uuid(_read(ctrl / "hostid"))
            if known:
                return known
    return None


def _read(path: Path) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text().strip()
    return ""


def _uuid(text: str) -> str | None:
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        return None
