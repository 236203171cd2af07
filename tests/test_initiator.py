"""The NVMe-oF host side against a fake sysfs tree laid out as Debian's 6.12 kernel lays it
out (seen in a lab VM), with a runner that records argv and plays the kernel's part; and
the redaction that keeps DH-HMAC-CHAP keys out of logs, results and errors."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from flashmesh.csi_driver.errors import status_of
from flashmesh.csi_driver.metrics import PathStates
from flashmesh.dataplane import process
from flashmesh.dataplane.initiator import nvme, sysfs
from flashmesh.dataplane.initiator.nvme import ConnectOptions, InitiatorError
from flashmesh.dataplane.process import REDACTED, CommandError, Result

NQN = "nqn.2026-11.dev.flashmesh:fm-0123456789ab.s0r0"
HOST = "nqn.2014-08.org.nvmexpress:uuid:85f52238-1d93-59c6-ac81-dc68dc94941a"
KEY = "DHHC-1:00:Zmxhc2htZXNoLXRlc3Qta2V5LW5vdC1hLXJlYWwtb25lLg==:"


class FakeSysfs:
    """A fake /sys and /dev under a temporary folder: subsystems, controllers (linked from
    their subsystem, as the kernel does), multipath heads with their char device and hidden
    per-path disks beside them."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.dev.mkdir(parents=True)
        for folder in ("class/nvme", "class/nvme-subsystem", "class/block", "module/nvme_tcp"):
            (self.sys / folder).mkdir(parents=True)

    def _write(self, folder: Path, **files: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text + "\n")

    def subsystem_dir(self, instance: int) -> Path:
        return self.sys / "devices/virtual/nvme-subsystem" / f"nvme-subsys{instance}"

    def controller(
        self,
        instance: int,
        subsys: int,
        nqn: str = NQN,
        traddr: str = "10.77.0.1",
        trsvcid: str = "4420",
        state: str = "live",
        transport: str = "tcp",
        hostnqn: str = HOST,
    ) -> None:
        name = f"nvme{instance}"
        ctrl = self.sys / "devices/virtual/nvme-fabrics/ctl" / name
        address = f"traddr={traddr},trsvcid={trsvcid},src_addr=10.77.0.101"
        if transport == "pcie":
            address = traddr
        self._write(
            ctrl,
            address=address,
            state=state,
            transport=transport,
            subsysnqn=nqn,
            hostnqn=hostnqn,
            fast_io_fail_tmo="off",
            ctrl_loss_tmo="600",
        )
        (self.sys / "class/nvme" / name).symlink_to(ctrl)
        sub = self.subsystem_dir(subsys)
        self._write(sub, subsysnqn=nqn, model="Linux", iopolicy="numa")
        link = self.sys / "class/nvme-subsystem" / sub.name
        if not link.exists():
            link.symlink_to(sub)
        (sub / name).symlink_to(ctrl)
        (self.dev / name).touch()

    def namespace(self, subsys: int, head: str, nsid: int = 1, sectors: int = 131072) -> None:
        sub = self.subsystem_dir(subsys)
        self._write(sub / head, nsid=str(nsid), size=str(sectors), dev="259:1")
        self._write(sub / head.replace("nvme", "ng", 1), dev="243:0")
        for ctrl in sub.iterdir():
            if ctrl.is_symlink() and ctrl.name.startswith("nvme"):
                hidden = f"{ctrl.name}c{ctrl.name[4:]}n{nsid}"
                self._write(ctrl.resolve() / hidden, nsid=str(nsid), size=str(sectors))
        (self.sys / "class/block" / head).symlink_to(sub / head)
        (self.dev / head).touch()

    def state(self, instance: int, state: str) -> None:
        (self.sys / "class/nvme" / f"nvme{instance}" / "state").write_text(state + "\n")


