"""The demo: a FracAtlas radiograph goes through the node and its results arrive at a real PACS.

``python -m dicomnode.demo [--sample hand|leg|shoulder] [--keep]`` (or ``./run demo``):

1. starts a throwaway receiving PACS on 127.0.0.1: Orthanc (``/usr/sbin/Orthanc``, Debian
   package) with a generated configuration in a temporary folder, or DCMTK's ``storescp`` when
   Orthanc is not installed;
2. starts ``dicomnode serve`` with the shipped weights (``ensemble_weights/``) and a temporary
   state directory, sending its results to that PACS;
3. wraps a sample radiograph from ``samples/fracatlas/`` as a DX instance (fictitious patient
   ``Demo^Patient``) and sends it to the node with DCMTK's ``storescu``;
4. waits for the SR and the Secondary Capture to arrive at the PACS, prints where they are, the
   decision, score and boxes read back from the SR with highdicom, and writes the Secondary
   Capture as ``demo-output/<sample>-secondary-capture.png``;
5. stops everything it started (by PID) and removes the temporary folder unless ``--keep``.

It needs nothing outside the repository. The whole run is bounded (``--timeout``, 180 s).
The PACS helpers here (:class:`OrthancPacs`, :class:`StoreScpPacs`, :func:`dx_from_image`) are
also what the end-to-end tests use.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, cast

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomnode.writers.common import BOX_CERTAINTY, DECISION_CODES, DECISION_TEXT
from dicomnode.writers.kos import REJECTED_FOR_QUALITY_REASONS
from inference.imageio import read_grayscale
from inference.records import Decision

REPO = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO / "samples" / "fracatlas"
WEIGHTS_DIR = REPO / "ensemble_weights"
OUTPUT_DIR = REPO / "demo-output"
ORTHANC = Path("/usr/sbin/Orthanc")
STORESCP = Path("/usr/bin/storescp")
STORESCU = Path("/usr/bin/storescu")
LOOPBACK = "127.0.0.1"

#: The sample radiographs: name → (file, DICOM Body Part Examined).
SAMPLES = {
    "hand": ("IMG0000019.jpg", "HAND"),
    "leg": ("IMG0000466.jpg", "LEG"),
    "shoulder": ("IMG0002303.jpg", "SHOULDER"),
}
NODE_AE, PACS_AE, MODALITY_AE = "FRACTURE_AI", "DEMO_PACS", "DEMO_MODALITY"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until_bound(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    """Wait until something binds ``port`` (without connecting: storescp serves one peer at a
    time); raise :class:`DemoError` if ``process`` exits or ``deadline`` (monotonic) passes."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"process {process.pid} exited with status {process.returncode}")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                return
        time.sleep(0.1)
    raise DemoError(f"nothing listens on port {port} in time")


