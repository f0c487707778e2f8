"""systemd integration: the notify protocol, the unit files, and the hardening they rely on.

* :mod:`dicomnode.sdnotify` against real unix datagram sockets (a path and an abstract name).
* ``systemd-analyze verify`` on every unit (with its drop-ins), where systemd-analyze exists (Debian
  package ``systemd``; it needs no running systemd). The units name the installed
  ``/opt/dicomnode/.venv/bin/dicomnode``, which verify insists exists, so the test verifies copies
  whose ExecStart points at this virtualenv's real ``dicomnode`` script instead.
* A static check that every unit carries Type=notify and the hardening, and that user, state
  directory, spool and config path agree with the example config, sysusers.d and tmpfiles.d.
* ``MemoryDenyWriteExecute=yes`` is reproduced with the seccomp filter systemd installs for it
  (libseccomp, which systemd depends on) and the node's real work runs under it: decoding every
  compressed sample and an ensemble forward pass.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomnode import sdnotify
from dicomnode.config import load_config
from dicomnode.storage import StateLayout
from tests.faults.conftest import record_counts

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = REPO / "systemd"
SHARED = REPO.parent / "shared"
EXAMPLE_CONFIG = SYSTEMD_DIR / "dicomnode.example.toml"
INSTALLED_CONFIG = "/etc/dicomnode/dicomnode.toml"
INSTALLED_DICOMNODE = "/opt/dicomnode/.venv/bin/dicomnode"
USER = "dicomnode"

# unit file -> the `dicomnode` command it runs, and the drop-ins that apply to it
UNITS = {
    "dicomnode.service": ("serve", ("gpu.conf", "privileged-port.conf")),
    "dicomnode-listen.service": ("listen", ("privileged-port.conf",)),
    "dicomnode-work.service": ("work", ("gpu.conf",)),
    "dicomnode-site.service": ("serve", ("privileged-port.conf",)),
}
#: Units whose process never runs inference (no PyTorch): MemoryDenyWriteExecute=yes holds.
NO_INFERENCE = {"dicomnode-listen.service", "dicomnode-site.service"}

# What every unit must say, exactly (systemd's own spelling of each value).
REQUIRED_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "Restart": "on-failure",
    "User": USER,
    "Group": USER,
    "UMask": "0077",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateMounts": "yes",
    "NoNewPrivileges": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "StateDirectoryMode": "0750",
}


# --- sd_notify --------------------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """A bound unix datagram socket named in ``$NOTIFY_SOCKET``, as systemd provides it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = tmp_path / "notify"
        sock.bind(str(path))
        monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, str(path))
    else:
        name = f"dicomnode-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, "@" + name)
    sock.settimeout(5)
    with sock:
        yield sock


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (sdnotify.ready, b"READY=1"),
        (lambda: sdnotify.ready("listening on 11112"), b"READY=1\nSTATUS=listening on 11112"),
        (sdnotify.watchdog_ping, b"WATCHDOG=1"),
        (lambda: sdnotify.status("3 studies queued"), b"STATUS=3 studies queued"),
        (sdnotify.stopping, b"STOPPING=1"),
    ],
)
def test_messages_arrive(notify_socket: socket.socket, send: object, expected: bytes) -> None:
    assert callable(send)
    assert send() is True
    assert notify_socket.recv(4096) == expected


def test_messages_arrive_in_order(notify_socket: socket.socket) -> None:
    sent = [sdnotify.ready(), sdnotify.watchdog_ping(), sdnotify.status("é"), sdnotify.stopping()]
    assert sent == [True] * 4
    received = [notify_socket.recv(4096) for _ in sent]
    assert received == [b"READY=1", b"WATCHDOG=1", "STATUS=é".encode(), b"STOPPING=1"]


def test_unset_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sdnotify.NOTIFY_SOCKET, raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.watchdog_ping() is False
    assert sdnotify.notify("STOPPING=1") is False


def test_closed_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gone"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, str(path))  # file left, nobody listening
    assert sdnotify.ready() is False
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, str(tmp_path / "never-existed"))
    assert sdnotify.watchdog_ping() is False
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, f"@dicomnode-test-{uuid.uuid4().hex}")
    assert sdnotify.stopping() is False


@pytest.mark.parametrize("value", ["", "@", "relative/path", "vsock:2:1234"])
def test_unsupported_socket_values_are_ignored(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, value)
    assert sdnotify.socket_address(value) is None
    assert sdnotify.ready() is False


