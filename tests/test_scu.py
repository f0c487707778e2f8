"""C-STORE SCU against real peers: DCMTK storescp and in-process pynetdicom SCPs on 127.0.0.1."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicomnode.pixels import load_view
from dicomnode.scu import (
    FileStatus,
    Peer,
    Timeouts,
    backoff_delay,
    classify_status,
    send_files,
)
from dicomnode.writers import ImageFinding, NodeIdentity, ResultObjects, write_results
from inference.records import AlgorithmInfo, Box, Decision, ImageResult, Thresholds

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "dicom-samples"
STORESCP = Path("/usr/bin/storescp")
FAST = Timeouts(connect=3.0, acse=5.0, dimse=5.0, network=5.0)

pytestmark = pytest.mark.dicom_peers


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> ResultObjects:
    view = load_view(SAMPLES / "DX_highdicom_small.dcm")
    result = ImageResult(
        score=0.8,
        decision=Decision.FRACTURE,
        boxes=(Box(10.0, 20.0, 60.0, 80.0, 0.9),),
        region="chest",
        group="upper",
        group_fallback=False,
        thresholds=Thresholds(0.3, 0.6, 0.5),
    )
    return write_results(
        [ImageFinding(view, result)],
        AlgorithmInfo("drn", "1", "sens"),
        NodeIdentity(),
        tmp_path_factory.mktemp("results"),
        presentation_states=True,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, deadline_s: float = 10.0) -> None:
    """Wait until the port is bound, without connecting (storescp serves one peer at a time)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


@contextmanager
def storescp(out_dir: Path, *options: str) -> Iterator[int]:
    """DCMTK storescp (binds all interfaces: this DCMTK version has no bind option)."""
    port = _free_port()
    process = subprocess.Popen(
        [str(STORESCP), *options, "+xa", "-od", str(out_dir), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def pynetdicom_scp(
    configure: Callable[[AE], None], handler: Callable[[Event], int] | None = None
) -> Iterator[int]:
    """An in-process storage SCP on 127.0.0.1 (``handler`` returns the C-STORE status)."""
    ae = AE(ae_title="PEER")
    configure(ae)
    port = _free_port()
    handlers = [] if handler is None else [(evt.EVT_C_STORE, handler)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield port
    finally:
        server.shutdown()


def _all_storage(ae: AE) -> None:
    from pynetdicom import AllStoragePresentationContexts

    ae.supported_contexts = AllStoragePresentationContexts


def test_results_arrive_at_storescp(results: ResultObjects, tmp_path: Path) -> None:
    with storescp(tmp_path) as port:
        batch = send_files(
            Peer("127.0.0.1", port, "STORESCP"), [w.path for w in results.all], FAST
        )
    assert batch.all_succeeded, batch.outcomes
    assert [o.dimse_status for o in batch.outcomes] == [0, 0, 0]
    received = {pydicom.dcmread(p).SOPInstanceUID for p in tmp_path.iterdir()}
    assert received == {w.sop_instance_uid for w in results.all}


def test_nothing_listening_is_transient(results: ResultObjects) -> None:
    batch = send_files(
        Peer("127.0.0.1", _free_port(), "NOBODY"), [results.report.path], FAST
    )
    (outcome,) = batch.outcomes
    assert outcome.status is FileStatus.TRANSIENT
    assert "cannot connect" in outcome.reason


def test_refused_association_is_permanent(results: ResultObjects, tmp_path: Path) -> None:
    with storescp(tmp_path, "--refuse") as port:
        batch = send_files(
            Peer("127.0.0.1", port, "STORESCP"), [w.path for w in results.all], FAST
        )
    assert {o.status for o in batch.outcomes} == {FileStatus.PERMANENT}, batch.outcomes[0]
    assert "rejected-permanent" in batch.outcomes[0].reason
    assert list(tmp_path.iterdir()) == []


def test_aborted_association_is_transient(results: ResultObjects, tmp_path: Path) -> None:
    with storescp(tmp_path, "--abort-after") as port:
        batch = send_files(
            Peer("127.0.0.1", port, "STORESCP"), [w.path for w in results.all], FAST
        )
    assert {o.status for o in batch.outcomes} == {FileStatus.TRANSIENT}


def test_unrecognised_called_ae_is_permanent(results: ResultObjects) -> None:
    def require_called_ae(ae: AE) -> None:
        _all_storage(ae)
        ae.require_called_aet = True

    with pynetdicom_scp(require_called_ae) as port:
        batch = send_files(Peer("127.0.0.1", port, "WRONG"), [results.report.path], FAST)
    (outcome,) = batch.outcomes
    assert outcome.status is FileStatus.PERMANENT
    assert "Called AE title not recognised" in outcome.reason


def test_busy_peer_rejection_is_transient(results: ResultObjects) -> None:
    def one_association(ae: AE) -> None:
        _all_storage(ae)
        ae.maximum_associations = 1

    with pynetdicom_scp(one_association) as port:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        held = holder.associate("127.0.0.1", port, ae_title="PEER")
        assert held.is_established
        try:
            batch = send_files(Peer("127.0.0.1", port, "PEER"), [results.report.path], FAST)
        finally:
            held.release()
    (outcome,) = batch.outcomes
    assert outcome.status is FileStatus.TRANSIENT
    assert "rejected-transient" in outcome.reason


def test_sop_class_not_accepted_is_permanent_per_file(results: ResultObjects) -> None:
    def secondary_capture_only(ae: AE) -> None:
        ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)

    with pynetdicom_scp(secondary_capture_only, lambda event: 0x0000) as port:
        batch = send_files(
            Peer("127.0.0.1", port, "PEER"),
            [results.report.path, results.secondary_captures[0].path],
            FAST,
        )
    report, capture = batch.outcomes
    assert report.status is FileStatus.PERMANENT and "does not accept" in report.reason
    assert capture.status is FileStatus.SUCCESS


def test_peer_accepting_nothing_is_permanent(results: ResultObjects) -> None:
    def only_ct(ae: AE) -> None:
        ae.add_supported_context(pydicom.uid.CTImageStorage, ExplicitVRLittleEndian)

    with pynetdicom_scp(only_ct) as port:
        batch = send_files(Peer("127.0.0.1", port, "PEER"), [results.report.path], FAST)
    assert batch.outcomes[0].status is FileStatus.PERMANENT
    assert "none of the proposed" in batch.outcomes[0].reason


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0xA700, FileStatus.TRANSIENT),
        (0xC001, FileStatus.TRANSIENT),
        (0xA900, FileStatus.PERMANENT),
        (0xB000, FileStatus.SUCCESS),
    ],
)
def test_failure_statuses_from_a_real_peer(
    results: ResultObjects, code: int, expected: FileStatus
) -> None:
    with pynetdicom_scp(_all_storage, lambda event: code) as port:
        batch = send_files(Peer("127.0.0.1", port, "PEER"), [results.report.path], FAST)
    (outcome,) = batch.outcomes
    assert (outcome.status, outcome.dimse_status) == (expected, code)


