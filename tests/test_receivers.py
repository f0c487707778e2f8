"""Several receiving processes on one port (``node.receive_processes``, dicomnode.receivers).

``dicomnode listen`` runs with two processes (the listener and one receiver child). Which
process accepts a connection is the kernel's choice; the tests make it deterministic by
stopping one process with SIGSTOP (a stopped process does not accept, so the other one must).
Peers: pynetdicom modality AEs and DCMTK ``echoscu``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomnode.demo import free_port
from dicomnode.state import StateDB
from dicomnode.storage import StoreLock
from tests.faults.conftest import echo_ok, save, scu, small_dx, store_file
from tests.faults.test_limits import wait_until
from tests.test_node_e2e import NODE_AE, NodeProcess, node

pytestmark = [pytest.mark.dicom_peers, pytest.mark.timeout(180)]

ECHOSCU = "/usr/bin/echoscu"


def listen_config(folder: Path, **node_keys: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = {"receive_processes": 2, **node_keys}
    lines = [f'ae_title = "{NODE_AE}"', f"port = {free_port()}", 'state_dir = "state"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    path = folder / "node.toml"
    path.write_text("[node]\n" + "\n".join(lines) + "\n\n[study]\nstable_seconds = 30\n")
    path.chmod(0o600)
    return path


def port_of(running: NodeProcess) -> int:
    started = running.event("listener_started", receiver=0)
    assert started is not None
    return int(started["port"])


def child_pid(running: NodeProcess, restarts: int = 0) -> int:
    started = running.event("receiver_process_started", receiver=1, restarts=restarts)
    assert started is not None
    return int(started["pid"])


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block: it accepts no connection meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def receivers_of(running: NodeProcess, path: Path) -> list[int]:
    """Which processes logged receiving the instance in file ``path``."""
    sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return [
        int(e["receiver"])
        for e in running.events()
        if e["event"] == "instance_received" and e.get("sop_instance_uid") == sop_uid
    ]


def test_each_process_accepts_and_stores_on_the_one_port(tmp_path: Path) -> None:
    files = [save(small_dx(i), tmp_path / f"{i}.dcm") for i in range(2)]
    config = listen_config(tmp_path / "node")
    with node("listen", config, tmp_path / "node.log") as running:
        port = port_of(running)
        with stopped(child_pid(running)):
            first = store_file(port, files[0])
        with stopped(running.process.pid):
            second = store_file(port, files[1])
        assert first.success and second.success
        assert receivers_of(running, files[0]) == [0]
        assert receivers_of(running, files[1]) == [1]
        uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        db = StateDB(tmp_path / "node" / "state" / "state.sqlite")
        try:
            assert all(db.instance(uid) is not None for uid in uids)
        finally:
            db.close()


def test_max_associations_is_one_limit_for_all_processes(tmp_path: Path) -> None:
    """One association held in each process with ``max_associations = 2``: a third is
    rejected-transient, local limit exceeded (each process alone holds only one); once one is
    released, associations are accepted again."""
    config = listen_config(tmp_path / "node", max_associations=2)
    with node("listen", config, tmp_path / "node.log") as running:
        port = port_of(running)
        modalities = [scu(storage=False), scu(storage=False)]
        with stopped(child_pid(running)):
            held = [modalities[0].associate("127.0.0.1", port, ae_title=NODE_AE)]
        with stopped(running.process.pid):
            held.append(modalities[1].associate("127.0.0.1", port, ae_title=NODE_AE))
        try:
            assert all(a.is_established for a in held)
            dcmtk = subprocess.run(
                [ECHOSCU, "-aec", NODE_AE, "127.0.0.1", str(port)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            statuses = [int(a.send_c_echo().Status) for a in held]
        finally:
            for assoc in held:
                assoc.release()
            for ae in modalities:
                ae.shutdown()
        assert dcmtk.returncode != 0
        assert "Local Limit Exceeded" in dcmtk.stdout + dcmtk.stderr, dcmtk.stderr
        assert statuses == [0, 0]
        rejected = running.event("association_rejected")
        assert rejected is not None and "max_associations" in rejected["reason"]
        wait_until("associations accepted again", lambda: echo_ok(port), timeout=10)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_receiver_that_ends_is_restarted_and_the_port_keeps_working(
    tmp_path: Path, how: signal.Signals
) -> None:
    """SIGTERM makes the child close its copy of the listening socket: the listener's copy
    must keep accepting (pynetdicom's server_close would shut the shared socket down)."""
    files = [save(small_dx(i), tmp_path / f"{i}.dcm") for i in range(2)]
    config = listen_config(tmp_path / "node")
    with node("listen", config, tmp_path / "node.log") as running:
        port = port_of(running)
        os.kill(child_pid(running), how)
        wait_until("the child to end", lambda: running.event("receiver_process_died") is not None)
        assert store_file(port, files[0]).success  # the listener alone, meanwhile
        wait_until(
            "a new receiver",
            lambda: running.event("receiver_process_started", restarts=1) is not None,
        )
        wait_until("the new receiver serving", lambda: _count(running, "listener_started") == 3)
        with stopped(running.process.pid):
            assert store_file(port, files[1]).success  # the new child
        assert receivers_of(running, files[1]) == [1]
        assert running.process.poll() is None


def _count(running: NodeProcess, event: str) -> int:
    return sum(e["event"] == event for e in running.events())


def test_receivers_die_with_the_listener_and_free_the_port(tmp_path: Path) -> None:
    """A listener killed without a chance to stop its children (SIGKILL, the OOM killer) takes
    them along at once, so a restarted node can bind its port again."""
    config = listen_config(tmp_path / "node")
    with node("listen", config, tmp_path / "node.log") as running:
        port, child = port_of(running), child_pid(running)
        running.process.kill()
        running.process.wait()
        wait_until("the port to be free again", lambda: _bindable(port), timeout=5)
        assert not _running(child)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child not reaped yet: its parent was killed)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _hold(lock_path: Path, held: Any, seconds: float) -> None:
    """In another process: store-lock SOP Instance UID 1.2.3, say so (``held``: an Event), keep
    it a while."""
    with StoreLock(lock_path).instance("1.2.3"):
        held.set()
        time.sleep(seconds)