class Host:
    """A runner that records what it is asked (and which secrets), and plays the kernel:
    `on[argv[1]]` runs before it answers, e.g. to make the controller nvme connect makes.
    Its `fabrics` plays /dev/nvme-fabrics: it records each option string written, runs
    `on["connect"]` and answers as the kernel does, or refuses with `refuse` (an errno)."""

    def __init__(self, answers: dict[str, Result] | None = None, refuse: int = 0) -> None:
        self.argv: list[tuple[str, ...]] = []
        self.secrets: list[tuple[str, ...]] = []
        self.answers = answers or {}
        self.on: dict[str, Callable[[], None]] = {}
        self.written: list[str] = []
        self.refuse = refuse

    def fabrics(self, options: str) -> str:
        self.written.append(options)
        if "connect" in self.on:
            self.on["connect"]()
        if self.refuse:
            raise OSError(self.refuse, os.strerror(self.refuse))
        return "instance=1,cntlid=1"

    def __call__(self, argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
        self.argv.append(tuple(argv))
        self.secrets.append(tuple(secrets))
        if argv[1] in self.on:
            self.on[argv[1]]()
        # Careless on purpose: it returns the secret; the redacting path must hide it.
        return self.answers.get(argv[1], Result(tuple(argv), 0, "", ""))

    def commands(self) -> list[str]:
        return [" ".join(a) for a in self.argv]


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path)


def options(**overrides: object) -> ConnectOptions:
    fields: dict[str, object] = {
        "transport": "tcp",
        "traddr": "10.77.0.1",
        "trsvcid": "4420",
        "nqn": NQN,
        "hostnqn": HOST,
    }
    fields.update(overrides)
    return ConnectOptions(**fields)  # type: ignore[arg-type]


def connect(host: Host, fake: FakeSysfs, opts: ConnectOptions, **kw: float) -> str:
    return nvme.connect(
        host, opts, sysfs_root=fake.sys, dev_root=fake.dev, fabrics=host.fabrics, **kw
    )


# --- redaction ---------------------------------------------------------------------------


def test_run_hands_the_secret_to_the_process_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen = tmp_path / "seen"
    script = f'printf %s "$1" > {seen}; echo "out $1"; echo "err $1" >&2; exit 3'
    argv = ["sh", "-c", script, "sh", f"--dhchap-secret={KEY}"]
    with caplog.at_level(logging.DEBUG, logger="flashmesh.dataplane.process"):
        result = process.run(argv, secrets=[KEY])
    assert seen.read_text() == f"--dhchap-secret={KEY}"  # the real argv ran
    assert result.argv[-1] == f"--dhchap-secret={REDACTED}"
    assert (result.rc, result.stdout, result.stderr) == (
        3,
        f"out --dhchap-secret={REDACTED}\n",
        f"err --dhchap-secret={REDACTED}\n",
    )
    assert KEY not in caplog.text and REDACTED in caplog.text
    with pytest.raises(CommandError) as failed:
        process.check_secret(process.run, argv, [KEY])
    assert KEY not in str(failed.value) and REDACTED in str(failed.value)