def test_unreadable_file_is_permanent_and_the_rest_still_sent(
    results: ResultObjects, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    out = tmp_path / "received"
    out.mkdir()
    with storescp(out) as port:
        batch = send_files(
            Peer("127.0.0.1", port, "STORESCP"), [junk, results.report.path], FAST
        )
    bad, good = batch.outcomes
    assert bad.status is FileStatus.PERMANENT and good.status is FileStatus.SUCCESS
    assert len(list(out.iterdir())) == 1


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0x0000, FileStatus.SUCCESS),
        (0xB007, FileStatus.SUCCESS),
        (0x0122, FileStatus.PERMANENT),
        (0x0124, FileStatus.PERMANENT),
        (0xA7FF, FileStatus.TRANSIENT),
        (0xA9FE, FileStatus.PERMANENT),
        (0xCFFF, FileStatus.TRANSIENT),
    ],
)
def test_status_classification_follows_ps3_4(code: int, expected: FileStatus) -> None:
    status, reason = classify_status(code)
    assert status is expected and reason


def test_destination_and_timeouts_validate() -> None:
    with pytest.raises(ValueError, match="AE title"):
        Peer("127.0.0.1", 104, "A" * 17)
    with pytest.raises(ValueError, match="port"):
        Peer("127.0.0.1", 0, "PACS")
    with pytest.raises(ValueError, match="timeout"):
        Timeouts(connect=0)
    with pytest.raises(ValueError, match="no files"):
        send_files(Peer("127.0.0.1", 104, "PACS"), [])


@given(attempt=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_backoff_is_jittered_exponential_and_capped(attempt: int, seed: int) -> None:
    delay = backoff_delay(attempt, random.Random(seed))
    ceiling = min(3600.0, 10.0 * 2 ** (attempt - 1))
    assert ceiling / 2 <= delay <= ceiling
    assert delay == backoff_delay(attempt, random.Random(seed))


def test_backoff_keeps_retrying_for_hours() -> None:
    rng = random.Random(7)
    total = sum(backoff_delay(attempt, rng) for attempt in range(1, 16))
    assert total > 3 * 3600  # fifteen retries span more than three hours
    with pytest.raises(ValueError):
        backoff_delay(0, rng)


def test_the_sending_socket_has_nagle_off(
    results: ResultObjects, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TCP_NODELAY on every sending association (Nagle held the last segment of each C-STORE
    for the peer's delayed acknowledgement)."""
    import dicomnode.scu as scu_module

    seen: list[int] = []

    def spy(assoc: object) -> None:
        sender_module_no_delay(assoc)  # type: ignore[arg-type]
        sock = assoc.dul.socket.socket  # type: ignore[attr-defined]
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    sender_module_no_delay = scu_module.no_delay
    monkeypatch.setattr(scu_module, "no_delay", spy)
    with storescp(tmp_path) as port:
        batch = send_files(Peer("127.0.0.1", port, "STORESCP"), [results.report.path], FAST)
    assert batch.all_succeeded
    assert seen == [1]