def _other_stripe(lock: StoreLock, uid: str) -> str:
    """A UID whose instance lock is not ``uid``'s."""
    return next(
        other
        for n in range(1000)
        if lock._stripe("i", other := f"{uid}.{n}") != lock._stripe("i", uid)
    )


@pytest.mark.parametrize(
    ("what", "waits"),
    [("same instance", True), ("everything", True), ("other instance", False)],
)
def test_the_store_lock_excludes_other_processes_per_instance(
    tmp_path: Path, what: str, waits: bool
) -> None:
    """The check-rename-record step of storing one SOP Instance UID is serialised across the
    receiving processes (not only across the threads of one), and so is retention's removal
    against every store; instances with other UIDs are stored meanwhile."""
    lock_path = tmp_path / "store.lock"
    lock = StoreLock(lock_path)
    take = {
        "same instance": lambda: lock.instance("1.2.3"),
        "everything": lock.everything,
        "other instance": lambda: lock.instance(_other_stripe(lock, "1.2.3")),
    }[what]
    ctx = multiprocessing.get_context("spawn")
    taken = ctx.Event()
    other = ctx.Process(target=_hold, args=(lock_path, taken, 1.0))
    other.start()
    try:
        assert taken.wait(30)
        start = time.monotonic()
        with take():
            waited = time.monotonic() - start
    finally:
        other.join(30)
    assert (waited > 0.5) is waits, waited


def test_the_store_lock_excludes_threads_of_one_process_too(tmp_path: Path) -> None:
    """Each hold opens its own file description, so two threads exclude each other as two
    processes do; a study folder lock is held apart from the instance locks."""
    lock = StoreLock(tmp_path / "store.lock")
    order: list[str] = []
    inside = threading.Event()

    def hold() -> None:
        with lock.instance("1.2.3"):
            inside.set()
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=hold)
    thread.start()
    assert inside.wait(10)
    with lock.folder("1.2.3"):  # another kind of lock: not held by the thread
        order.append("folder")
    with lock.instance("1.2.3"):
        order.append("second in")
    thread.join(10)
    assert order == ["folder", "first out", "second in"]


def test_a_spool_folder_removed_while_idle_comes_back(tmp_path: Path) -> None:
    """systemd-tmpfiles ages the spool: an empty spool/<n> left untouched for a day may be
    removed under a running listener. The next association recreates it and is stored."""
    from tests.test_scp import listening, make_config

    with listening(make_config(tmp_path)) as listener:
        spool = listener.layout.receiver_spool(0)
        spool.rmdir()
        listener.tend()  # the poll does not fail on it either
        spool.rmdir()
        assert store_file(listener.port, save(small_dx(0), tmp_path / "0.dcm")).success
        assert spool.is_dir()


def test_a_receiver_that_cannot_start_stops_the_service(tmp_path: Path) -> None:
    """Restarting cannot mend a start-up error: ``listen`` exits 1 and says which process.
    Here receiver 1's spool folder cannot be made (a file holds its name)."""
    import json
    import sys

    config = listen_config(tmp_path / "node")
    spool = tmp_path / "node" / "state" / "spool"
    spool.mkdir(parents=True)
    (spool / "1").write_bytes(b"not a folder")
    run = subprocess.run(
        [sys.executable, "-m", "dicomnode", "listen", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout[-2000:]
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    died = [e for e in events if e["event"] == "receiver_process_died"]
    assert died and died[0]["receiver"] == 1 and died[0]["restart_in_seconds"] is None
    crashed = [e for e in events if e["event"] == "role_crashed"]
    assert crashed and "receiver process 1 of the listener failed at start" in crashed[0]["error"]
    assert not any(e["event"] == "service_ready" for e in events)


def test_accepted_connections_have_nagle_off() -> None:
    """Each accepted socket gets TCP_NODELAY, as DCMTK's receivers with ``TCP_NODELAY=1``."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomnode.receivers import SharedSocketServer

    ae = AE(ae_title="NODELAY")
    ae.add_supported_context(Verification)
    server = SharedSocketServer(ae, ("127.0.0.1", 0), "NODELAY", ae.supported_contexts)
    try:
        with socket.create_connection(server.server_address[:2], timeout=5):
            deadline = time.monotonic() + 5
            while True:
                try:
                    accepted, _ = server.get_request()
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the connection was never accepted"
                    time.sleep(0.01)
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.server_close()
