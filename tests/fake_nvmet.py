"""A stand-in for the kernel's nvmet configfs on a temporary folder, named as the fake it is:
it creates the default groups and attribute files that the kernel creates on mkdir, and
refuses what the kernel refuses (with the kernel's errno), so plans are checked for order
without a kernel. The real configfs is exercised in the VM lab (e2e/)."""

from __future__ import annotations

import errno
import os
import shutil

from flashmesh.dataplane.target.configfs import Fs

ZERO_UUID = "00000000-0000-0000-0000-000000000000"
NAMESPACE_ATTRS = ("device_path", "device_uuid", "device_nguid", "ana_grpid")
PORT_ATTRS = ("addr_trtype", "addr_traddr", "addr_trsvcid", "addr_adrfam")


def refuse(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class FakeNvmet(Fs):
    def _files(self, rel: str, files: dict[str, str], dirs: tuple[str, ...] = ()) -> None:
        for d in dirs:
            self.path(f"{rel}/{d}").mkdir(parents=True)
        for name, value in files.items():
            self.path(f"{rel}/{name}").write_text(value + "\n")

    def mkdir(self, rel: str) -> None:
        parts = rel.split("/")
        if len(parts) not in (2, 4):
            raise refuse(errno.EPERM)
        super().mkdir(rel)
        if parts[0] == "subsystems" and len(parts) == 2:
            serial = format(abs(hash(rel)) % 10**12, "x")
            self._files(
                rel,
                {"attr_allow_any_host": "0", "attr_serial": serial},
                ("namespaces", "allowed_hosts"),
            )
        elif parts[0] == "subsystems" and parts[2] == "namespaces":
            self._files(
                rel,
                {
                    "device_path": "(null)",
                    "device_uuid": ZERO_UUID,
                    "device_nguid": ZERO_UUID,
                    "ana_grpid": "1",
                    "enable": "0",
                },
            )
        elif parts[0] == "ports" and len(parts) == 2:
            self._files(rel, dict.fromkeys(PORT_ATTRS, ""), ("subsystems", "ana_groups/1"))
            self.path(f"{rel}/ana_groups/1/ana_state").write_text("optimized\n")
        elif parts[0] == "ports" and parts[2] == "ana_groups":
            self._files(rel, {"ana_state": "optimized"})
        elif parts[0] == "hosts":
            self._files(rel, {"dhchap_key": "", "dhchap_ctrl_key": ""})

    def rmdir(self, rel: str) -> None:
        parts = rel.split("/")
        path = self.path(rel)
        if parts[0] == "subsystems" and len(parts) == 2:
            nqn = parts[1]
            if any(
                self.path(f"ports/{p}/subsystems/{nqn}").is_symlink() for p in self.names("ports")
            ):
                raise refuse(errno.EBUSY)
            if self.names(f"{rel}/namespaces") or self.names(f"{rel}/allowed_hosts"):
                raise refuse(errno.ENOTEMPTY)
        elif parts[0] == "subsystems":
            if self.read(f"{rel}/enable") == "1":
                raise refuse(errno.EBUSY)
        elif parts[0] == "ports" and len(parts) == 2:
            if self.names(f"{rel}/subsystems"):
                raise refuse(errno.EBUSY)
            if self.names(f"{rel}/ana_groups") != ["1"]:
                raise refuse(errno.ENOTEMPTY)
        elif parts[0] == "ports" and parts[2:] == ["ana_groups", "1"]:
            raise refuse(errno.EPERM)  # group 1 is the port's default
        elif parts[0] == "hosts":
            for nqn in self.names("subsystems"):
                if self.path(f"subsystems/{nqn}/allowed_hosts/{parts[1]}").is_symlink():
                    raise refuse(errno.EBUSY)
        if not path.is_dir():
            raise refuse(errno.ENOENT)
        shutil.rmtree(path)

    def write(self, rel: str, value: str) -> None:
        parts = rel.split("/")
        if not self.path(rel).is_file():
            raise refuse(errno.ENOENT)  # configfs attributes are fixed
        attr = parts[-1]
        parent = "/".join(parts[:-1])
        if attr in NAMESPACE_ATTRS and self.read(f"{parent}/enable") == "1":
            raise refuse(errno.EBUSY)
        if attr == "enable" and value == "1" and self.read(f"{parent}/device_path") == "(null)":
            raise refuse(errno.EINVAL)
        if attr == "attr_allow_any_host" and value == "1" and self.names(f"{parent}/allowed_hosts"):
            raise refuse(errno.EINVAL)
        if attr in ("dhchap_key", "dhchap_ctrl_key") and not value.startswith("DHHC-1:"):
            raise refuse(errno.EINVAL)  # a key cannot be cleared, only replaced
        if attr in PORT_ATTRS and self.names(f"{parent}/subsystems"):
            raise refuse(errno.EACCES)
        super().write(rel, value + "\n")

    def link(self, rel: str, target_rel: str) -> None:
        parts = rel.split("/")
        if not self.path(target_rel).is_dir():
            raise refuse(errno.ENOENT)
        if (
            parts[2] == "allowed_hosts"
            and self.read(f"subsystems/{parts[1]}/attr_allow_any_host") == "1"
        ):
            raise refuse(errno.EINVAL)
        if parts[0] == "ports" and not self.read(f"ports/{parts[1]}/addr_trtype"):
            raise refuse(errno.EINVAL)  # a port without an address cannot be enabled
        super().link(rel, target_rel)
