"""The listener against real peers: DCMTK echoscu/storescu and a pynetdicom SCU, on 127.0.0.1.

Each test starts the listener in-process on a free port (``node.port = 0``) with its own state
directory and stops it in a ``finally`` (the context manager). Files come from
../shared/dicom-samples, every encoding there, including the ``_BROKEN`` ones: their codestreams
do not decode, but they are valid DICOM and must be stored as received (decoding is the
worker's business).
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
)
from pynetdicom import AE, _config

from dicomnode.assembly import run_assembler
from dicomnode.config import Config, parse_config
from dicomnode.logging import configure_logging
from dicomnode.queue.sqlite import SqliteJobQueue
from dicomnode.records import JobState
from dicomnode.scp import Listener, StoreStatus, run_listener
from dicomnode.state import StateDB
from dicomnode.storage import StateLayout
from tests.conftest import DICOM_SAMPLES, STORESCU_SYNTAX

pytestmark = [pytest.mark.dicom_peers, pytest.mark.timeout(120)]

SAMPLES = DICOM_SAMPLES
STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"
NODE_AE, CALLER_AE = "FRACTURE_AI", "MODALITY"



def make_config(tmp_path: Path, **node: Any) -> Config:
    """One receiving process unless ``receive_processes`` says otherwise: these tests read the
    handlers' log events in this process (tests/test_receivers.py covers several)."""
    extra = node.pop("extra", {})
    node = {"state_dir": "state", "port": 0, "receive_processes": 1, **node}
    raw = {"node": node, "study": {"stable_seconds": 0.5}}
    return parse_config({**raw, **extra}, tmp_path)


@contextmanager
def listening(config: Config) -> Iterator[Listener]:
    listener = Listener(config)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def storescu(port: int, *files: Path, calling: str = CALLER_AE) -> subprocess.CompletedProcess[str]:
    option = {STORESCU_SYNTAX[transfer_syntax(f)] for f in files}
    assert len(option) == 1, "send files of one transfer syntax per call"
    cmd = [STORESCU, *option, "-aec", NODE_AE, "-aet", calling, "127.0.0.1", str(port)]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=60)