@pytest.mark.parametrize("message", ["", "READY", "=1", "READY=1\nSTATUS"])
def test_malformed_message_raises(notify_socket: socket.socket, message: str) -> None:
    with pytest.raises(ValueError, match="sd_notify message"):
        sdnotify.notify(message)


@pytest.mark.parametrize("text", ["two\nlines", "carriage\rreturn"])
def test_status_must_be_one_line(notify_socket: socket.socket, text: str) -> None:
    with pytest.raises(ValueError, match="one line"):
        sdnotify.status(text)
    with pytest.raises(ValueError, match="one line"):
        sdnotify.ready(text)


# --- watchdog ----------------------------------------------------------------------------------


def test_watchdog_off_without_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sdnotify.WATCHDOG_USEC, raising=False)
    monkeypatch.setenv(sdnotify.WATCHDOG_PID, str(os.getpid()))
    assert sdnotify.watchdog_interval() is None


@given(usec=st.integers(min_value=1, max_value=10**12))
def test_watchdog_interval_for_this_process(usec: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(sdnotify.WATCHDOG_USEC, str(usec))
        mp.setenv(sdnotify.WATCHDOG_PID, str(os.getpid()))
        assert sdnotify.watchdog_interval() == usec / 1_000_000
        mp.delenv(sdnotify.WATCHDOG_PID)  # no PID given: the watchdog is ours
        assert sdnotify.watchdog_interval() == usec / 1_000_000


def test_watchdog_of_another_process_is_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child process inherits the variables; the watchdog stays with the parent it names."""
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC, "30000000")
    monkeypatch.setenv(sdnotify.WATCHDOG_PID, str(os.getpid()))
    code = "from dicomnode import sdnotify; print(sdnotify.watchdog_interval())"
    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "None"
    assert sdnotify.watchdog_interval() == 30.0


@pytest.mark.parametrize(
    ("usec", "pid", "name"),
    [
        ("soon", None, "WATCHDOG_USEC"),
        ("0", None, "WATCHDOG_USEC"),
        ("-5", None, "WATCHDOG_USEC"),
        ("²", None, "WATCHDOG_USEC"),
        ("1000", "me", "WATCHDOG_PID"),
        ("1000", "0", "WATCHDOG_PID"),
    ],
)
def test_malformed_watchdog_variables_raise(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, name: str
) -> None:
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC, usec)
    if pid is None:
        monkeypatch.delenv(sdnotify.WATCHDOG_PID, raising=False)
    else:
        monkeypatch.setenv(sdnotify.WATCHDOG_PID, pid)
    with pytest.raises(ValueError, match=name):
        sdnotify.watchdog_interval()


# --- unit files: parsing and static checks -----------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (in order) of a systemd unit file or drop-in.

    Follows systemd's syntax as far as these files use it: ``#``/``;`` comments, backslash line
    continuations, repeated keys accumulating (an empty assignment resets the list, as systemd
    does for list settings; it reads back as ``[""]``).
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = text.replace("\\\n", " ").splitlines()
    for raw in logical:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep:
            raise ValueError(f"not a unit file line: {raw!r}")
        values = current.setdefault(key.strip(), [])
        if not value.strip() or values == [""]:
            values.clear()  # "Key=" resets the list (and is kept as [""]: set, but empty)
        values.append(value.strip())
    return sections


def service_section(name: str) -> dict[str, list[str]]:
    return parse_unit((SYSTEMD_DIR / name).read_text())["Service"]


def single(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values is not None and len(values) == 1, f"{key} must be set once, got {values}"
    return values[0]


def environment(section: dict[str, list[str]]) -> dict[str, str]:
    pairs = [pair for value in section.get("Environment", []) for pair in shlex.split(value)]
    return dict(pair.split("=", 1) for pair in pairs)


def example_state_dir() -> Path:
    return load_config(EXAMPLE_CONFIG).node.state_dir


def test_parse_unit_follows_systemd_syntax() -> None:
    parsed = parse_unit(
        "[Unit]\n# comment\nDescription=x\n[Service]\nDeviceAllow=a\n; c\nDeviceAllow=b\n"
        "ExecStart=/bin/x \\\n  --y\nAmbientCapabilities=\nDeviceAllow=\nDeviceAllow=c\n"
    )
    assert parsed["Unit"] == {"Description": ["x"]}
    assert parsed["Service"]["DeviceAllow"] == ["c"]
    assert parsed["Service"]["ExecStart"] == ["/bin/x    --y"]
    assert parsed["Service"]["AmbientCapabilities"] == [""]
    with pytest.raises(ValueError, match="not a unit file line"):
        parse_unit("Orphan=1\n")


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_is_notify_and_hardened(unit: str) -> None:
    service = service_section(unit)
    for key, expected in REQUIRED_SERVICE.items():
        assert single(service, key) == expected, f"{unit}: {key}"
    # PyTorch's oneDNN CPU kernels need writable+executable memory (see the MDWE tests below).
    runs_inference = unit not in NO_INFERENCE
    assert single(service, "MemoryDenyWriteExecute") == ("no" if runs_inference else "yes")
    assert float(single(service, "WatchdogSec")) > 0
    assert int(single(service, "LimitNOFILE")) >= 4096
    filters = service["SystemCallFilter"]
    assert "@system-service" in filters and "~@privileged" in filters
    assert single(service, "SystemCallErrorNumber") == "EPERM"


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_runs_its_command_on_the_installed_config(unit: str) -> None:
    command, _ = UNITS[unit]
    argv = shlex.split(single(service_section(unit), "ExecStart"))
    assert argv == [INSTALLED_DICOMNODE, command, "--config", INSTALLED_CONFIG]


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_writes_only_the_example_state_dir(unit: str) -> None:
    """User, StateDirectory, ReadWritePaths and $TMPDIR agree with ``node.state_dir``."""
    state_dir = example_state_dir()
    assert state_dir.parent == Path("/var/lib"), "StateDirectory= lives under /var/lib"
    service = service_section(unit)
    state_dirs = single(service, "StateDirectory").split()
    assert state_dirs[0] == state_dir.name
    assert [Path(p) for p in service["ReadWritePaths"]] == [state_dir]
    tmpdir = Path(environment(service)["TMPDIR"])
    assert tmpdir.parent == state_dir
    assert tmpdir.relative_to(state_dir.parent).as_posix() in state_dirs, "systemd creates $TMPDIR"
    # The listener empties StateLayout.tmp_dir at start; $TMPDIR must not be that folder, or a
    # restarted listener would delete what the worker (another unit) has open there.
    assert tmpdir != StateLayout(state_dir).tmp_dir


def test_sysusers_and_tmpfiles_agree_with_the_units() -> None:
    state_dir = example_state_dir()
    sysusers = [
        shlex.split(line)
        for line in (SYSTEMD_DIR / "dicomnode.sysusers.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sysusers == [["u", USER, "-", "Fracture-detection DICOM node", str(state_dir)]]
    tmpfiles = [
        line.split()
        for line in (SYSTEMD_DIR / "dicomnode.tmpfiles.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tmpdir = environment(service_section("dicomnode.service"))["TMPDIR"]
    assert tmpfiles == [
        ["d", str(state_dir), "0750", USER, USER, "-"],
        ["d", tmpdir, "0750", USER, USER, "1d"],
    ]


def test_example_config_fits_the_units() -> None:
    """The port needs no capability, and the example parses as the units will read it."""
    config = load_config(EXAMPLE_CONFIG)
    assert config.node.port >= 1024
    assert tomllib.loads(EXAMPLE_CONFIG.read_text())["node"]["state_dir"] == str(
        config.node.state_dir
    )


def test_drop_ins_loosen_only_what_they_document() -> None:
    gpu = parse_unit((SYSTEMD_DIR / "gpu.conf").read_text())["Service"]
    assert single(gpu, "PrivateDevices") == "no"
    assert single(gpu, "DevicePolicy") == "closed"
    assert gpu["DeviceAllow"] and all(v.startswith("char-nvidia") for v in gpu["DeviceAllow"])
    port = parse_unit((SYSTEMD_DIR / "privileged-port.conf").read_text())["Service"]
    assert port == {
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
    }


# --- systemd-analyze ---------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)"
)


def local_copy(unit: str, target: Path, drop_ins: tuple[str, ...]) -> Path:
    """Copy ``unit`` (and ``drop_ins`` as its ``.d/`` drop-ins) into ``target`` for verify.

    ExecStart is pointed at this virtualenv's ``dicomnode`` script: verify checks that the
    command exists and is executable, and the installed path does not exist here.
    """
    here = Path(sys.executable).parent / "dicomnode"
    assert os.access(here, os.X_OK), f"{here} missing: install the package (pip install -e .)"
    text = (SYSTEMD_DIR / unit).read_text()
    assert text.count(INSTALLED_DICOMNODE) == 1
    copy = target / unit
    copy.write_text(text.replace(INSTALLED_DICOMNODE, str(here)))
    if drop_ins:
        folder = target / f"{unit}.d"
        folder.mkdir()
        for drop_in in drop_ins:
            shutil.copy(SYSTEMD_DIR / drop_in, folder / drop_in)
    return copy


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@needs_systemd_analyze
@pytest.mark.parametrize("with_drop_ins", [False, True])
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_analyze_verify(tmp_path: Path, unit: str, with_drop_ins: bool) -> None:
    """verify loads the unit as systemd would; any warning (unknown key, bad value) fails too."""
    drop_ins = UNITS[unit][1] if with_drop_ins else ()
    copy = local_copy(unit, tmp_path, drop_ins)
    result = analyze("verify", "--man=no", f"./{copy.name}", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_systemd_analyze
def test_systemd_analyze_verify_reports_mistakes(tmp_path: Path) -> None:
    """The check above can fail: a bad drop-in makes verify complain."""
    copy = local_copy("dicomnode-work.service", tmp_path, ("gpu.conf",))
    with (tmp_path / "dicomnode-work.service.d" / "gpu.conf").open("a") as handle:
        handle.write("DeviceAllow=not-a-device rw\nProtectSystem=sometimes\n")
    result = analyze("verify", "--man=no", f"./{copy.name}", cwd=tmp_path)
    assert "not-a-device" in result.stderr and "sometimes" in result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_analyze_security_exposure(tmp_path: Path, unit: str) -> None:
    """systemd's own exposure score stays in its best band ("OK", below 2.0 of 10).

    ``--threshold`` is on systemd's internal 0-100 scale: exposure 1.9 is 19; above it, the
    command fails.
    """
    copy = local_copy(unit, tmp_path, ())
    result = analyze(
        "security", "--offline=true", "--man=no", "--threshold=19", f"./{copy.name}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    found = re.search(
        rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+) (\w+)", result.stdout
    )
    assert found is not None, result.stdout[-3000:]
    exposure = float(found.group(1))
    assert exposure < 2.0
    record_counts(f"systemd_security_{unit}", {"exposure": exposure, "band": found.group(2)})


# --- MemoryDenyWriteExecute=yes ----------------------------------------------------------------


class ScmpArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``."""

    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000
# systemd's seccomp_memory_deny_write_execute(): deny a writable+executable mapping, and making
# any mapping executable afterwards (mprotect / pkey_mprotect), and executable SysV shm.
MDWE_RULES = (
    ("mmap", mmap.PROT_WRITE | mmap.PROT_EXEC),
    ("mprotect", mmap.PROT_EXEC),
    ("pkey_mprotect", mmap.PROT_EXEC),
    ("shmat", SHM_EXEC),
)


def libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp")
    if name is None:
        raise OSError("libseccomp not found (Debian package libseccomp2, a dependency of systemd)")
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ScmpArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def deny_write_execute() -> None:
    """Install, for this process and its children, the filter behind MemoryDenyWriteExecute=yes.

    The third argument of each call (``prot`` / ``shmflg``) is matched against the rule's mask;
    a match fails with EPERM, as under systemd. Sets no_new_privs (libseccomp's default). Checks
    that the filter bites (a writable+executable mapping is refused) before returning.
    """
    lib = libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for name, mask in MDWE_RULES:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            rule = ScmpArgCmp(2, SCMP_CMP_MASKED_EQ, mask, mask)
            code = lib.seccomp_rule_add_array(
                ctx, SCMP_ACT_ERRNO | errno.EPERM, number, 1, ctypes.byref(rule)
            )
            if code != 0:
                raise OSError(-code, f"seccomp rule for {name}")
        code = lib.seccomp_load(ctx)
        if code != 0:
            raise OSError(-code, "seccomp_load")
    finally:
        lib.seccomp_release(ctx)
    try:
        mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        return
    raise AssertionError("a writable and executable mapping was allowed: filter not active")


def mdwe_workload(device: str, onednn: bool, samples: list[str]) -> dict[str, object]:
    """Under the filter: prove it bites, then decode ``samples`` and run an ensemble on them.

    Runs in a child process (the filter cannot be removed). ``onednn=False`` turns off PyTorch's
    oneDNN CPU kernels, which generate code at run time into writable+executable memory. With no
    samples (a machine without pydicom, e.g. a GPU box) a synthetic image is used.
    """
    import torch

    torch.backends.mkldnn.set_flags(onednn)
    deny_write_execute()
    import tempfile

    import numpy as np

    from inference.ensemble import Ensemble
    from inference.export import write_random_ensemble
    from tests.conftest import SMALL_MEMBERS

    images: list[np.ndarray] = []
    if samples:
        from dicomnode import scp, sender, writers  # noqa: F401  (their extensions load too)
        from dicomnode.pixels import load_view

        images = [load_view(path).pixels for path in samples]
    else:
        images = [np.random.default_rng(0).random((320, 240), dtype=np.float32)]
    with tempfile.TemporaryDirectory() as folder:
        write_random_ensemble(Path(folder), SMALL_MEMBERS)
        ensemble = Ensemble.load(folder, device)
        results, _ = ensemble.analyse(images, [None] * len(images))
    return {"images": len(images), "results": len(results), "device": str(ensemble.device)}


def decodable_samples() -> list[str]:
    """Every sample whose pixels pydicom + pylibjpeg decode (one per transfer syntax)."""
    import csv

    chosen: dict[str, str] = {}
    with (SHARED / "dicom-samples" / "samples.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["decodes_pydicom_pylibjpeg"] == "yes" and int(row["frames"]) == 1:
                chosen.setdefault(row["transfer_syntax_uid"], row["file"])
    return [str(SHARED / "dicom-samples" / name) for name in chosen.values()]


def mdwe_listener_workload(samples: list[str]) -> dict[str, object]:
    """Under the filter: a real listener answers a C-ECHO and stores ``samples`` sent to it."""
    deny_write_execute()
    import tempfile

    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomnode.config import parse_config
    from dicomnode.scp import Listener

    datasets = [pydicom.dcmread(path) for path in samples]
    with tempfile.TemporaryDirectory() as folder:
        config = parse_config(
            {"node": {"state_dir": "state", "port": 0}, "study": {"stable_seconds": 60}},
            Path(folder),
        )
        with Listener(config) as listener:
            scu = AE(ae_title="MODALITY")
            scu.add_requested_context(Verification)
            for ds in datasets:
                scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            assoc = scu.associate("127.0.0.1", listener.port, ae_title=config.node.ae_title)
            assert assoc.is_established
            statuses = [int(assoc.send_c_echo().Status)]
            statuses += [int(assoc.send_c_store(ds).Status) for ds in datasets]
            assoc.release()
            stored = sorted(p.stem for p in listener.layout.instances_dir.rglob("*.dcm"))
    return {"statuses": statuses, "stored": stored}


def run_child(code: str, args: list[str]) -> object:
    """Run ``code`` in a fresh interpreter in the repository; return the JSON it prints last."""
    child = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def stored_sop_uids(samples: list[str]) -> list[str]:
    """The SOP Instance UIDs the listener keeps from ``samples`` (CR and DX only)."""
    import pydicom

    from dicomnode.scp import CR_DX_SOP_CLASSES

    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in samples]
    return sorted(
        {str(ds.SOPInstanceUID) for ds in headers if str(ds.SOPClassUID) in CR_DX_SOP_CLASSES}
    )


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="seccomp is Linux-only")


