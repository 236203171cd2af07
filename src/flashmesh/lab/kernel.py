"""Debian's 6.12 kernel for the lab's VMs, and the small initramfs that boots them.

The kernel package is fetched with apt-get download and unpacked (never installed), and
depmod runs over the unpacked tree. The initramfs holds a static busybox and the few
modules needed to mount the host's root over 9p; every other module is loaded after
switch_root by the host's own kmod from the unpacked tree. Both are cached by kernel
version outside the repository. Debian's 6.12 (not the 6.1 that linux-image-amd64 pulls)
is the one with NVMe in-band authentication (DH-HMAC-CHAP).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flashmesh.lab.binaries import cache_dir
from flashmesh.lab.progress import say

PACKAGE_PATTERN = re.compile(r"^linux-image-(6\.12\.(\d+)\+deb12-amd64)$")
# Modules the initramfs loads itself, to reach the host's root over virtio 9p + overlay.
INITRAMFS_MODULES = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay")
GUEST = Path(__file__).resolve().parent / "guest"


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. 6.12.117+deb12-amd64
    root: Path  # the unpacked package

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    @property
    def initrd(self) -> Path:
        return self.root.parent / "initrd.gz"


def newest_package() -> str:
    """The newest linux-image-6.12.N+deb12-amd64 that apt knows (after an update if none)."""
    for attempt in range(2):
        out = subprocess.run(
            ["apt-cache", "search", "--names-only", r"^linux-image-6\.12\..*\+deb12-amd64$"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = [m for line in out.splitlines() if (m := PACKAGE_PATTERN.match(line.split(" ")[0]))]
        if found:
            return max(found, key=lambda m: int(m.group(2))).group(0)
        if attempt == 0:
            say("apt knows no 6.12 kernel package yet: running apt-get update")
            subprocess.run(["apt-get", "update", "-qq"], check=True)
    raise RuntimeError("no linux-image-6.12.*+deb12-amd64 package in apt's lists")


def cached() -> Kernel | None:
    """A complete kernel in the cache (the newest, if several)."""
    base = cache_dir() / "kernel"
    done = sorted(base.glob("*/.complete"), key=lambda p: p.stat().st_mtime)
    if not done:
        return None
    folder = done[-1].parent
    return Kernel(folder.name, folder / "tree")


def ensure() -> Kernel:
    """The kernel and initramfs, fetched and built first when the cache has none."""
    kernel = cached()
    if kernel is not None:
        return kernel
    package = newest_package()
    version = package.removeprefix("linux-image-")
    folder = cache_dir() / "kernel" / version
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    kernel = Kernel(version, folder / "tree")
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt user downloads into it
        say(f"downloading {package} (about 110 MB)")
        subprocess.run(["apt-get", "download", "-qq", package], cwd=tmp, check=True)
        (deb,) = Path(tmp).glob("*.deb")
        say("unpacking the kernel and running depmod")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(kernel.root)], check=True)
    subprocess.run(["depmod", "-b", str(kernel.root), version], check=True)
    say("building the initramfs")
    build_initramfs(kernel)
    (folder / ".complete").touch()
    return kernel


def _module_closure(kernel: Kernel) -> list[Path]:
    paths: list[Path] = []
    for module in INITRAMFS_MODULES:
        out = subprocess.run(
            ["modprobe", "-d", str(kernel.root), "-S", kernel.version, "--show-depends", module],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod" and Path(parts[1]) not in paths:
                paths.append(Path(parts[1]))
    return paths


def build_initramfs(kernel: Kernel) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "lower", "upper", "newroot"):
            (root / d).mkdir()
        shutil.copy2("/bin/busybox", root / "bin" / "busybox")
        mods = root / "lib" / "modules" / kernel.version
        for ko in _module_closure(kernel):
            # Debian compresses modules with xz, which busybox's modprobe cannot read.
            rel = ko.relative_to(kernel.modules)
            target = mods / str(rel).removesuffix(".xz")
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                subprocess.run(["xz", "-dc", str(ko)], stdout=out, check=True)
        for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            shutil.copy2(kernel.modules / name, mods / name)
        subprocess.run(["depmod", "-b", str(root), kernel.version], check=True)
        init = root / "init"
        shutil.copy2(GUEST / "init-stage1", init)
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input=files,
            capture_output=True,
            check=True,
        ).stdout
        with kernel.initrd.open("wb") as out:
            subprocess.run(["gzip", "-1"], input=cpio, stdout=out, check=True)


if __name__ == "__main__":
    found = ensure()
    say(f"kernel {found.version}: {found.vmlinuz}, initramfs {found.initrd}")
