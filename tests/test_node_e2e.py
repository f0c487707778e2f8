"""The whole node end to end, as separate processes against real peers on 127.0.0.1.

The modality is DCMTK (``storescu``, ``echoscu``); the PACS is a real Orthanc (Debian package) or
DCMTK ``storescp``; the node runs as ``python -m dicomnode serve`` (or ``listen`` + ``work``)
with a tiny random ensemble whose thresholds flag every image (so every image has boxes to
check). Every server is started by the test on a free port and stopped by PID in a ``finally``
(the node and Orthanc bind 127.0.0.1 or refuse non-loopback peers; this DCMTK's storescp has
no bind option).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomnode.config import load_config
from dicomnode.demo import (
    OrthancPacs,
    Patient,
    ReceivedObject,
    StoreScpPacs,
    dx_from_image,
    free_port,
    read_report,
)
from dicomnode.queue.sqlite import open_queue
from dicomnode.records import DeliveryState, JobState
from dicomnode.state import StateDB
from dicomnode.writers.common import FRACTURE
from dicomnode.writers.sc import MIN_SHOWN, TEXT_CARD, banner_height
from inference.export import write_random_ensemble
from inference.imageio import read_grayscale
from inference.records import Decision, Thresholds
from inference.regions import match_body_part
from tests.conftest import DICOM_SAMPLES, REPO, SMALL_MEMBERS, STORESCU_SYNTAX

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(300)]

STORESCU, ECHOSCU, DCIODVFY = "/usr/bin/storescu", "/usr/bin/echoscu", "/usr/bin/dciodvfy"
NODE_AE, MODALITY_AE = "FRACTURE_AI", "MODALITY"
FRACATLAS_SAMPLES = REPO / "samples" / "fracatlas"
#: A patient whose every identifying value is distinctive, to find any leak into the logs.
PATIENT = Patient(
    name="Gonçalves^Zoë^Maëlle",
    patient_id="PIDX93517Q",
    birth_date="19630417",
    sex="F",
    accession_number="ACCN60418Z",
)
T = TypeVar("T")


# -- helpers --------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 90.0) -> T:
    """Poll ``probe`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@dataclass
class NodeProcess:
    """One ``python -m dicomnode <role>`` process and its JSON log."""

    process: subprocess.Popen[bytes]
    log_path: Path
    offset: int  # where this process's lines start in a log shared by restarts

    def events(self) -> list[dict[str, Any]]:
        with self.log_path.open("rb") as handle:
            handle.seek(self.offset)
            lines = handle.read().decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def event(self, name: str, **fields: object) -> dict[str, Any] | None:
        """The last logged event ``name`` whose fields include ``fields``."""
        matching = [
            e
            for e in self.events()
            if e["event"] == name and all(e.get(k) == v for k, v in fields.items())
        ]
        return matching[-1] if matching else None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextmanager
def node(
    role: str, config: Path, log_path: Path, ready: str = "service_ready"
) -> Iterator[NodeProcess]:
    """Start ``dicomnode <role>`` and wait for its ``ready`` event; stop it by PID at the end."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", role, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    running = NodeProcess(process, log_path, offset)
    try:
        wait_for(
            f"{role} to be ready",
            lambda: running.event(ready) is not None or process.poll() is not None,
            timeout=120,
        )
        assert process.poll() is None, log_path.read_text()
        yield running
    finally:
        running.stop()


def write_config(
    folder: Path,
    weights: Path,
    destinations: list[tuple[str, int]],
    *,
    port: int,
    ae_title: str = NODE_AE,
    stable_seconds: float = 0.5,
    extra: str = "",
    gsps: bool = False,
) -> Path:
    """A node config in ``folder`` (state in ``folder/state``); destinations: (AE, port)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        f'[node]\nae_title = "{ae_title}"\nport = {port}\nstate_dir = "state"\n\n'
        f"[study]\nstable_seconds = {stable_seconds}\n\n"
        f'[inference]\nweights = "{weights}"\ndevice = "cpu"\n\n'
        f"[outputs]\ngsps = {'true' if gsps else 'false'}\n\n"
        "[queue]\nlease_seconds = 3\n\n"
        "[delivery]\nretry_initial_seconds = 0.4\nretry_max_seconds = 1\n\n"
    )
    for ae, dest_port in destinations:
        text += f'[[destinations]]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {dest_port}\n\n'
    path = folder / "node.toml"
    path.write_text(text + extra)
    return path


def storescu(
    port: int, *files: Path, calling: str = MODALITY_AE, called: str = NODE_AE
) -> subprocess.CompletedProcess[str]:
    """Send files (all of one transfer syntax) with DCMTK storescu, as stored."""
    syntaxes = {
        str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files
    }
    assert len(syntaxes) == 1
    option = STORESCU_SYNTAX[syntaxes.pop()]
    cmd = [STORESCU, option, "-aec", called, "-aet", calling, "127.0.0.1", str(port)]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=120)


def send(port: int, *files: Path, called: str = NODE_AE) -> None:
    run = storescu(port, *files, called=called)
    assert run.returncode == 0, run.stdout + run.stderr


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def fracatlas(name: str) -> np.ndarray:
    image = read_grayscale(FRACATLAS_SAMPLES / name)
    assert image.dtype == np.uint8
    return image


def study_jobs(config: Path, study_uid: str) -> list[tuple[int, int, JobState, str | None, int]]:
    """(job id, version, state, last error, attempt) of every job of a study, oldest first."""
    with StateDB(load_config(config).node.state_dir / "state.sqlite") as db:
        rows = db.query(
            "SELECT job_id, version, state, last_error, attempt FROM jobs WHERE study_uid = ? "
            "ORDER BY job_id",
            (study_uid,),
        )
    return [(r[0], r[1], JobState(r[2]), r[3], r[4]) for r in rows]


def settled(config: Path, study_uid: str, version: int = 1) -> tuple[JobState, str | None] | None:
    """The state of the study's job ``version`` once delivered or failed, else None."""
    for _, v, state, error, _ in study_jobs(config, study_uid):
        if v == version and state in (JobState.DELIVERED, JobState.FAILED):
            return state, error
    return None


def status_json(config: Path) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-m", "dicomnode", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


def dicomnode_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, timeout=60
    )


def by_class(objects: list[ReceivedObject], sop_class: str) -> list[ReceivedObject]:
    return [o for o in objects if o.sop_class_uid == sop_class]


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / f"check-{generate_uid()}.dcm"
    path.write_bytes(data)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    path.unlink()
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def leaked_patient_data(log_text: str, patient: Patient) -> list[str]:
    """Identifying values of ``patient`` found in a JSON log (raw and JSON-decoded)."""
    values = [
        patient.name,
        *patient.name.split("^"),
        patient.patient_id,
        patient.birth_date,
        patient.accession_number,
    ]
    decoded = [
        json.dumps(json.loads(line), ensure_ascii=False)
        for line in log_text.splitlines()
        if line.startswith("{")
    ]
    texts = [log_text, *decoded]
    return sorted({v for v in values if any(v in text for text in texts)})


# -- the shared PACS and node ------------------------------------------------------------------


@dataclass
class Setup:
    orthanc: OrthancPacs
    node: NodeProcess
    config: Path
    port: int
    tmp: Path


def positive_weights(folder: Path) -> Path:
    """A tiny random ensemble whose thresholds call every image a fracture (so it has boxes)."""
    write_random_ensemble(folder, SMALL_MEMBERS, thresholds={"global": Thresholds(0.0, 0.0, 0.5)})
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return positive_weights(tmp_path_factory.mktemp("weights") / "ensemble")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPacs]:
    """Orthanc accepting stores from our node's AE title on loopback only."""
    with OrthancPacs(
        tmp_path_factory.mktemp("orthanc"), ae_title="ORTHANC", allowed=[(NODE_AE, "127.0.0.1")]
    ) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def pacs_node(
    tmp_path_factory: pytest.TempPathFactory, weights: Path, orthanc: OrthancPacs
) -> Iterator[Setup]:
    """``dicomnode serve`` sending SR, SC and GSPS to Orthanc."""
    tmp = tmp_path_factory.mktemp("node")
    port = free_port()
    config = write_config(
        tmp, weights, [(orthanc.ae_title, orthanc.dicom_port)], port=port, gsps=True
    )
    with node("serve", config, tmp / "node.log") as running:
        yield Setup(orthanc, running, config, port, tmp)


# -- tests ----------------------------------------------------------------------------------


def renamed_copy(source: Path, target: Path) -> Dataset:
    """``source`` with fresh Study/Series/SOP Instance UIDs (pixel data untouched, compressed
    or not), so each sample is its own study."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target, enforce_file_format=True)
    return ds


def test_every_sample_encoding_is_analysed_or_failed_with_its_reason(
    pacs_node: Setup, tmp_path: Path
) -> None:
    with (DICOM_SAMPLES / "samples.csv").open(newline="") as handle:
        samples = [DICOM_SAMPLES / row["file"] for row in csv.DictReader(handle)]
    assert len(samples) >= 15 and sorted(samples) == sorted(DICOM_SAMPLES.glob("*.dcm"))
    copies: dict[str, tuple[Path, Dataset]] = {}
    by_syntax: dict[str, list[Path]] = {}
    for sample in samples:
        target = tmp_path / sample.name
        ds = renamed_copy(sample, target)
        copies[sample.name] = (target, ds)
        by_syntax.setdefault(str(ds.file_meta.TransferSyntaxUID), []).append(target)
    for files in by_syntax.values():  # the broken files are sent amid the good ones
        send(pacs_node.port, *files)

    outcomes = {
        name: wait_for(
            f"{name} to settle", lambda ds=ds: settled(pacs_node.config, ds.StudyInstanceUID)
        )
        for name, (_, ds) in copies.items()
    }
    # every accepted study gets an answer the radiologist can see, analysed or not
    assert {name: outcome for name, outcome in outcomes.items()} == {
        name: (JobState.DELIVERED, None) for name in outcomes
    }
    for name, (path, ds) in copies.items():
        objects = pacs_node.orthanc.received(ds.StudyInstanceUID)
        (report,) = by_class(objects, Comprehensive3DSRStorage)
        (capture,) = by_class(objects, SecondaryCaptureImageStorage)
        states = by_class(objects, GrayscaleSoftcopyPresentationStateStorage)
        for obj in objects:
            if obj.sop_class_uid != ds.SOPClassUID:
                assert dciodvfy_errors(obj.data, tmp_path) == [], (name, obj.sop_class_uid)
        (impression,) = find_content_items(
            report.dataset(), name=codes.DCM.Impression, recursive=True
        )
        expected = not_analysed_reason(name)
        if expected is None:  # analysed: a decision, boxes as a presentation state too
            assert not impression.TextValue.startswith("Not analysed"), name
            assert len(states) == 1, name
            check_polarity(capture.dataset(), pydicom.dcmread(path))
        else:
            assert impression.TextValue.startswith(f"Not analysed - {expected}"), (name, impression)
            assert states == [], name
            pixels = capture.dataset().pixel_array
            if "_BROKEN" in name or min(int(ds.Rows), int(ds.Columns)) < MIN_SHOWN:
                assert pixels.shape == TEXT_CARD and pixels.max() == 255, name  # words only
            else:  # the "NOT ANALYSED" banner above the image
                banner = banner_height(int(ds.Rows), int(ds.Columns))
                assert pixels.shape == (int(ds.Rows) + banner, int(ds.Columns)), name
                assert pixels[:banner].max() > 200, name  # white text (anti-aliased)


def not_analysed_reason(sample: str) -> str | None:
    """Why a sample file gets no fracture decision with the shipped weights (None: analysed)."""
    if "_BROKEN" in sample:
        return "the image data could not be decoded"
    if "chest" in sample or sample.startswith(("RG1_", "DX_highdicom")):
        return "outside the intended use (chest)"
    if sample.startswith("CR_cspine"):  # valid, but 16x16 px
        return "unsuitable for automated analysis (too small or blank)"
    return None


def check_polarity(capture: Dataset, source: Dataset) -> None:
    """The Secondary Capture shows bone bright: it correlates positively with the stored values
    of a MONOCHROME2 source and negatively with those of a MONOCHROME1 source."""
    banner = banner_height(int(source.Rows), int(source.Columns))
    shown = capture.pixel_array[banner:].astype(np.float64)
    stored = source.pixel_array.astype(np.float64)
    assert shown.shape == stored.shape
    step = max(1, stored.shape[0] // 256)
    corr = np.corrcoef(shown[::step, ::step].ravel(), stored[::step, ::step].ravel())[0, 1]
    if source.PhotometricInterpretation == "MONOCHROME1":
        assert corr < -0.5, corr
    else:
        assert corr > 0.5, corr


def three_view_study(tmp_path: Path, patient: Patient) -> tuple[str, list[Path]]:
    """Hand, leg (stored MONOCHROME1) and shoulder radiographs of one study."""
    study_uid, series_uid = generate_uid(), generate_uid()
    views = [
        ("IMG0000019.jpg", "HAND", False),
        ("IMG0000466.jpg", "LEG", True),
        ("IMG0002303.jpg", "SHOULDER", False),
    ]
    files = []
    for number, (name, body_part, mono1) in enumerate(views, start=1):
        ds = dx_from_image(
            fracatlas(name),
            body_part=body_part,
            patient=patient,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=number,
            monochrome1=mono1,
        )
        files.append(save(ds, tmp_path / f"{body_part}.dcm"))
    return study_uid, files


def test_three_view_study_one_batch_sr_content_and_non_ascii_name(
    pacs_node: Setup, tmp_path: Path
) -> None:
    study_uid, files = three_view_study(tmp_path, PATIENT)
    send(pacs_node.port, *files)
    assert wait_for("the study", lambda: settled(pacs_node.config, study_uid)) == (
        JobState.DELIVERED,
        None,
    )
    ((job_id, version, *_),) = study_jobs(pacs_node.config, study_uid)
    written = pacs_node.node.event("job_results_written", job_id=job_id)
    assert written is not None and written["analysed"] == 3 and version == 1

    objects = pacs_node.orthanc.received(study_uid)
    (sr,) = by_class(objects, Comprehensive3DSRStorage)
    assert len(by_class(objects, SecondaryCaptureImageStorage)) == 3
    assert len(by_class(objects, GrayscaleSoftcopyPresentationStateStorage)) == 3
    for obj in objects:
        assert dciodvfy_errors(obj.data, tmp_path) == [], obj.sop_class_uid
        ds = obj.dataset()
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == PATIENT.name and ds.PatientID == PATIENT.patient_id

    sources = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
    report = hd.sr.srread(io.BytesIO(sr.data))
    groups = [
        g for g in report.content.get_planar_roi_measurement_groups()
        if g.get_measurements(name=codes.DCM.Probability)  # the whole-image assessments
    ]
    assert len(groups) == 3
    for group in groups:
        assert group.finding_type == FRACTURE
        roi = group.roi
        assert roi is not None
        source = sources[str(roi.ContentSequence[0].ReferencedSOPSequence[0]
                             .ReferencedSOPInstanceUID)]
        region = match_body_part(str(source.BodyPartExamined))
        assert region is not None
        (site,) = group.finding_sites
        assert (site.value.value, site.value.scheme_designator) == (
            region.finding_site.value,
            region.finding_site.scheme_designator,
        )
    images = read_report(sr.data)
    assert {image.sop_instance_uid for image in images} == set(sources)
    for image in images:
        assert image.decision is Decision.FRACTURE and 0.0 <= image.score <= 1.0
        assert image.boxes, "a positive finding has at least one box"
        source = sources[image.sop_instance_uid]
        for x0, y0, x1, y1 in image.boxes:
            assert 0 <= x0 < x1 <= source.Columns and 0 <= y0 < y1 <= source.Rows
    for roi_group in report.content.get_planar_roi_measurement_groups():
        points = np.asarray(roi_group.roi.value)
        assert points.shape == (5, 2) and np.array_equal(points[0], points[-1])  # closed

    leaks = leaked_patient_data(pacs_node.node.log_path.read_text(), PATIENT)
    assert leaks == []


def test_late_instance_reruns_the_study_with_a_predecessor(
    pacs_node: Setup, tmp_path: Path
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    first = save(
        dx_from_image(
            fracatlas("IMG0000019.jpg"),
            body_part="HAND",
            study_uid=study_uid,
            series_uid=series_uid,
        ),
        tmp_path / "first.dcm",
    )
    send(pacs_node.port, first)
    assert wait_for("version 1", lambda: settled(pacs_node.config, study_uid, 1))[0] is (
        JobState.DELIVERED
    )
    (old_sr,) = by_class(pacs_node.orthanc.received(study_uid), Comprehensive3DSRStorage)

    late = save(
        dx_from_image(
            fracatlas("IMG0000466.jpg"),
            body_part="LEG",
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=2,
        ),
        tmp_path / "late.dcm",
    )
    send(pacs_node.port, late)
    assert wait_for("version 2", lambda: settled(pacs_node.config, study_uid, 2))[0] is (
        JobState.DELIVERED
    )
    reports = by_class(pacs_node.orthanc.received(study_uid), Comprehensive3DSRStorage)
    (new_sr,) = [r for r in reports if r.sop_instance_uid != old_sr.sop_instance_uid]
    ds = new_sr.dataset()
    (predecessor,) = ds.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == study_uid
    (ref,) = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == old_sr.sop_instance_uid
    assert len(read_report(new_sr.data)) == 2
    assert "PredecessorDocumentsSequence" not in old_sr.dataset()


def test_destination_down_then_back_is_delivered_with_backoff_in_status(
    weights: Path, tmp_path: Path
) -> None:
    scp = StoreScpPacs(tmp_path / "pacs", ae_title="LATEPACS")  # port reserved, not started
    config = write_config(
        tmp_path / "node", weights, [(scp.ae_title, scp.dicom_port)], port=free_port()
    )
    port = load_config(config).node.port
    ds = dx_from_image(fracatlas("IMG0000466.jpg"), body_part="LEG")
    with node("serve", config, tmp_path / "node.log"):
        send(port, save(ds, tmp_path / "leg.dcm"))

        def retrying() -> dict[str, Any] | None:
            (delivery,) = status_json(config)["deliveries"] or [None]
            ok = delivery is not None and delivery["attempts"] >= 2
            return delivery if ok and delivery["state"] == "pending" else None

        delivery = wait_for("retries", retrying)
        assert "cannot connect" in delivery["last_error"]
        assert delivery["next_attempt_in_seconds"] is not None
        assert delivery["study_instance_uid"] == ds.StudyInstanceUID
        text = dicomnode_cli("status", "--config", str(config)).stdout
        assert "pending" in text and "cannot connect" in text and "NEXT ATTEMPT" in text
        with scp:
            assert wait_for("delivery", lambda: settled(config, ds.StudyInstanceUID)) == (
                JobState.DELIVERED,
                None,
            )
            received = scp.received(ds.StudyInstanceUID)
        assert {o.sop_class_uid for o in received} == {
            Comprehensive3DSRStorage,
            SecondaryCaptureImageStorage,
        }
    (delivery,) = status_json(config)["deliveries"]
    assert delivery["state"] == "delivered" and delivery["last_error"] is None


def test_permanent_rejection_fails_without_blind_retries_and_worker_restarts(
    weights: Path, orthanc: OrthancPacs, tmp_path: Path
) -> None:
    config = write_config(  # Orthanc does not know this calling AE title
        tmp_path / "node",
        weights,
        [(orthanc.ae_title, orthanc.dicom_port)],
        port=free_port(),
        ae_title="STRANGER",
    )
    port = load_config(config).node.port
    first = dx_from_image(fracatlas("IMG0000019.jpg"), body_part="HAND")
    with node("serve", config, tmp_path / "node.log") as running:
        send(port, save(first, tmp_path / "first.dcm"), called="STRANGER")
        state, error = wait_for("failure", lambda: settled(config, first.StudyInstanceUID))
        assert state is JobState.FAILED and error is not None
        assert "rejected-permanent" in error
        time.sleep(2.0)  # several back-off periods (0.4 s): a permanent failure is not retried
        (delivery,) = status_json(config)["deliveries"]
        assert (delivery["state"], delivery["attempts"]) == ("failed", 1)
        assert "Calling AE title not recognised" in delivery["last_error"]
        assert orthanc.instance_ids(first.StudyInstanceUID) == []

        retried = dicomnode_cli("retry", "--config", str(config), first.StudyInstanceUID)
        assert retried.returncode == 0 and "re-queued 1" in retried.stdout
        wait_for(
            "the second failed attempt",
            lambda: len([e for e in running.events() if e["event"] == "delivery_failed"]) == 2,
        )
        nothing = dicomnode_cli("retry", "--config", str(config), generate_uid())
        assert nothing.returncode == 1 and "no failed jobs" in nothing.stderr

        # A crash of the worker process (here SIGKILL) never takes the listener down: serve
        # restarts the worker, and a study sent meanwhile is processed.
        child = running.event("worker_process_started", restarts=0)
        assert child is not None
        os.kill(child["pid"], signal.SIGKILL)
        second = dx_from_image(fracatlas("IMG0002303.jpg"), body_part="SHOULDER")
        send(port, save(second, tmp_path / "second.dcm"), called="STRANGER")
        wait_for("a new worker", lambda: running.event("worker_process_started", restarts=1))
        assert running.event("worker_process_died", pid=child["pid"]) is not None
        assert (
            wait_for("the second study", lambda: settled(config, second.StudyInstanceUID))[0]
            is JobState.FAILED
        )  # processed; its delivery is refused like the first
        assert running.process.poll() is None


def test_unknown_calling_ae_is_rejected_when_allowed_callers_are_set(
    weights: Path, tmp_path: Path
) -> None:
    allowed = f'[[allowed_callers]]\nae_title = "{MODALITY_AE}"\nhost = "127.0.0.1"\n'
    config = write_config(tmp_path / "node", weights, [], port=free_port(), extra=allowed)
    port = load_config(config).node.port
    image = save(dx_from_image(fracatlas("IMG0000466.jpg"), body_part="LEG"), tmp_path / "a.dcm")
    with node("listen", config, tmp_path / "node.log"):
        rejected = subprocess.run(
            [ECHOSCU, "-aec", NODE_AE, "-aet", "INTRUDER", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert rejected.returncode != 0
        assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
        store = storescu(port, image, calling="INTRUDER")
        assert store.returncode != 0
        echo = dicomnode_cli(
            "echo", "127.0.0.1", str(port), "--aet", NODE_AE, "--calling-aet", MODALITY_AE
        )
        assert echo.returncode == 0 and "success" in echo.stdout
        refused = dicomnode_cli(
            "echo", "127.0.0.1", str(port), "--aet", NODE_AE, "--calling-aet", "INTRUDER"
        )
        assert refused.returncode == 1 and "rejected" in refused.stderr
        with StateDB(load_config(config).node.state_dir / "state.sqlite") as db:
            assert db.query("SELECT COUNT(*) FROM instances")[0][0] == 0
        send(port, image)
        with StateDB(load_config(config).node.state_dir / "state.sqlite") as db:
            assert db.query("SELECT COUNT(*) FROM instances")[0][0] == 1


def test_restarts_of_listener_and_worker_lose_nothing(weights: Path, tmp_path: Path) -> None:
    """listen and work as separate processes, each killed or restarted with work in flight."""
    scp = StoreScpPacs(tmp_path / "pacs")
    port = free_port()
    config = write_config(
        tmp_path / "node",
        weights,
        [(scp.ae_title, scp.dicom_port)],
        port=port,
        stable_seconds=1.5,
    )
    cfg = load_config(config)
    images = {
        key: save(
            dx_from_image(fracatlas(name), body_part=part, patient=PATIENT), tmp_path / f"{key}.dcm"
        )
        for key, name, part in [
            ("a", "IMG0000019.jpg", "HAND"),
            ("b", "IMG0000466.jpg", "LEG"),
            ("c", "IMG0002303.jpg", "SHOULDER"),
            ("d", "IMG0000466.jpg", "LEG"),
        ]
    }
    studies = {k: str(pydicom.dcmread(p).StudyInstanceUID) for k, p in images.items()}
    listen_log, work_log = tmp_path / "listen.log", tmp_path / "work.log"
    with scp:
        # A is acknowledged, then the listener is killed before the study is stable.
        with node("listen", config, listen_log) as listener:
            send(port, images["a"])
            assert listener.stop(signal.SIGKILL) == -signal.SIGKILL
        assert study_jobs(config, studies["a"]) == []
        with node("listen", config, listen_log) as listener:
            wait_for("A queued", lambda: study_jobs(config, studies["a"]))
            # A worker takes A's job and dies (its lease is left to expire).
            with StateDB(cfg.node.state_dir / "state.sqlite") as db:
                dead = open_queue(db, cfg).lease("dead-worker")
            assert dead is not None and dead.study_instance_uid == studies["a"]
            send(port, images["b"])
            with node("work", config, work_log):
                assert wait_for("B", lambda: settled(config, studies["b"]))[0] is JobState.DELIVERED
                assert wait_for("A", lambda: settled(config, studies["a"]))[0] is JobState.DELIVERED
            send(port, images["c"])  # no worker running: C waits in the queue
            wait_for("C queued", lambda: study_jobs(config, studies["c"]))
            assert listener.stop() == 0  # graceful
        with node("listen", config, listen_log), node("work", config, work_log):
            send(port, images["d"])
            for key in ("c", "d"):
                assert wait_for(key, lambda k=key: settled(config, studies[k]))[0] is (
                    JobState.DELIVERED
                )
        for key, study in studies.items():
            kinds = {o.sop_class_uid for o in scp.received(study)}
            assert kinds == {Comprehensive3DSRStorage, SecondaryCaptureImageStorage}, key
    (job_a,) = study_jobs(config, studies["a"])
    assert job_a[4] == 2  # the dead worker's attempt, then the real one
    for log in (listen_log, work_log):
        assert leaked_patient_data(log.read_text(), PATIENT) == []
    with StateDB(cfg.node.state_dir / "state.sqlite") as db:
        states = {r[0] for r in db.query("SELECT state FROM deliveries")}
    assert states == {DeliveryState.DELIVERED}


def test_samples_folder_is_attributed() -> None:
    """The demo's radiographs ship with their CC BY 4.0 attribution."""
    text = (FRACATLAS_SAMPLES / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in text and "10.6084/m9.figshare.22363012" in text
    images = sorted(FRACATLAS_SAMPLES.glob("*.jpg"))
    assert len(images) == 3
    for image in images:
        assert image.name in text