def test_a_careless_runner_cannot_leak_a_secret_into_an_error() -> None:
    def careless(argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
        return Result(tuple(argv), 1, "", f"bad key {KEY}")

    with pytest.raises(CommandError) as failed:
        process.check_secret(careless, ["nvme", "connect", f"-S={KEY}"], [KEY])
    assert KEY not in str(failed.value)
    assert str(failed.value) == f"nvme connect -S={REDACTED} failed (1): bad key {REDACTED}"


def test_a_timed_out_command_is_a_failed_one_reported_without_its_secret() -> None:
    late = process.run(["sh", "-c", "sleep 5", "sh", KEY], timeout=0.2, secrets=[KEY])
    assert late.rc == process.TIMED_OUT and "timed out after 0.2 s (killed)" in late.stderr
    failed = CommandError(late)
    assert failed.timed_out and KEY not in str(failed) and REDACTED in str(failed)
    # The CSI services answer it with UNAVAILABLE: the node is slow, the CO retries.
    code, message = status_of(failed)
    assert code == grpc.StatusCode.UNAVAILABLE and message.endswith("; retry")


def test_commands_that_write_metadata_are_never_killed_on_a_timer() -> None:
    for argv in (["mkfs.ext4", "-F", "/dev/x"], ["mkfs", "-t", "xfs"], ["/sbin/mdadm", "--create"],
                 ["resize2fs", "/dev/x"], ["xfs_growfs", "/m"], ["fsck.ext4", "-p"]):  # fmt: skip
        assert process.timeout_for(argv) is None, argv
    for argv in (["lvextend", "vg/lv"], ["nvme", "connect"], ["blkid", "-p"]):
        assert process.timeout_for(argv) == process.DEFAULT_TIMEOUT, argv


def test_without_secrets_nothing_changes() -> None:
    result = process.run(["echo", "plain"], secrets=["", ""])
    assert (result.argv, result.stdout) == (("echo", "plain"), "plain\n")
    # Longest first: a secret containing another is hidden whole.
    assert process.redact_text("abcdef", ["abc", "abcdef"]) == REDACTED


# --- sysfs -------------------------------------------------------------------------------


def test_a_subsystem_its_paths_and_its_head_device(fake: FakeSysfs) -> None:
    fake.controller(0, 0, traddr="10.77.1.1", state="connecting")
    fake.controller(1, 0)
    fake.namespace(0, "nvme0n1", sectors=262144)
    fake.controller(
        2, 2, nqn="nqn.2014.08.org.nvmexpress:local", traddr="0000:00:04.0", transport="pcie"
    )
    fake.namespace(2, "nvme2n1", nsid=1)

    sub = sysfs.find_subsystem(NQN, fake.sys)
    assert sub is not None and sub.name == "nvme-subsys0"
    assert [c.name for c in sub.controllers] == ["nvme0", "nvme1"]
    assert sub.namespaces == {1: "nvme0n1"}  # not ng0n1, not the hidden nvme0c0n1
    assert sysfs.namespace_device(NQN, 1, fake.sys) == "/dev/nvme0n1"
    assert sysfs.namespace_device(NQN, 2, fake.sys) is None
    assert sysfs.path_states(NQN, fake.sys) == [
        ("tcp", "10.77.0.1", "4420", "live"),
        ("tcp", "10.77.1.1", "4420", "connecting"),
    ]
    assert sysfs.block_sectors("/dev/nvme0n1", fake.sys) == 262144
    assert sysfs.block_sectors("/dev/nvme9n1", fake.sys) is None
    local = sysfs.find_subsystem("nqn.2014.08.org.nvmexpress:local", fake.sys)
    assert local is not None and local.controllers[0].traddr == "0000:00:04.0"
    assert sysfs.find_subsystem("nqn.other", fake.sys) is None
    assert sysfs.path_states("nqn.other", fake.sys) == []
    assert sysfs.controller_attribute("nvme1", "fast_io_fail_tmo", fake.sys) == (
        fake.sys / "class/nvme/nvme1/fast_io_fail_tmo"
    )


def test_a_named_link_resolves_to_the_kernels_block_name(tmp_path: Path) -> None:
    (tmp_path / "md").mkdir()
    (tmp_path / "md127").touch()
    (tmp_path / "md" / "fm-1-s0").symlink_to("../md127")  # as mdadm makes /dev/md/<name>
    assert sysfs.block_name(str(tmp_path / "md" / "fm-1-s0")) == "md127"
    assert sysfs.block_name("/dev/nvme0n1") == "nvme0n1"


def test_the_namespace_id_comes_from_its_nsid_file_not_its_name(fake: FakeSysfs) -> None:
    fake.controller(3, 3)
    fake.namespace(3, "nvme3n1", nsid=7)
    fake.namespace(3, "nvme3n2", nsid=1)
    assert sysfs.namespace_device(NQN, 1, fake.sys) == "/dev/nvme3n2"


def test_without_native_multipath_the_namespace_hangs_off_its_controller(
    fake: FakeSysfs,
) -> None:
    fake.controller(4, 4)
    ctrl = (fake.sys / "class/nvme/nvme4").resolve()
    (ctrl / "nvme4n1").mkdir()
    (ctrl / "nvme4n1" / "nsid").write_text("1\n")
    assert sysfs.namespace_device(NQN, 1, fake.sys) == "/dev/nvme4n1"


def test_a_controller_gone_while_reading_is_skipped(fake: FakeSysfs) -> None:
    fake.controller(0, 0)
    fake.controller(1, 0, traddr="10.77.1.1")
    # Its device went away between listing the subsystem and reading it: a dangling link.
    ctrl = (fake.sys / "class/nvme/nvme1").resolve()
    for entry in ctrl.iterdir():
        entry.unlink()
    ctrl.rmdir()
    assert sysfs.path_states(NQN, fake.sys) == [("tcp", "10.77.0.1", "4420", "live")]
    assert sysfs.subsystems(fake.sys / "nowhere") == []


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (
            "traddr=10.77.0.1,trsvcid=4420,src_addr=10.77.0.101\n",
            {"traddr": "10.77.0.1", "trsvcid": "4420", "src_addr": "10.77.0.101"},
        ),
        ("traddr=fe80::1,trsvcid=4421", {"traddr": "fe80::1", "trsvcid": "4421"}),
        ("0000:00:04.0\n", {"traddr": "0000:00:04.0"}),
        ("", {}),
    ],
)
def test_controller_addresses(text: str, parsed: dict[str, str]) -> None:
    assert sysfs.parse_address(text) == parsed