def echoscu(
    port: int, calling: str = CALLER_AE, called: str = NODE_AE
) -> subprocess.CompletedProcess[str]:
    cmd = [ECHOSCU, "-aec", called, "-aet", calling, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def pynetdicom_store(port: int, ds: Dataset) -> int:
    """Send ``ds`` with a pynetdicom SCU and return the C-STORE response status."""
    ae = AE(ae_title=CALLER_AE)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        response = assoc.send_c_store(ds)
        return int(response.Status)
    finally:
        assoc.release()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the File Meta Information, as it travels in a C-STORE.

    The meta group starts after the 128-byte preamble and "DICM" with its 12-byte group length
    element, whose value is the length of the rest of the group.
    """
    meta = pydicom.filereader.read_file_meta_info(path)
    return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength) :]


def dcmtk_sent_pixels(pixels: bytes) -> bytes:
    """What storescu puts on the wire: odd-length values padded to even (PS3.5 7.1.1).

    DX_highdicom_small.dcm has an odd-length Pixel Data on disk; DCMTK pads it with one zero byte.
    """
    return pixels + b"\x00" if len(pixels) % 2 else pixels


def instance_rows(listener: Listener) -> dict[str, Any]:
    assert listener.db is not None
    return {r["sop_instance_uid"]: r for r in listener.db.query("SELECT * FROM instances")}


def sample(name: str) -> Path:
    return SAMPLES / name


def test_echo(tmp_path: Path) -> None:
    with listening(make_config(tmp_path)) as listener:
        result = echoscu(listener.port)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """The node's JSON log lines, captured; the previous logging set-up is restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()


def test_every_sample_encoding_is_stored_as_received(tmp_path: Path, log: io.StringIO) -> None:
    sent = [p for p in sorted(SAMPLES.glob("*.dcm")) if "_fixed" not in p.name]
    with listening(make_config(tmp_path)) as listener:
        for path in sent:
            result = storescu(listener.port, path)
            assert result.returncode == 0, (path.name, result.stderr)
        rows = instance_rows(listener)
    assert len(rows) == len(sent)
    for path in sent:
        original = pydicom.dcmread(path)
        row = rows[original.SOPInstanceUID]
        stored_path = Path(row["path"])
        stored = pydicom.dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == dcmtk_sent_pixels(original.PixelData), path.name
        del stored.PixelData, original.PixelData
        assert stored == original, path.name
        assert row["sha256"] == ""  # the listener does not hash (the worker does, as it decodes)
        assert row["size"] == stored_path.stat().st_size
        assert row["study_uid"] == original.StudyInstanceUID
        assert row["calling_ae"] == CALLER_AE
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    received = [e for e in events if e["event"] == "instance_received"]
    assert len(received) == len(sent)
    assert {e["sop_instance_uid"] for e in received} == set(rows)
    assert all(e["status"] == "0x0000" and e["study_instance_uid"] for e in received)
    for path in sent:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(ds.get(keyword, "") or "")
            if len(value) > 2:
                assert value not in log.getvalue(), (path.name, keyword)


def test_raw_bytes_on_the_wire_are_the_bytes_on_disk(tmp_path: Path) -> None:
    """pynetdicom's chunked send puts each file's dataset bytes on the wire unchanged."""
    files = [p for p in sorted(SAMPLES.glob("*.dcm")) if "_fixed" not in p.name]
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with listening(make_config(tmp_path)) as listener:
            ae = AE(ae_title=CALLER_AE)
            for path in files:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
            assert assoc.is_established
            try:
                statuses = [int(assoc.send_c_store(path).Status) for path in files]
            finally:
                assoc.release()
            rows = instance_rows(listener)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
    assert statuses == [StoreStatus.SUCCESS] * len(files)
    for path in files:
        row = rows[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        assert dataset_bytes(Path(row["path"])) == dataset_bytes(path), path.name


def test_resend_stores_once_and_a_corrected_instance_replaces(tmp_path: Path) -> None:
    broken, fixed = sample("RG2_JPLY_BROKEN.dcm"), sample("RG2_JPLY_fixed.dcm")
    uid = pydicom.dcmread(broken, stop_before_pixels=True).SOPInstanceUID
    with listening(make_config(tmp_path)) as listener:
        for _ in range(2):
            assert storescu(listener.port, broken).returncode == 0
        rows = instance_rows(listener)
        assert list(rows) == [uid]
        assert Path(rows[uid]["path"]).read_bytes()[-1000:] == broken.read_bytes()[-1000:]
        assert storescu(listener.port, fixed).returncode == 0
        rows = instance_rows(listener)
        assert list(rows) == [uid]
        stored = Path(rows[uid]["path"])
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(fixed).PixelData
        assert len(list(stored.parent.iterdir())) == 1


def ct_copy(tmp_path: Path) -> Path:
    """A DX sample relabelled as CT Image Storage: a real file of a SOP class we do not keep."""
    ds = pydicom.dcmread(sample("DX_highdicom_small.dcm"))
    ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    out = tmp_path / "ct.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_other_sop_class_is_discarded(tmp_path: Path) -> None:
    ct = ct_copy(tmp_path)
    with listening(make_config(tmp_path, other_sop_classes="discard")) as listener:
        result = storescu(listener.port, ct)
        assert result.returncode == 0, result.stderr
        assert pynetdicom_store(listener.port, pydicom.dcmread(ct)) == StoreStatus.SUCCESS
        assert instance_rows(listener) == {}
        assert list(listener.layout.instances_dir.iterdir()) == []


def test_other_sop_class_is_rejected(tmp_path: Path) -> None:
    ct = ct_copy(tmp_path)
    with listening(make_config(tmp_path, other_sop_classes="reject")) as listener:
        status = pynetdicom_store(listener.port, pydicom.dcmread(ct))
        assert status == StoreStatus.SOP_CLASS_NOT_SUPPORTED == 0x0122
        assert instance_rows(listener) == {}
        # CR/DX still go through on the same listener.
        dx = pydicom.dcmread(sample("DX_highdicom_small.dcm"))
        assert pynetdicom_store(listener.port, dx) == StoreStatus.SUCCESS
        assert list(instance_rows(listener)) == [dx.SOPInstanceUID]


def _drop_study_uid(ds: Dataset) -> None:
    del ds.StudyInstanceUID


def _unsafe_study_uid(ds: Dataset) -> None:
    ds.StudyInstanceUID = "1.2/../../../etc"


def _empty_series_uid(ds: Dataset) -> None:
    ds.SeriesInstanceUID = ""


@pytest.mark.parametrize("damage", [_drop_study_uid, _unsafe_study_uid, _empty_series_uid])
def test_bad_identifiers_get_a_failure_status(
    tmp_path: Path, damage: Callable[[Dataset], None]
) -> None:
    ds = pydicom.dcmread(sample("CR_cspine_16x16_dicomdir6154.dcm"))
    damage(ds)
    with listening(make_config(tmp_path)) as listener:
        assert pynetdicom_store(listener.port, ds) == StoreStatus.DATASET_MISMATCH == 0xA900
        assert instance_rows(listener) == {}


def test_undecodable_header_gets_cannot_understand(tmp_path: Path) -> None:
    """A Deflated Explicit VR dataset whose bytes are not a deflate stream cannot be parsed.

    pynetdicom's chunked send puts the bytes after the File Meta on the wire unchanged.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    garbage = tmp_path / "garbage.dcm"
    with garbage.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(b"this is not a deflate stream " * 4)
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with listening(make_config(tmp_path)) as listener:
            ae = AE(ae_title=CALLER_AE)
            ae.add_requested_context(
                ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian
            )
            assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
            assert assoc.is_established
            try:
                status = int(assoc.send_c_store(garbage).Status)
            finally:
                assoc.release()
            assert status == StoreStatus.CANNOT_UNDERSTAND == 0xC000
            assert instance_rows(listener) == {}
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def test_write_failure_gets_out_of_resources(tmp_path: Path) -> None:
    ds = pydicom.dcmread(sample("CR_cspine_16x16_dicomdir6154.dcm"))
    config = make_config(tmp_path)
    with listening(config) as listener:
        # A file where the study's folder must go: the durable write fails with an OSError.
        (listener.layout.instances_dir / ds.StudyInstanceUID).write_bytes(b"")
        assert pynetdicom_store(listener.port, ds) == StoreStatus.OUT_OF_RESOURCES == 0xA700
        assert instance_rows(listener) == {}
        assert list(listener.layout.tmp_dir.iterdir()) == []


def test_allowed_callers_checks_ae_title_and_host(tmp_path: Path) -> None:
    callers = [
        {"ae_title": CALLER_AE, "host": "127.0.0.1"},
        {"ae_title": "OTHER_HOST", "host": "127.0.0.2"},
    ]
    with listening(make_config(tmp_path, extra={"allowed_callers": callers})) as listener:
        assert echoscu(listener.port, calling=CALLER_AE).returncode == 0
        for calling in ("INTRUDER", "OTHER_HOST"):
            result = echoscu(listener.port, calling=calling)
            assert result.returncode != 0
            assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
        ds = pydicom.dcmread(sample("CR_cspine_16x16_dicomdir6154.dcm"))
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
        assert assoc.is_rejected
        assert instance_rows(listener) == {}


def test_wrong_called_ae_title_is_rejected(tmp_path: Path) -> None:
    with listening(make_config(tmp_path)) as listener:
        result = echoscu(listener.port, called="SOMEONE_ELSE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_study_is_queued_when_stable_and_requeued_by_a_late_instance(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    stop = threading.Event()
    ports: list[int] = []
    bound = threading.Event()

    def ready(listener: Listener) -> None:
        ports.append(listener.port)
        bound.set()

    threads = [
        threading.Thread(target=run_listener, args=(config, stop, ready), daemon=True),
        threading.Thread(target=run_assembler, args=(config, stop), daemon=True),
    ]
    first, late = sample("RG2_JPLL.dcm"), sample("RG2_JLSL.dcm")
    study = pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
    for thread in threads:
        thread.start()
    try:
        assert bound.wait(timeout=30)
        (port,) = ports
        with StateDB(StateLayout(config.node.state_dir).db_path) as db:
            queue = SqliteJobQueue.from_config(db, config)
            assert storescu(port, first).returncode == 0
            wait_for(lambda: queue.depth().queued == 1)
            job = queue.lease("test-worker")
            assert job is not None
            assert (job.study_instance_uid, job.version, len(job.instances)) == (study, 1, 1)
            queue.complete(job, [], [])
            assert queue.job_state(job.job_id)[0] is JobState.DELIVERED
            assert storescu(port, late).returncode == 0
            wait_for(lambda: queue.depth().queued == 1)
            again = queue.lease("test-worker")
            assert again is not None
            assert (again.study_instance_uid, again.version, len(again.instances)) == (study, 2, 2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
