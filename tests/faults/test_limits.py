"""The listener's limits and timeouts against real peers (DCMTK storescu, pynetdicom, raw TCP).

Each test runs the real listener in-process (:class:`dicomnode.scp.Listener` on a free port)
with small limits: ACSE timeout 1 s, network timeout 2 s, ``max_instance_bytes`` 200 kB,
``max_pdu`` 16 KiB. It checks that a peer that connects and sends nothing, one that stops
half-way through a PDU and an association left idle are ended within their timeout; that an
instance over ``max_instance_bytes`` is aborted (or refused with 0xA700 when it completes in
one PDU) with nothing stored and no spool file left; that a PDU longer than ``max_pdu`` gets an
A-ABORT (pynetdicom 3.0 alone would read and process it, whatever its length); and that the
listener serves the next association normally after each.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import Config
from dicomnode.demo import Patient, dx_from_image
from dicomnode.scp import Listener, StoreStatus
from tests.faults.conftest import (
    NODE_AE,
    echo_ok,
    record_counts,
    save,
    scu,
    small_dx,
    store_file,
)
from tests.faults.test_bad_input import association_request, p_data
from tests.test_node_e2e import fracatlas
from tests.test_scp import instance_rows, listening, log, make_config, storescu

__all__ = ["log"]  # the JSON log fixture of tests/test_scp.py

pytestmark = [pytest.mark.dicom_peers, pytest.mark.timeout(180)]

ACSE_TIMEOUT, NETWORK_TIMEOUT = 1.0, 2.0
MAX_INSTANCE_BYTES = 200_000
MAX_PDU = 16_384
#: Upper bound on how long ending an association may take beyond its timeout on a busy 2-core
#: machine (the timers are polled; this is not a speed figure).
SLACK = 8.0
#: A patient whose values must never reach the log.
PATIENT = Patient(name="Limitsson^Hugo", patient_id="PIDLIM4711", birth_date="19510203")


def limits_config(tmp_path: Path, **node: Any) -> Config:
    limits = {
        "acse_timeout_seconds": ACSE_TIMEOUT,
        "network_timeout_seconds": NETWORK_TIMEOUT,
        "max_instance_bytes": MAX_INSTANCE_BYTES,
        "max_pdu": MAX_PDU,
    }
    return make_config(tmp_path, **{**limits, **node})


def large_dx(side: int = 640) -> Dataset:
    """A DX of ``side`` x ``side`` 8-bit pixels (409,600 bytes at 640: over the 200 kB limit)."""
    image = cv2.resize(fracatlas("IMG0000019.jpg"), (side, side), interpolation=cv2.INTER_AREA)
    return dx_from_image(image, body_part="HAND", patient=PATIENT)


def wait_until(what: str, probe: Callable[[], bool], timeout: float = 20.0) -> float:
    """Poll ``probe`` until true; return the seconds it took."""
    start = time.monotonic()
    while not probe():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def seconds_until_closed(sock: socket.socket) -> tuple[float, bytes]:
    """Read until the node closes the connection: (seconds it took, what it sent)."""
    start, received = time.monotonic(), b""
    sock.settimeout(NETWORK_TIMEOUT + ACSE_TIMEOUT + SLACK)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return time.monotonic() - start, received


def settled(listener: Listener) -> None:
    """Wait until no association is open (the closing handlers have run)."""
    server = listener._server
    wait_until("associations to close", lambda: not server.active_associations)


def events(log: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    return [e for e in lines if e["event"] == name]


def spool_files(listener: Listener) -> list[str]:
    return [p.name for p in listener.layout.spooled_files()]


def test_silent_or_stalled_connections_are_closed_after_their_timeout(tmp_path: Path) -> None:
    """A peer that connects and sends nothing, or stops half-way through its A-ASSOCIATE-RQ,
    is disconnected after the ACSE timeout: the ARTIM timer runs until a whole request has
    arrived (PS3.8 9.1.5). The data path keeps a partial PDU in its buffer and the DUL thread
    goes on checking its timers; when it blocked in ``recv`` such a peer was only dropped at
    the network timeout, the socket's receive timeout."""
    with listening(limits_config(tmp_path)) as listener:
        request = association_request(listener.port)
        closed: dict[str, float] = {}
        for case, chunks in {"silent": [], "half_request": [request[: len(request) // 2]]}.items():
            with socket.create_connection(("127.0.0.1", listener.port)) as sock:
                for chunk in chunks:
                    sock.sendall(chunk)
                closed[case], received = seconds_until_closed(sock)
            assert received == b"", (case, received[:16])
            settled(listener)
        assert ACSE_TIMEOUT * 0.9 <= closed["silent"] < ACSE_TIMEOUT + SLACK, closed
        assert ACSE_TIMEOUT * 0.9 <= closed["half_request"] < ACSE_TIMEOUT + SLACK, closed
        assert closed["half_request"] < NETWORK_TIMEOUT * 0.9, closed  # not the network timeout
        assert echo_ok(listener.port)
    record_counts("limits_timeouts", {"closed_after_seconds": closed})


def test_idle_or_stalled_associations_are_aborted_after_the_network_timeout(
    tmp_path: Path,
) -> None:
    """An established association with no traffic is aborted (A-ABORT) after the network
    timeout; so is one whose peer stops in the middle of a P-DATA-TF PDU."""
    with listening(limits_config(tmp_path)) as listener:
        ae = scu(storage=False)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
        try:
            assert assoc.is_established
            idle = wait_until("the idle association to be aborted", lambda: assoc.is_aborted)
        finally:
            ae.shutdown()
        assert NETWORK_TIMEOUT * 0.9 <= idle < NETWORK_TIMEOUT + SLACK, idle
        settled(listener)

        request = association_request(listener.port)
        with socket.create_connection(("127.0.0.1", listener.port)) as sock:
            sock.sendall(request)
            assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
            sock.sendall(p_data(1, b"\x00" * 100, 0x03, declared=1000)[:60])
            stalled, _ = seconds_until_closed(sock)
        assert NETWORK_TIMEOUT * 0.9 <= stalled < NETWORK_TIMEOUT + SLACK, stalled
        settled(listener)
        assert echo_ok(listener.port)


def test_instance_over_max_instance_bytes_is_aborted_and_nothing_is_kept(
    tmp_path: Path, log: io.StringIO
) -> None:
    """DCMTK storescu sends a 410 kB DX in 16 KiB PDUs: the association is aborted once the
    data set passes 200 kB, the partial spool file is removed, nothing is stored, the log says
    why without patient data, and the next instance is stored."""
    big = save(large_dx(), tmp_path / "big.dcm")
    normal = save(small_dx(0), tmp_path / "normal.dcm")
    with listening(limits_config(tmp_path)) as listener:
        refused = storescu(listener.port, big)
        settled(listener)
        assert spool_files(listener) == []
        assert instance_rows(listener) == {}
        stored = storescu(listener.port, normal)
        assert stored.returncode == 0, stored.stderr
        rows = instance_rows(listener)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert set(rows) == {pydicom.dcmread(normal, stop_before_pixels=True).SOPInstanceUID}
    too_large = events(log, "instance_too_large")
    assert len(too_large) == 1, too_large
    assert too_large[0]["limit"] == MAX_INSTANCE_BYTES
    assert MAX_INSTANCE_BYTES < too_large[0]["received_bytes"] <= MAX_INSTANCE_BYTES + MAX_PDU
    for value in (PATIENT.name, PATIENT.patient_id, PATIENT.birth_date):
        assert value not in log.getvalue()
    record_counts(
        "limits_instance_size",
        {
            "storescu_exit": refused.returncode,
            "aborted_at_bytes": too_large[0]["received_bytes"],
            "stored_after": len(rows),
        },
    )


def test_instance_over_the_limit_in_one_pdu_is_refused_with_out_of_resources(
    tmp_path: Path,
) -> None:
    """With a 4 MiB maximum PDU the whole 410 kB data set arrives in one PDU, so the message is
    complete before it could be aborted: the C-STORE handler refuses it with 0xA700, keeps
    nothing, and the same association then stores a normal instance."""
    big = save(large_dx(), tmp_path / "big.dcm")
    normal = save(small_dx(1), tmp_path / "normal.dcm")
    with listening(limits_config(tmp_path, max_pdu=4 * 1024 * 1024)) as listener:
        ae = scu()
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
        try:
            assert assoc.is_established
            statuses = [int(assoc.send_c_store(path).Status) for path in (big, normal)]
            assoc.release()
        finally:
            ae.shutdown()
        settled(listener)
        assert spool_files(listener) == []
        rows = instance_rows(listener)
    assert statuses == [StoreStatus.OUT_OF_RESOURCES, StoreStatus.SUCCESS] == [0xA700, 0]
    assert set(rows) == {pydicom.dcmread(normal, stop_before_pixels=True).SOPInstanceUID}


def a_abort(data: bytes) -> tuple[int, int] | None:
    """(source, reason) of the A-ABORT PDU at the start of ``data``, else None."""
    if len(data) < 10 or data[0] != 0x07:
        return None
    return data[8], data[9]


def test_pdu_longer_than_max_pdu_gets_an_a_abort_and_max_pdu_itself_is_accepted(
    tmp_path: Path,
) -> None:
    """PS3.8 D.1: the peer must not send P-DATA-TF PDUs longer than our maximum length. A longer
    one (declared 1 MiB, with 16 KiB negotiated) and an A-ASSOCIATE-RQ declaring 4 GiB are
    answered with A-ABORT (source 2: service provider, reason 6: invalid PDU parameter value)
    before their bodies are read. pynetdicom as a peer fragments to exactly 16 KiB, and a 91 kB
    instance sent so is stored."""
    exact = save(large_dx(side=300), tmp_path / "exact.dcm")
    with listening(limits_config(tmp_path)) as listener:
        request = association_request(listener.port)
        answers: dict[str, tuple[int, int] | None] = {}
        with socket.create_connection(("127.0.0.1", listener.port)) as sock:
            sock.sendall(request)
            assert sock.recv(1) == b"\x02"
            accept_rest = sock.recv(65536)
            assert accept_rest
            header = struct.pack(">BBI", 0x04, 0, 1 << 20)
            sock.sendall(header + b"\x00" * (64 * 1024))
            _, received = seconds_until_closed(sock)
            answers["p_data_1_mib"] = a_abort(received)
        settled(listener)
        with socket.create_connection(("127.0.0.1", listener.port)) as sock:
            sock.sendall(b"\x01\x00\xff\xff\xff\xff" + request[6:])
            _, received = seconds_until_closed(sock)
            answers["associate_rq_4_gib"] = a_abort(received)
        settled(listener)
        assert store_file(listener.port, exact).success
        assert echo_ok(listener.port)
        stored = instance_rows(listener)
    assert answers == {"p_data_1_mib": (2, 6), "associate_rq_4_gib": (2, 6)}
    assert len(stored) == 1
    record_counts("limits_pdu", {"answers": {k: list(v or ()) for k, v in answers.items()}})


def test_an_unknown_pdu_type_does_not_let_the_next_pdu_past_the_length_check(
    tmp_path: Path,
) -> None:
    """After a PDU of an unknown type pynetdicom reads no body but the next 6-byte header; the
    length guard took that header for the unknown PDU's body, so the PDU after it went
    unchecked: a P-DATA-TF declaring 2 GiB made the listener allocate 2 GiB and wait for them
    (fuzz harness, case 7:737). Now it is refused like any over-long PDU: A-ABORT (2, 6), the
    connection closed, and the listener serves the next association."""
    with listening(limits_config(tmp_path)) as listener:
        request = association_request(listener.port)
        with socket.create_connection(("127.0.0.1", listener.port)) as sock:
            sock.sendall(request)
            assert sock.recv(1) == b"\x02"
            assert sock.recv(65536)
            unknown = struct.pack(">BBI", 0x09, 0, 0x1234)
            sock.sendall(unknown + struct.pack(">BBI", 0x04, 0, 1 << 31) + b"\x00" * 80)
            seconds, received = seconds_until_closed(sock)
        settled(listener)
        assert echo_ok(listener.port)
    aborts = [received[i + 8 : i + 10] for i in range(0, len(received) - 9, 10)]
    assert received[:1] == b"\x07" and b"\x02\x06" in aborts, received.hex()
    assert seconds < NETWORK_TIMEOUT + ACSE_TIMEOUT + SLACK