# --- nvme connect / disconnect -----------------------------------------------------------


def kernel_connects(
    fake: FakeSysfs, instance: int = 1, traddr: str = "10.77.0.1", **more: str
) -> Callable[[], None]:
    def made() -> None:
        fake.controller(instance, 1, traddr=traddr, **more)
        if not (fake.subsystem_dir(1) / "nvme1n1").exists():
            fake.namespace(1, "nvme1n1")

    return made


def test_connect_passes_every_option_and_the_key_off_any_command_line(fake: FakeSysfs) -> None:
    host = Host()
    host.on["connect"] = kernel_connects(fake)
    opts = options(
        hostid="85f52238-1d93-59c6-ac81-dc68dc94941a",
        ctrl_loss_tmo=60,
        reconnect_delay=2,
        keep_alive_tmo=5,
        fast_io_fail_tmo=4,
        nr_io_queues=4,
        dhchap_secret=KEY,
    )
    assert connect(host, fake, opts) == str(fake.dev / "nvme1n1")
    assert host.written == [
        f"transport=tcp,traddr=10.77.0.1,trsvcid=4420,nqn={NQN},hostnqn={HOST},"
        "hostid=85f52238-1d93-59c6-ac81-dc68dc94941a,ctrl_loss_tmo=60,reconnect_delay=2,"
        f"fast_io_fail_tmo=4,keep_alive_tmo=5,nr_io_queues=4,dhchap_secret={KEY}"
    ]
    assert host.argv == []  # no process: no command line for /proc/<pid>/cmdline to show
    assert KEY not in repr(opts)


def test_the_kernel_is_asked_through_the_fabrics_device(tmp_path: Path) -> None:
    """What the real writer does with the device: one write of the whole string, then a
    read of the answer (a file plays the character device here; the lab has the kernel)."""
    device = tmp_path / "nvme-fabrics"
    device.write_text("")
    answer = nvme.write_fabrics("transport=tcp,traddr=10.77.0.1", device)
    assert device.read_text() == "transport=tcp,traddr=10.77.0.1"
    assert answer == ""  # a file has nothing after what was written; the kernel answers


def test_a_connected_path_is_left_alone_but_gets_its_fast_io_fail(fake: FakeSysfs) -> None:
    fake.controller(1, 1, state="connecting")  # reconnecting on its own: not ours to redo
    fake.namespace(1, "nvme1n1")
    host = Host()
    assert connect(host, fake, options(fast_io_fail_tmo=-1)) == str(fake.dev / "nvme1n1")
    assert connect(host, fake, options()) == str(fake.dev / "nvme1n1")
    assert host.argv == []
    assert (fake.sys / "class/nvme/nvme1/fast_io_fail_tmo").read_text() == "off\n"  # as asked


def test_a_second_path_connects_and_leads_to_the_same_device(fake: FakeSysfs) -> None:
    fake.controller(1, 1)
    fake.namespace(1, "nvme1n1")
    host = Host()
    host.on["connect"] = kernel_connects(fake, 2, "10.77.1.1")
    assert connect(host, fake, options(traddr="10.77.1.1")) == str(fake.dev / "nvme1n1")
    assert host.written[0].startswith("transport=tcp,traddr=10.77.1.1,")
    assert len(sysfs.path_states(NQN, fake.sys)) == 2


def test_a_deleting_controller_or_another_host_nqn_is_not_a_connection(fake: FakeSysfs) -> None:
    fake.controller(1, 1, state="deleting")
    fake.controller(2, 1, traddr="10.77.0.1", hostnqn="nqn.2014-08.org.nvmexpress:uuid:other")
    host = Host()

    def replaced() -> None:
        fake.state(1, "live")
        fake.namespace(1, "nvme1n1")

    host.on["connect"] = replaced
    assert connect(host, fake, options()) == str(fake.dev / "nvme1n1")
    assert len(host.written) == 1


def test_the_transport_module_is_loaded_when_missing(fake: FakeSysfs) -> None:
    host = Host()
    host.on["connect"] = kernel_connects(fake, transport="rdma", trsvcid="4421")
    connect(host, fake, options(transport="rdma", trsvcid="4421"))
    assert host.commands()[0] == "modprobe -a nvme-fabrics nvme-rdma"


def test_a_racing_connect_that_finds_it_done_is_not_an_error(fake: FakeSysfs) -> None:
    host = Host(refuse=errno.EALREADY)
    host.on["connect"] = kernel_connects(fake)
    assert connect(host, fake, options()) == str(fake.dev / "nvme1n1")