@linux_only
def test_listener_runs_under_memory_deny_write_execute() -> None:
    """dicomnode-listen.service sets MemoryDenyWriteExecute=yes: receiving must work under it."""
    samples = decodable_samples()
    outcome = run_child(
        "import json, sys; from tests.test_systemd import mdwe_listener_workload; "
        "print(json.dumps(mdwe_listener_workload(sys.argv[1:])))",
        samples,
    )
    assert outcome == {"statuses": [0] * (len(samples) + 1), "stored": stored_sop_uids(samples)}


@linux_only
def test_worker_runs_under_memory_deny_write_execute_without_onednn() -> None:
    """Decoding every encoding and the ensemble work under the filter once oneDNN is off.

    With oneDNN on (PyTorch's default) CPU convolutions fail under the filter ("could not create
    a primitive": oneDNN generates its kernels at run time), which is why the serve and work
    units leave MemoryDenyWriteExecute off; see systemd/README.md.
    """
    samples = decodable_samples()
    assert len(samples) >= 5, "expected samples of several transfer syntaxes"
    outcome = run_child(
        "import json, sys; from tests.test_systemd import mdwe_workload; "
        "print(json.dumps(mdwe_workload('cpu', False, sys.argv[1:])))",
        samples,
    )
    assert outcome == {"images": len(samples), "results": len(samples), "device": "cpu"}
