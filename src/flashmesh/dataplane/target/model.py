"""A typed model of nvmet's configfs tree, named with the kernel's own attribute names.

subsystems/<nqn>/attr_allow_any_host, attr_serial
subsystems/<nqn>/namespaces/<nsid>/device_path, device_uuid, device_nguid, ana_grpid, enable
subsystems/<nqn>/allowed_hosts/<hostnqn>  -> hosts/<hostnqn>
ports/<id>/addr_trtype, addr_adrfam, addr_traddr, addr_trsvcid
ports/<id>/subsystems/<nqn>               -> subsystems/<nqn>
ports/<id>/ana_groups/<grpid>/ana_state
hosts/<hostnqn>/dhchap_key, dhchap_ctrl_key
"""

from __future__ import annotations

from dataclasses import dataclass, field

# FlashMesh's ports have ids from here up; ports below it belong to someone else and are
# never changed (FlashMesh only unlinks its own subsystems from them).
PORT_ID_BASE = 0xF000
ANA_STATES = ("optimized", "non-optimized", "inaccessible", "persistent-loss", "change")


@dataclass(frozen=True)
class Namespace:
    nsid: int
    device_path: str
    device_uuid: str
    device_nguid: str
    ana_grpid: int = 1
    enable: bool = True

    def attributes(self) -> dict[str, str]:
        """The attributes that can be written only while the namespace is disabled."""
        return {
            "device_path": self.device_path,
            "device_uuid": self.device_uuid,
            "device_nguid": self.device_nguid,
            "ana_grpid": str(self.ana_grpid),
        }


@dataclass(frozen=True)
class Subsystem:
    nqn: str
    serial: str = ""
    allow_any_host: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    namespaces: dict[int, Namespace] = field(default_factory=dict)
    # Observed: hosts not allowed whose controllers are, or may still be, live (nvmet's
    # debugfs where the kernel has it, and the cut-offs recorded but not done).
    cutting_off: frozenset[str] = frozenset()
    # Desired: hosts refused new connections (a disputed host NQN, a missing key) whose
    # live controllers stay: they connected when nothing was in dispute.
    kept_hosts: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Host:
    nqn: str
    dhchap_key: str | None = None
    dhchap_ctrl_key: str | None = None


@dataclass(frozen=True)
class Port:
    port_id: int
    trtype: str
    traddr: str
    trsvcid: str
    adrfam: str = "ipv4"
    subsystems: frozenset[str] = frozenset()
    # ANA group id -> state; group 1 always exists on every port.
    ana_states: dict[int, str] = field(default_factory=lambda: {1: "optimized"})

    def address(self) -> dict[str, str]:
        return {
            "addr_adrfam": self.adrfam,
            "addr_trtype": self.trtype,
            "addr_traddr": self.traddr,
            "addr_trsvcid": self.trsvcid,
        }


@dataclass
class Target:
    subsystems: dict[str, Subsystem] = field(default_factory=dict)
    ports: dict[int, Port] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