def test_a_refused_connect_names_the_path_a_hint_and_no_key(fake: FakeSysfs) -> None:
    with pytest.raises(InitiatorError) as failed:
        connect(Host(refuse=errno.EIO), fake, options(dhchap_secret=KEY))
    message = str(failed.value)
    assert message.startswith(
        f"nvme connect to {NQN} at tcp 10.77.0.1:4420 failed: Input/output error ("
    )
    assert "host not allowed" in message and KEY not in message
    with pytest.raises(InitiatorError, match=r"Key was rejected by service \(the DH-HMAC-CHAP"):
        connect(Host(refuse=errno.EKEYREJECTED), fake, options(dhchap_secret=KEY))


def test_a_host_id_the_kernel_refuses_is_named(fake: FakeSysfs) -> None:
    with pytest.raises(InitiatorError) as failed:
        connect(Host(refuse=errno.EINVAL), fake, options())
    assert "the kernel knows this host NQN with another host ID" in str(failed.value)


def test_no_block_device_in_time_is_an_error_naming_the_path(fake: FakeSysfs) -> None:
    host = Host()
    host.on["connect"] = lambda: fake.controller(1, 1, state="connecting")
    with pytest.raises(InitiatorError) as late:
        connect(host, fake, options(), timeout=0.3, poll=0.05)
    assert str(late.value) == (
        f"no block device for {NQN} at tcp 10.77.0.1:4420 after 0.3 s "
        f"(tcp 10.77.0.1:4420 connecting); check that the target exports namespace 1 to "
        f"host {HOST}"
    )


def test_the_device_is_awaited_until_it_shows(fake: FakeSysfs) -> None:
    host = Host()
    host.on["connect"] = lambda: fake.controller(1, 1)
    polls = []

    def appear(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:
            fake.namespace(1, "nvme1n1")

    monkey = pytest.MonkeyPatch()
    monkey.setattr(nvme.time, "sleep", appear)
    try:
        assert connect(host, fake, options(), poll=0.01) == str(fake.dev / "nvme1n1")
    finally:
        monkey.undo()
    assert polls == [0.01, 0.01, 0.01]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"transport": "fc"}, "transport 'fc' is not one of tcp, rdma"),
        ({"trsvcid": "nvme"}, "trsvcid 'nvme' is not a port number"),
        ({"hostnqn": ""}, "hostnqn must not be empty"),
    ],
)
def test_bad_options_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options(**overrides)


def test_disconnect_is_idempotent(fake: FakeSysfs) -> None:
    host = Host()
    assert nvme.disconnect(host, NQN, fake.sys) is False
    fake.controller(1, 1)
    assert nvme.disconnect(host, NQN, fake.sys) is True
    assert host.commands() == [f"nvme disconnect --nqn={NQN}"]


def test_rescan_asks_each_live_path(fake: FakeSysfs) -> None:
    host = Host()
    with pytest.raises(InitiatorError, match=r"no live path to .* connect it first"):
        nvme.rescan(host, NQN, fake.sys)
    fake.controller(1, 1)
    fake.controller(2, 1, traddr="10.77.1.1", state="connecting")
    fake.controller(3, 1, traddr="10.77.2.1")
    assert nvme.rescan(host, NQN, fake.sys) == ["nvme1", "nvme3"]
    assert host.commands() == ["nvme ns-rescan /dev/nvme1", "nvme ns-rescan /dev/nvme3"]


def test_the_node_reports_its_paths_by_state_at_each_scrape(fake: FakeSysfs) -> None:
    fake.controller(0, 0)
    fake.controller(1, 0, traddr="10.77.1.1", state="connecting")
    fake.controller(2, 2, nqn="nqn.2014.08.org.nvmexpress:local", transport="pcie")
    registry = CollectorRegistry()
    registry.register(PathStates(fake.sys))
    value = registry.get_sample_value
    assert value("flashmesh_nvme_paths", {"subsystem": NQN, "state": "live"}) == 1
    assert value("flashmesh_nvme_paths", {"subsystem": NQN, "state": "connecting"}) == 1
    fake.state(1, "live")  # read again at the next scrape
    assert value("flashmesh_nvme_paths", {"subsystem": NQN, "state": "live"}) == 2
    local = {"subsystem": "nqn.2014.08.org.nvmexpress:local", "state": "live"}
    assert value("flashmesh_nvme_paths", local) is None  # not FlashMesh's
