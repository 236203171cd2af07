"""QEMU VMs booting Debian's kernel over the host's own userland: the lab where FlashMesh's
data path (nvmet, nvme-tcp, nvme-rdma over soft-RoCE, LVM, device-mapper, md) is real.

Each VM runs under software emulation (-accel tcg: KVM hangs on these machines) with a
64 MiB code cache (QEMU's default 1 GiB would cost 1.4 GB of host memory per VM), sees the
host's root read-only over 9p with a private tmpfs overlay, and the lab's folder at /lab,
through which the host hands it commands. A VM's identity (SMBIOS UUID, and from it the NVMe
host NQN and host ID), its addresses and its drives derive from its name and number, so a
VM killed and started again comes back as the same node with the same data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flashmesh.lab import kernel as kernels
from flashmesh.lab import processes
from flashmesh.lab.netns import LabNetwork, bridge_address, tap_name, vm_address
from flashmesh.lab.progress import say

QEMU = "/usr/bin/qemu-system-x86_64"
STAGE2 = kernels.GUEST / "init-stage2"
STATE_FILE = "lab.json"
_LAB_UUID_NAMESPACE = uuid.UUID("4f0b3c52-6a5e-4e0c-9d1f-2f6a8e7b9c10")


def vm_uuid(name: str) -> str:
    return str(uuid.uuid5(_LAB_UUID_NAMESPACE, name))


def host_nqn(name: str) -> str:
    """The NVMe host NQN a VM's init derives from its SMBIOS UUID."""
    return f"nqn.2014-08.org.nvmexpress:uuid:{vm_uuid(name)}"


@dataclass(frozen=True)
class Drive:
    """An emulated NVMe drive over a sparse file that outlives the VM."""

    size_mib: int = 1024
    # Bytes per second for reads and writes together; None is unthrottled.
    bps: int | None = None


@dataclass(frozen=True)
class VmSpec:
    name: str
    index: int  # 1..200: the last byte of its addresses
    memory_mib: int = 256
    drives: tuple[Drive, ...] = ()
    links: int = 1  # how many of the lab's bridges it is attached to

    def address(self, link: int = 0) -> str:
        return vm_address(link, self.index)


@dataclass
class ExecResult:
    rc: int
    output: str
    seconds: float


class LabError(RuntimeError):
    pass