def stop_process(process: subprocess.Popen[bytes], grace: float = 20.0) -> int | None:
    """SIGTERM the process (by its PID), SIGKILL it after ``grace`` seconds; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


# -- DICOM instances -----------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    """The (fictitious) patient and study attributes written into a wrapped radiograph."""

    name: str = "Demo^Patient"
    patient_id: str = "DEMO-0001"
    birth_date: str = "19700101"
    sex: str = "O"
    accession_number: str = "DEMO-ACC-1"


def dx_from_image(
    pixels: np.ndarray,
    *,
    body_part: str,
    patient: Patient = Patient(),
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    monochrome1: bool = False,
    description: str = "",
) -> Dataset:
    """An 8-bit DX (for presentation) instance of a grey radiograph, as a modality would send it.

    ``pixels``: 2-D uint8, bone bright. With ``monochrome1`` the stored values are inverted and
    Photometric Interpretation is MONOCHROME1 (bone dark in the stored values), as many CR/DX
    devices write. UIDs not given are generated; the character set is ISO_IR 192 (UTF-8).
    """
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be a 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.AccessionNumber = patient.accession_number
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = description or f"XR {body_part.title()}"
    ds.SeriesDescription = ds.StudyDescription
    ds.Modality = "DX"
    ds.Manufacturer = "fracture-dicomnode demo"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.BodyPartExamined = body_part
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01"  # the FracAtlas source is a JPEG
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if monochrome1 else 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    stored = 255 - pixels if monochrome1 else pixels
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def sample_instance(sample: str, out_dir: Path, patient: Patient = Patient()) -> Path:
    """Wrap sample radiograph ``sample`` (hand, leg, shoulder) as a DX file in ``out_dir``."""
    if sample not in SAMPLES:
        raise ValueError(f"unknown sample {sample!r}; choose one of {sorted(SAMPLES)}")
    name, body_part = SAMPLES[sample]
    image = read_grayscale(SAMPLES_DIR / name)
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected an 8-bit image, got {image.dtype}")
    ds = dx_from_image(image, body_part=body_part, patient=patient)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{Path(name).stem}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def storescu(port: int, files: Sequence[Path], called: str, calling: str = MODALITY_AE) -> None:
    """Send ``files`` with DCMTK storescu (proposing their own transfer syntaxes); raise
    :class:`DemoError` with storescu's output when it fails."""
    cmd = [str(STORESCU), "-aec", called, "-aet", calling, LOOPBACK, str(port), *map(str, files)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise DemoError(f"storescu failed ({run.returncode}): {run.stdout}{run.stderr}".strip())


# -- receiving PACS --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedObject:
    """One object the PACS holds: its UIDs, where it is, and its bytes (a DICOM file)."""

    sop_class_uid: str
    sop_instance_uid: str
    location: str
    data: bytes

    def dataset(self) -> Dataset:
        return pydicom.dcmread(io.BytesIO(self.data))


def withdrawn_uids(objects: Sequence[ReceivedObject]) -> set[str]:
    """The SOP Instance UIDs that the received rejection notes (Key Object Selection documents
    titled "Rejected for Quality Reasons", IHE IOCM) withdraw."""
    uids: set[str] = set()
    for obj in objects:
        if obj.sop_class_uid != KeyObjectSelectionDocumentStorage:
            continue
        kos = obj.dataset()
        if kos.ConceptNameCodeSequence[0].CodeValue != REJECTED_FOR_QUALITY_REASONS.value:
            continue
        for study in kos.CurrentRequestedProcedureEvidenceSequence:
            for series in study.ReferencedSeriesSequence:
                uids.update(str(r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence)
    return uids


def current_objects(objects: Sequence[ReceivedObject]) -> list[ReceivedObject]:
    """What an IOCM-aware archive shows of a study: every object but the rejection notes and
    the objects they withdraw."""
    withdrawn = withdrawn_uids(objects)
    return [
        o
        for o in objects
        if o.sop_instance_uid not in withdrawn
        and o.sop_class_uid != KeyObjectSelectionDocumentStorage
    ]


class Pacs(Protocol):
    """A receiving C-STORE SCP the demo and the tests can look into."""

    ae_title: str
    dicom_port: int

    def received(self, study_uid: str) -> list[ReceivedObject]: ...


class OrthancPacs:
    """A throwaway Orthanc on 127.0.0.1 with its configuration and storage in ``workdir``.

    ``allowed`` lists the (AE title, IP address) pairs that may store and echo; with None any
    caller may. Orthanc binds all interfaces (it has no bind option), so the DICOM side refuses
    unknown callers when ``allowed`` is given and the REST API refuses remote clients
    (``RemoteAccessAllowed: false``); no authentication is needed on loopback.
    """

    def __init__(
        self,
        workdir: Path,
        ae_title: str = PACS_AE,
        allowed: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.allowed = allowed
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        storage = str(self.workdir / "storage")
        modalities = {f"m{i}": [ae, host, 104] for i, (ae, host) in enumerate(self.allowed or ())}
        return {
            "Name": "dicomnode-demo-pacs",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": self.allowed is None,
            "DicomAlwaysAllowEcho": self.allowed is None,
            "DicomCheckModalityHost": True,
            "DicomModalities": modalities,
            "Plugins": [],
            "LuaScripts": [],
            "StableAge": 1,
        }

    def start(self, timeout: float = 30.0) -> OrthancPacs:
        """Start Orthanc and wait until its REST API answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.configuration(), indent=2))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(ORTHANC), str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DemoError(f"Orthanc exited ({self.process.returncode}): {self.log_tail()}")
            try:
                self.rest("/system")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
                continue
            return self
        raise DemoError(f"Orthanc did not answer within {timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def __enter__(self) -> OrthancPacs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.http_port}{path}"

    def rest(self, path: str, body: object | None = None) -> Any:
        """GET (or POST ``body`` as JSON) on the REST API; the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path), data=data)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def file(self, instance_id: str) -> bytes:
        """The DICOM file of an Orthanc instance."""
        with urllib.request.urlopen(self.url(f"/instances/{instance_id}/file"), timeout=30) as r:
            return bytes(r.read())

    def stored_path(self, instance_id: str) -> Path:
        """Where Orthanc keeps an instance's file: ``<storage>/<uuid[:2]>/<uuid[2:4]>/<uuid>``
        (its file-system storage layout)."""
        uuid = str(self.rest(f"/instances/{instance_id}/attachments/dicom/info")["Uuid"])
        return self.workdir / "storage" / uuid[:2] / uuid[2:4] / uuid

    def instance_ids(self, study_uid: str) -> list[str]:
        """Orthanc's ids of the instances of a study (``/tools/find``)."""
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        return [str(i) for i in self.rest("/tools/find", query)]

    def received(self, study_uid: str) -> list[ReceivedObject]:
        objects = []
        for instance_id in self.instance_ids(study_uid):
            tags = self.rest(f"/instances/{instance_id}/simplified-tags")
            objects.append(
                ReceivedObject(
                    sop_class_uid=str(tags.get("SOPClassUID", "")),
                    sop_instance_uid=str(tags.get("SOPInstanceUID", "")),
                    location=f"Orthanc instance {instance_id}, "
                    f"{self.url(f'/instances/{instance_id}/file')}, "
                    f"file {self.stored_path(instance_id)}",
                    data=self.file(instance_id),
                )
            )
        return objects


class StoreScpPacs:
    """DCMTK storescp writing what it receives to ``workdir/received`` (the fallback PACS).

    storescp accepts any calling AE and binds all interfaces (this DCMTK has no bind option).
    """

    def __init__(self, workdir: Path, ae_title: str = PACS_AE) -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.out_dir = workdir / "received"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> StoreScpPacs:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(STORESCP), "-aet", self.ae_title, "+xa", "-od", str(self.out_dir)]
        self.process = subprocess.Popen(
            [*cmd, str(self.dicom_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until_bound(self.dicom_port, self.process, time.monotonic() + timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def __enter__(self) -> StoreScpPacs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def received(self, study_uid: str) -> list[ReceivedObject]:
        objects = []
        for path in sorted(self.out_dir.iterdir()):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, OSError, EOFError):
                continue  # still being written
            if str(header.get("StudyInstanceUID", "")) == study_uid:
                objects.append(
                    ReceivedObject(
                        sop_class_uid=str(header.SOPClassUID),
                        sop_instance_uid=str(header.SOPInstanceUID),
                        location=str(path),
                        data=path.read_bytes(),
                    )
                )
        return objects


# -- the node ----------------------------------------------------------------------------------


def node_config(
    state_dir: Path, port: int, weights: Path, destination: Pacs, stable_seconds: float = 2.0
) -> str:
    """The TOML configuration of the demo node (everything else at its default)."""
    return (
        "[node]\n"
        f'ae_title = "{NODE_AE}"\nbind = "{LOOPBACK}"\nport = {port}\n'
        f"state_dir = {json.dumps(str(state_dir))}\n\n"
        f"[study]\nstable_seconds = {stable_seconds}\n\n"
        f"[inference]\nweights = {json.dumps(str(weights))}\n\n"
        "[delivery]\nretry_initial_seconds = 2\nretry_max_seconds = 10\n\n"
        f'[[destinations]]\nae_title = "{destination.ae_title}"\nhost = "{LOOPBACK}"\n'
        f"port = {destination.dicom_port}\n"
    )


@contextmanager
def running_node(config: Path, log_path: Path, deadline: float) -> Iterator[int]:
    """``dicomnode serve`` as a child process, logging to ``log_path``; yields its PID once it
    reports ready, stops it (SIGTERM, by PID) on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        while not _logged(log_path, "service_ready"):
            if process.poll() is not None:
                raise DemoError(f"the node exited ({process.returncode}):\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise DemoError(f"the node was not ready in time:\n{_tail(log_path)}")
            time.sleep(0.2)
        yield process.pid
    finally:
        stop_process(process, grace=60.0)


def _logged(log_path: Path, event: str) -> bool:
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("event") == event:
                return True
        except (json.JSONDecodeError, AttributeError):
            continue
    return False


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for_results(pacs: Pacs, study_uid: str, deadline: float) -> list[ReceivedObject]:
    """Poll the PACS until the study's SR and Secondary Capture(s) are there."""
    wanted = {Comprehensive3DSRStorage, SecondaryCaptureImageStorage}
    while True:
        objects = pacs.received(study_uid)
        if wanted <= {o.sop_class_uid for o in objects}:
            return objects
        if time.monotonic() > deadline:
            raise DemoError("the results did not arrive at the PACS in time")
        time.sleep(0.5)


# -- reading the results -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReportedImage:
    """What the SR says about one image: decision, score, finding site and box corners."""

    sop_instance_uid: str
    decision: Decision
    score: float
    finding_site: str | None
    boxes: tuple[tuple[float, float, float, float], ...]


def decision_of(code: hd.sr.CodedConcept) -> Decision:
    """The node's decision from the SR's qualitative evaluation (present/suspected/absent)."""
    for decision, concept in DECISION_CODES.items():
        if code.value == concept.value and code.scheme_designator == concept.scheme_designator:
            return decision
    raise ValueError(f"unexpected qualitative evaluation {code.value} ({code.meaning})")


def read_report(data: bytes) -> list[ReportedImage]:
    """Decision, score, finding site and boxes per image, read from the SR with highdicom."""
    sr = hd.sr.srread(io.BytesIO(data))
    content = cast(hd.sr.MeasurementReport, sr.content)
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    assessments = []
    for group in content.get_planar_roi_measurement_groups():
        roi = group.roi
        if roi is None:
            continue
        points = np.asarray(roi.value)
        source = str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        if group.get_measurements(name=codes.DCM.Probability):  # the whole-image assessment
            assessments.append((source, group))
        elif group.get_measurements(name=BOX_CERTAINTY):  # a fracture region
            box = (
                float(points[:, 0].min()),
                float(points[:, 1].min()),
                float(points[:, 0].max()),
                float(points[:, 1].max()),
            )
            boxes.setdefault(source, []).append(box)
    images = []
    for source, group in assessments:
        (evaluation,) = group.get_qualitative_evaluations()
        (score,) = group.get_measurements(name=codes.DCM.Probability)
        sites = [str(site.value.meaning) for site in group.finding_sites]
        images.append(
            ReportedImage(
                sop_instance_uid=source,
                decision=decision_of(cast(hd.sr.CodedConcept, evaluation.value)),
                score=float(score.value),
                finding_site=sites[0] if sites else None,
                boxes=tuple(boxes.get(source, ())),
            )
        )
    return images


def save_png(capture: Dataset, path: Path) -> Path:
    """Write a Secondary Capture's pixels as a PNG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.asarray(capture.pixel_array)):
        raise DemoError(f"cannot write {path}")
    return path


# -- main ------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def start_pacs(workdir: Path, stack: ExitStack, allowed: tuple[str, str]) -> Pacs:
    """Orthanc if installed (only the node may store), else DCMTK storescp."""
    if ORTHANC.is_file():
        pacs = stack.enter_context(OrthancPacs(workdir / "orthanc", allowed=[allowed]))
        pid = pacs.process.pid if pacs.process is not None else None
        say(
            f"Orthanc is up (PID {pid}): AE {pacs.ae_title}, DICOM port {pacs.dicom_port}, "
            f"REST {pacs.url('/')}"
        )
        return pacs
    if STORESCP.is_file():
        scp = stack.enter_context(StoreScpPacs(workdir / "storescp"))
        pid = scp.process.pid if scp.process is not None else None
        say(
            f"Orthanc not found; DCMTK storescp is up (PID {pid}): AE {scp.ae_title}, "
            f"port {scp.dicom_port}"
        )
        return scp
    raise DemoError("neither Orthanc (/usr/sbin/Orthanc) nor storescp is installed: ./run setup")


def check_prerequisites(weights: Path) -> None:
    if not (weights / "manifest.toml").is_file():
        raise DemoError(f"no ensemble in {weights} (manifest.toml missing)")
    if not STORESCU.is_file():
        raise DemoError("DCMTK storescu is not installed: ./run setup")


def run_demo(sample: str, keep: bool, timeout: float, weights: Path, out_dir: Path) -> int:
    """The whole demo; returns the exit status."""
    deadline = time.monotonic() + timeout
    check_prerequisites(weights)
    workdir = Path(tempfile.mkdtemp(prefix="dicomnode-demo-"))
    say(f"working folder: {workdir}")
    try:
        with ExitStack() as stack:
            pacs = start_pacs(workdir, stack, (NODE_AE, LOOPBACK))
            node_port = free_port()
            config = workdir / "node.toml"
            config.write_text(node_config(workdir / "state", node_port, weights, pacs))
            say(f"starting dicomnode serve on {LOOPBACK}:{node_port} with {weights} ...")
            log_path = workdir / "node.log"
            pid = stack.enter_context(running_node(config, log_path, deadline))
            say(f"node ready (PID {pid}; JSON log: {log_path})")
            source = sample_instance(sample, workdir / "modality")
            header = pydicom.dcmread(source, stop_before_pixels=True)
            study_uid = str(header.StudyInstanceUID)
            say(
                f"wrapped samples/fracatlas/{SAMPLES[sample][0]} as DX: {header.Rows}x"
                f"{header.Columns}, BodyPartExamined {header.BodyPartExamined}, "
                f"study {study_uid}"
            )
            storescu(node_port, [source], NODE_AE)
            say(f"sent it with storescu to {NODE_AE}@{LOOPBACK}:{node_port}; waiting for results")
            objects = wait_for_results(pacs, study_uid, deadline)
            show_results(objects, sample, out_dir)
            say("stopping the node and the PACS ...")
    finally:
        if keep:
            say(f"kept {workdir} (node.toml, node.log, state/, PACS storage)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            say(f"removed {workdir} (the PACS storage too); --keep keeps it")
    say("done")
    return 0


def show_results(objects: Sequence[ReceivedObject], sample: str, out_dir: Path) -> None:
    """Print where each result arrived, the SR's findings, and save the SC as PNG."""
    kinds: dict[str, str] = {
        Comprehensive3DSRStorage: "SR",
        SecondaryCaptureImageStorage: "Secondary Capture",
    }
    for obj in objects:
        kind = kinds.get(obj.sop_class_uid)
        if kind is not None:
            say(f"arrived at the PACS: {kind} {obj.sop_instance_uid}\n       at {obj.location}")
    for obj in objects:
        if obj.sop_class_uid == Comprehensive3DSRStorage:
            for image in read_report(obj.data):
                say(
                    f"SR: image {image.sop_instance_uid}: {DECISION_TEXT[image.decision]}, "
                    f"score {image.score:.3f}, finding site {image.finding_site or 'unknown'}"
                )
                for x0, y0, x1, y1 in image.boxes:
                    say(f"    box ({x0:.0f}, {y0:.0f}) - ({x1:.0f}, {y1:.0f}) pixels")
                if not image.boxes:
                    say("    no boxes")
    captures = [o for o in objects if o.sop_class_uid == SecondaryCaptureImageStorage]
    for index, capture in enumerate(captures):
        suffix = "" if len(captures) == 1 else f"-{index + 1}"
        png = save_png(capture.dataset(), out_dir / f"{sample}-secondary-capture{suffix}.png")
        say(f"Secondary Capture written as {png}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dicomnode.demo",
        description="Send a FracAtlas radiograph through the node to a throwaway PACS and show "
        "the results.",
    )
    parser.add_argument("--sample", choices=sorted(SAMPLES), default="hand")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds in all (180)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR, help="where the PNG goes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_demo(args.sample, args.keep, args.timeout, args.weights, args.out)
    except (DemoError, ValueError, OSError) as exc:
        print(f"[demo] failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[demo] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