class VmDied(LabError):
    """The VM's QEMU process ended, for instance because its kernel panicked."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.vm = name


@dataclass
class _Vm:
    spec: VmSpec
    pid: int | None = None
    # Set when this process started the VM; a lab loaded from its state file has PIDs only.
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and processes.is_ours(self.pid, QEMU)


@dataclass
class Lab:
    """VMs on the lab's own network; use as a context manager so that they are torn down
    even when a test fails or is interrupted."""

    workdir: Path
    # A network the lab is given (a test session's) outlives it; one it makes is its own.
    network: LabNetwork | None = None
    links: int = 2
    die_with_parent: bool = True
    _vms: dict[str, _Vm] = field(default_factory=dict)
    _tap_names: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.owns_network = self.network is None
        if self.network is None:
            self.network = LabNetwork(self.links, name=f"fmlab-{os.getpid()}-{id(self):x}")
        self.net: LabNetwork = self.network
        self.kernel = kernels.ensure()

    # --- saved state, for `flashmesh lab` commands that outlive one process --------------

    def save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = {
            "network": self.net.name,
            "links": self.net.links,
            "owns_network": self.owns_network,
            "vms": [{**asdict(vm.spec), "pid": vm.pid} for vm in self._vms.values()],
        }
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> Lab:
        state = json.loads((workdir / STATE_FILE).read_text())
        network = LabNetwork(state["links"], name=state["network"])
        lab = cls(workdir, network=network, die_with_parent=False)
        lab.owns_network = state["owns_network"]
        for entry in state["vms"]:
            pid = entry.pop("pid")
            entry["drives"] = tuple(Drive(**d) for d in entry["drives"])
            spec = VmSpec(**entry)
            lab._vms[spec.name] = _Vm(spec, pid)
            lab._tap_names.update(tap_name(spec.index, link) for link in range(spec.links))
        return lab

    def vms(self) -> dict[str, bool]:
        """Each VM's name and whether it runs."""
        return {name: vm.alive() for name, vm in self._vms.items()}

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- life cycle ---------------------------------------------------------------------

    def up(self, specs: list[VmSpec], timeout: float = 300) -> None:
        """Starts the VMs together and waits until each accepts commands."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.net.exists():
            self.net.create()
        begin = time.monotonic()
        for spec in specs:
            self.start(spec)
        for spec in specs:
            self.wait_ready(spec.name, timeout)
        say(f"{len(specs)} VM(s) ready in {time.monotonic() - begin:.1f} s")

    def start(self, spec: VmSpec) -> None:
        if spec.links > self.net.links:
            raise LabError(f"{spec.name} wants {spec.links} links; the lab has {self.net.links}")
        run = self.run_dir(spec.name)
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        self._make_channel(spec.name)
        argv = ["ip", "netns", "exec", self.net.name, *self._qemu_argv(spec)]
        vm = self._vms.setdefault(spec.name, _Vm(spec))
        vm.spec = spec
        vm.proc = processes.spawn(argv, self.console(spec.name), self.die_with_parent)
        vm.pid = vm.proc.pid
        self.save()
        say(f"booting {spec.name} ({spec.memory_mib} MiB, {len(spec.drives)} drive(s))")

    def wait_ready(self, name: str, timeout: float = 300) -> None:
        vm = self._vm(name)

        def ready() -> bool:
            if not vm.alive():
                raise LabError(f"{name} exited:\n{self._tail(name)}")
            return (self.run_dir(name) / "ready").exists()

        if not processes.wait_until(ready, timeout, interval=0.2):
            raise LabError(f"{name} not ready after {timeout:.0f} s:\n{self._tail(name)}")

    def kill(self, name: str) -> None:
        """Pulls the plug: SIGKILL, no shutdown. Drives and identity stay for a restart."""
        vm = self._vm(name)
        if vm.proc is not None:
            if vm.proc.poll() is None:
                vm.proc.kill()
                vm.proc.wait()
        elif vm.pid is not None:
            processes.stop(vm.pid, QEMU, timeout=0)

    def restart(self, name: str, timeout: float = 300) -> None:
        """Boots a VM again as the same node: same UUID, addresses and drive files."""
        self.kill(name)
        self.start(self._vm(name).spec)
        self.wait_ready(name, timeout)

    def revive(self) -> list[str]:
        """Boots again every VM whose process has ended; their names."""
        dead = [name for name, vm in self._vms.items() if not vm.alive()]
        for name in dead:
            say(f"{name} is not running: booting it again")
            self.restart(name)
        return dead

    def down(self) -> None:
        """Stops every VM, removes their taps (and the network, if the lab made it) and the
        lab's folder."""
        for name, vm in list(self._vms.items()):
            self.kill(name)
            for link in range(vm.spec.links):
                self.net.delete_tap(vm.spec.index, link)
        self._vms.clear()
        if self.owns_network:
            self.net.destroy()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What a teardown left behind (empty when clean): VMs, namespace, taps, mounts, files."""
        found = []
        for pid in _pids_of(QEMU):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if str(self.workdir) in cmdline:
                found.append(f"VM process {pid}")
        if self.owns_network and self.net.exists():
            found.append(f"namespace {self.net.name} with taps {self.net.taps()}")
        elif self.net.exists():
            found += [f"tap {tap}" for tap in self.net.taps() if tap in self._tap_names]
        for line in Path("/proc/mounts").read_text().splitlines():
            if str(self.workdir) in line or (self.owns_network and self.net.name in line):
                found.append(f"mount {line}")
        if self.workdir.exists():
            found.append(f"folder {self.workdir}")
        return found

    # --- commands -----------------------------------------------------------------------

    def exec(self, name: str, command: str, timeout: float = 300, check: bool = True) -> ExecResult:
        """Runs a bash script in the VM; its exit code and combined output."""
        result = self.wait(name, self.spawn(name, command), timeout)
        if check and result.rc != 0:
            raise LabError(
                f"{name}: exit {result.rc} from:\n{command}\n--- output ---\n{result.output}"
            )
        return result

    def spawn(self, name: str, command: str) -> str:
        """Starts a bash script in the VM and returns its job id, for wait()."""
        self._vm(name)
        job = f"job-{uuid.uuid4().hex[:12]}"
        run = self.run_dir(name)
        (run / f"{job}.tmp").write_text(command + "\n")
        (run / f"{job}.tmp").rename(run / f"{job}.cmd")  # the agent only picks up whole files
        self._wake(name, job)
        return job

    def _make_channel(self, name: str) -> None:
        """The FIFOs behind the VM's lab.cmd port: QEMU holds both open (read and write),
        so any host process can write a wake-up line and the guest's read blocks."""
        base = self.channel(name)
        base.parent.mkdir(parents=True, exist_ok=True)
        for end in (".in", ".out"):
            path = base.with_name(base.name + end)
            path.unlink(missing_ok=True)
            os.mkfifo(path, 0o600)

    def _wake(self, name: str, job: str) -> None:
        """Tells the VM's command agent a command is waiting. Never blocks: a VM not
        running has no reader (ENXIO), a full FIFO means wake-ups are already queued, and
        the agent also scans its folder on its own (once a minute) should one be lost."""
        path = self.channel(name)
        try:
            fd = os.open(path.with_name(path.name + ".in"), os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.write(fd, f"{job}\n".encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    def wait(self, name: str, job: str, timeout: float = 300) -> ExecResult:
        run = self.run_dir(name)
        vm = self._vm(name)
        begin = time.monotonic()

        def finished() -> bool:
            if not vm.alive():
                raise VmDied(name, f"{name} died while running {job}:\n{self._tail(name)}")
            return (run / f"{job}.rc").exists()

        if not processes.wait_until(finished, timeout, interval=0.1):
            partial = _read(run / f"{job}.out")
            raise LabError(f"{name}: {job} still running after {timeout:.0f} s:\n{partial}")
        rc = int((run / f"{job}.rc").read_text())
        output = _read(run / f"{job}.out")
        for suffix in ("rc", "out", "running"):
            (run / f"{job}.{suffix}").unlink(missing_ok=True)
        return ExecResult(rc, output, time.monotonic() - begin)

    # --- faults -------------------------------------------------------------------------

    def cut_link(self, name: str, link: int = 0) -> None:
        """Takes the VM's tap on a bridge down: its frames on that link go nowhere."""
        self.net.set_tap(self._vm(name).spec.index, link, up=False)

    def restore_link(self, name: str, link: int = 0) -> None:
        self.net.set_tap(self._vm(name).spec.index, link, up=True)

    # --- paths and details --------------------------------------------------------------

    def run_dir(self, name: str) -> Path:
        return self.workdir / "run" / name

    def channel(self, name: str) -> Path:
        """The host side of the VM's command port: FIFOs at this path plus .in and .out."""
        return self.workdir / "channels" / f"{name}.cmd"

    def console(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.console.log"

    def drive_file(self, name: str, number: int) -> Path:
        return self.workdir / "drives" / f"{name}-nvme{number}.img"

    def drive_serial(self, name: str, number: int) -> str:
        """The NVMe serial the VM's drive number has (at most 20 characters)."""
        return f"fm{vm_uuid(name)[:8]}n{number}"

    def pid(self, name: str) -> int:
        """The PID of the VM's QEMU process (`ip netns exec` execs it, keeping the PID)."""
        pid = self._vm(name).pid
        if pid is None:
            raise LabError(f"{name} was never started")
        return pid

    def spec(self, name: str) -> VmSpec:
        return self._vm(name).spec

    def _vm(self, name: str) -> _Vm:
        try:
            return self._vms[name]
        except KeyError:
            raise LabError(f"no VM named {name} in this lab") from None

    def _tail(self, name: str, lines: int = 80) -> str:
        return "\n".join(_read(self.console(name)).splitlines()[-lines:])

    def _qemu_argv(self, spec: VmSpec) -> list[str]:
        k = self.kernel
        append = [
            "console=ttyS0",
            "panic=-1",
            "quiet",
            "loglevel=4",
            f"lab.name={spec.name}",
            f"lab.modules={k.modules}",
            f"lab.stage2={STAGE2}",
        ]
        argv = [
            QEMU,
            "-accel",
            "tcg,tb-size=64",
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            str(spec.memory_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-name",
            spec.name,
            "-uuid",
            vm_uuid(spec.name),
            "-kernel",
            str(k.vmlinuz),
            "-initrd",
            str(k.initrd),
            "-serial",
            f"file:{self.console(spec.name)}",
            "-monitor",
            "none",
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={self.workdir},mount_tag=lab,security_model=none,multidevs=remap",
            # The command port: the host wakes the guest's command agent through it.
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            f"pipe,id=labcmd,path={self.channel(spec.name)}",
            "-device",
            "virtserialport,bus=vser0.0,chardev=labcmd,name=lab.cmd",
        ]
        for link in range(spec.links):
            tap = self.net.add_tap(spec.index, link)
            self._tap_names.add(tap)
            append.append(f"lab.ip{link}={spec.address(link)}/24")
            mac = f"52:54:00:77:{link:02x}:{spec.index:02x}"
            argv += [
                "-netdev",
                f"tap,id=n{link},ifname={tap},script=no,downscript=no",
                "-device",
                f"virtio-net-pci,netdev=n{link},mac={mac}",
            ]
        for number, drive in enumerate(spec.drives):
            path = self.drive_file(spec.name, number)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                with path.open("wb") as f:
                    f.truncate(drive.size_mib << 20)  # sparse
            throttle = f",throttling.bps-total={drive.bps}" if drive.bps else ""
            serial = self.drive_serial(spec.name, number)
            argv += [
                "-drive",
                f"file={path},if=none,id=d{number},format=raw{throttle}",
                "-device",
                f"nvme,drive=d{number},serial={serial}",
            ]
        self.console(spec.name).parent.mkdir(parents=True, exist_ok=True)
        return [*argv, "-append", " ".join(append)]


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""


def _pids_of(executable: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(proc / "exe").resolve() == Path(executable):
                    pids.append(int(proc.name))
    return pids


__all__ = [
    "Drive",
    "ExecResult",
    "Lab",
    "LabError",
    "VmDied",
    "VmSpec",
    "bridge_address",
    "host_nqn",
]
