"""What makes results trustworthy in a PACS workflow, on real samples: full identity, the study
summary, the Image Library, replacement (Instance Numbers, rejection notes), and bad headers that
never cost a result. Every object written is checked with dciodvfy and read back with highdicom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from dicomnode.config import parse_config
from dicomnode.pixels import View, load_view
from dicomnode.storage import StateLayout, installation_uid
from dicomnode.worker import node_identity
from dicomnode.writers import (
    ImageFinding,
    NodeIdentity,
    NotAnalysedImage,
    PreviousReport,
    Withdrawn,
    write_results,
)
from dicomnode.writers.common import StudySummary
from inference.records import AlgorithmInfo, Box, Decision, ImageResult, Thresholds
from inference.regions import region_by_key

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "dicom-samples"
DCIODVFY = Path("/usr/bin/dciodvfy")
ALGORITHM = AlgorithmInfo(name="drn-ensemble", version="2024.1", operating_point="sens-92.5")
NODE = NodeIdentity(
    station_name="FRX1",
    device_uid="1.2.840.99999.1.42",
    device_serial_number="SN-7",
    institution_name="St. Elsewhere",
    uid_prefix="1.2.840.99999.",
)
THRESHOLDS = Thresholds(sensitivity=0.3, high_specificity=0.6, binarize=0.5)
HIP = region_by_key("hip")
#: dciodvfy's one accepted warning: an empty Laterality where the sources do not say.
ACCEPTED = ("attribute <Laterality>",)

pytestmark = pytest.mark.dicom_peers


def result(decision: Decision, score: float, *boxes: Box) -> ImageResult:
    return ImageResult(score, decision, tuple(boxes), "hip", "hip", False, THRESHOLDS)


FRACTURE = result(Decision.FRACTURE, 0.9, Box(400, 600, 900, 1100, 0.95))


def dciodvfy(path: Path) -> None:
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("Error")] == [], path.name
    warnings = [line for line in lines if line.startswith("Warning")]
    assert all(any(a in line for a in ACCEPTED) for line in warnings), warnings


def rich_source(
    tmp_path: Path, name: str = "source", drop: tuple[str, ...] = (), **changes: str
) -> View:
    """The lossy JPEG 2000 hip CR with the identity attributes archives match patients by."""
    ds = pydicom.dcmread(SAMPLES / "RG3_J2KI.dcm")
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-123"
    ds.IssuerOfPatientID = "HOSPITAL-A"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "X-9", "HOSPITAL-B", "TEXT"
    ds.OtherPatientIDsSequence = [other]
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-A"
    ds.AccessionNumber = "ACC-1"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    ds.StudyDescription = "XR Tibia right"
    ds.Manufacturer, ds.ManufacturerModelName = "Acme Imaging", "CR-9000"
    for keyword in drop:
        del ds[keyword]
    for keyword, value in changes.items():  # raw bytes: stored as a real archive's bad headers
        raw = value.encode() + b" " * (len(value) % 2)
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, dictionary_VR(keyword), len(raw), raw, 0, False, True)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return load_view(path)


def test_every_result_carries_the_full_identity_of_its_sources(tmp_path: Path) -> None:
    view = rich_source(tmp_path)
    written = write_results(
        [ImageFinding(view, FRACTURE, HIP.finding_site, "hip")],
        ALGORITHM, NODE, tmp_path / "out", presentation_states=True,
    )
    assert len(written.all) == 3
    for item in written.all:
        dciodvfy(item.path)
        ds = pydicom.dcmread(item.path)
        assert ds.SOPInstanceUID.startswith(NODE.uid_prefix)  # the installation's UID root
        assert ds.SeriesInstanceUID.startswith(NODE.uid_prefix)
        assert (ds.PatientID, ds.IssuerOfPatientID) == ("PID-123", "HOSPITAL-A")
        assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == "HOSPITAL-B"
        assert ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS-A"
        assert ds.StudyDescription == "XR Tibia right"
        equipment = {e.Manufacturer: e for e in ds.ContributingEquipmentSequence}
        acquisition = equipment["Acme Imaging"]  # the source's equipment
        assert acquisition.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
        assert acquisition.ManufacturerModelName == "CR-9000"
        ours = equipment[NODE.manufacturer]  # this installation, as processing equipment
        assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert (ours.StationName, ours.DeviceSerialNumber, ours.InstitutionName) == (
            "FRX1", "SN-7", "St. Elsewhere")
    sc = pydicom.dcmread(written.secondary_captures[0].path)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == view.sop_instance_uid
    assert sc.LossyImageCompression == "01"  # the source is lossy JPEG 2000
    assert sc.BodyPartExamined == "EXTREMITY"  # the source's
    assert sc.Laterality == "R"
    sr = hd.sr.srread(written.report.path)
    observer = find_content_items(sr, name=codes.DCM.DeviceObserverUID, recursive=True)
    assert [item.UID for item in observer] == [NODE.device_uid]


def test_the_device_observer_uid_is_made_once_per_installation(tmp_path: Path) -> None:
    first = installation_uid(StateLayout(tmp_path / "a").create(), "1.2.840.99999.")
    again = installation_uid(StateLayout(tmp_path / "a").create(), "1.2.840.99999.")
    other = installation_uid(StateLayout(tmp_path / "b").create(), "1.2.840.99999.")
    assert first == again != other and first.startswith("1.2.840.99999.")
    config = parse_config(
        {"node": {"state_dir": "a", "ae_title": "NODE_A"},
         "identity": {"uid_root": "1.2.840.99999", "institution_name": "St. Elsewhere"}},
        tmp_path,
    )
    node = node_identity(config)
    assert node.device_uid == first and node.station_name == "NODE_A"
    assert node.device_serial_number == first.replace(".", "")[-12:]  # not "0" anywhere
    assert node.institution_name == "St. Elsewhere" and node.uid_prefix == "1.2.840.99999."


def test_sr_has_a_summary_and_always_an_image_library(tmp_path: Path) -> None:
    fractured = rich_source(tmp_path, "a")
    normal = rich_source(tmp_path, "b", SOPInstanceUID=generate_uid())
    chest = rich_source(tmp_path, "c", drop=("PatientOrientation",),
                        SOPInstanceUID=generate_uid(), BodyPartExamined="CHEST")
    outside = NotAnalysedImage(chest.header, chest.source, "outside the intended use (chest)",
                               chest.pixels)
    findings = [
        ImageFinding(fractured, FRACTURE, HIP.finding_site, "hip"),
        ImageFinding(normal, result(Decision.NO_FRACTURE, 0.1), HIP.finding_site, "hip"),
    ]
    written = write_results(findings, ALGORITHM, NODE, tmp_path / "out", not_analysed=[outside])
    for item in written.all:
        dciodvfy(item.path)
    sr = hd.sr.srread(written.report.path)
    (conclusion,) = find_content_items(sr, name=hd.sr.CodedConcept("72704001", "SCT", "Fracture"),
                                       value_type=hd.sr.ValueTypeValues.CODE, recursive=True)
    assert conclusion.ConceptCodeSequence[0].CodeValue == codes.SCT.Present.value
    (impression,) = find_content_items(sr, name=codes.DCM.Impression, recursive=True)
    assert impression.TextValue == (
        "Fracture present (1 finding in 1 of 2 images, hip). 1 image not analysed: outside the "
        "intended use (chest). AI result, for review by a physician."
    )
    # the library lists every source, with the descriptors the headers hold (no orientation)
    (library,) = find_content_items(sr, name=codes.DCM.ImageLibrary)
    entries = find_content_items(library, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [
        fractured.sop_instance_uid, normal.sop_instance_uid, chest.sop_instance_uid]
    for entry, orientation in zip(entries, (True, True, False), strict=True):
        names = {item.ConceptNameCodeSequence[0].CodeMeaning for item in entry.ContentSequence}
        assert {"Modality", "Pixel Data Rows", "Pixel Data Columns"} <= names
        assert ("Patient Orientation Row" in names) == orientation  # absent: not invented
    # every capture's first banner line is the study summary
    summary = StudySummary.of(findings, [outside])
    assert summary.headline() == "STUDY: FRACTURE PRESENT (1 finding in 1 of 2 images, hip)"
    for capture in written.secondary_captures:
        assert pydicom.dcmread(capture.path).pixel_array[:40].max() > 200


def test_a_malformed_numeric_attribute_never_costs_the_result(tmp_path: Path) -> None:
    view = rich_source(
        tmp_path, PatientWeight="abc", PatientSize="1,80", ImagerPixelSpacing="x\\y",
        PatientOrientation="A\\F",
    )
    written = write_results(
        [ImageFinding(view, FRACTURE, HIP.finding_site, "hip")],
        ALGORITHM, NODE, tmp_path / "out", presentation_states=True,
    )
    for item in written.all:
        dciodvfy(item.path)
        ds = pydicom.dcmread(item.path)
        assert "PatientWeight" not in ds and "PatientSize" not in ds  # left out, not copied
    sr = hd.sr.srread(written.report.path)
    (library,) = find_content_items(sr, name=codes.DCM.ImageLibrary)
    entry = find_content_items(library, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)[0]
    names = {item.ConceptNameCodeSequence[0].CodeMeaning for item in entry.ContentSequence}
    assert "Patient Orientation Row" in names  # valid: kept
    assert "Horizontal Pixel Spacing" not in names  # malformed: left out


def test_a_rerun_numbers_higher_and_withdraws_what_it_replaces(tmp_path: Path) -> None:
    view = rich_source(tmp_path)
    finding = ImageFinding(view, FRACTURE, HIP.finding_site, "hip")
    first = write_results([finding], ALGORITHM, NODE, tmp_path / "v1", presentation_states=True)
    assert [pydicom.dcmread(o.path).InstanceNumber for o in first.all] == [10001, 10001, 10001]
    late = rich_source(tmp_path, "late", SOPInstanceUID=generate_uid())
    previous = PreviousReport(view.study_instance_uid, first.report.series_instance_uid,
                              first.report.sop_instance_uid, first.report.sop_class_uid)
    second = write_results(
        [finding, ImageFinding(late, result(Decision.NO_FRACTURE, 0.2), HIP.finding_site, "hip")],
        ALGORITHM, NODE, tmp_path / "v2", presentation_states=True, previous=previous,
        version=2,
        withdraw=[Withdrawn(o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid, o.path)
                  for o in first.all],
    )
    numbers = sorted(pydicom.dcmread(o.path).InstanceNumber for o in second.all)
    assert min(numbers) > 10001 and numbers[0] == 20001
    note = second.rejection_note
    assert note is not None and second.all[-1] == note  # sent after the results it makes current
    dciodvfy(note.path)
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(note.path))
    assert kos.SOPClassUID == pydicom.uid.KeyObjectSelectionDocumentStorage
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
    assert kos.StudyInstanceUID == view.study_instance_uid and kos.PatientID == "PID-123"
    referenced = {
        ref.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    kept = {o.sop_instance_uid for o in second.all}
    assert referenced == {o.sop_instance_uid for o in first.all} - kept
    assert first.report.sop_instance_uid in referenced  # the old report is withdrawn
    # nothing to withdraw (the same result again): no rejection note
    again = write_results([finding], ALGORITHM, NODE, tmp_path / "v3", presentation_states=True,
                          withdraw=[Withdrawn(o.sop_class_uid, o.sop_instance_uid,
                                              o.series_instance_uid, o.path)
                                    for o in first.all if o.kind.value != "sr"])
    assert again.rejection_note is None


def test_a_text_card_answers_for_an_image_that_could_not_be_decoded(tmp_path: Path) -> None:
    header = pydicom.dcmread(SAMPLES / "RG2_JPLY_BROKEN.dcm", stop_before_pixels=True)
    view = rich_source(tmp_path)
    broken = NotAnalysedImage(header, view.source.__class__(str(header.SOPInstanceUID), "0" * 64),
                              "the image data could not be decoded")
    header.StudyInstanceUID = view.study_instance_uid
    written = write_results([], ALGORITHM, NODE, tmp_path / "out", not_analysed=[broken])
    assert len(written.all) == 2
    for item in written.all:
        dciodvfy(item.path)
    capture = pydicom.dcmread(written.secondary_captures[0].path)
    assert capture.pixel_array.shape == (480, 1024) and capture.pixel_array.max() == 255
    assert "not analysed" in capture.DerivationDescription
    assert np.asarray(capture.pixel_array).mean() < 40  # white words on black


@pytest.mark.parametrize("sample", ["RG2_JPLL_derived_EVRLE.dcm", "DX_highdicom_small.dcm"])
def test_dcmtk_renders_the_image_through_the_gsps_as_the_capture_shows_it(
    sample: str, tmp_path: Path
) -> None:
    """DCMTK's presentation state renderer (dcmp2pgm) reads the GSPS and applies its grayscale
    pipeline (VOI, and INVERSE for a MONOCHROME1 source): the image looks as in the Secondary
    Capture (bone bright). dcmp2pgm draws no graphic annotations, so the boxes are not checked
    here (the SR's are, in OHIF: tests/viewer)."""
    view = load_view(SAMPLES / sample)
    box = Box(view.columns * 0.3, view.rows * 0.3, view.columns * 0.6, view.rows * 0.6, 0.9)
    written = write_results([ImageFinding(view, result(Decision.FRACTURE, 0.9, box))],
                            ALGORITHM, NODE, tmp_path / "out", presentation_states=True)
    rendered = tmp_path / "rendered.pgm"
    run = subprocess.run(
        ["/usr/bin/dcmp2pgm", "-p", str(written.presentation_states[0].path),
         str(SAMPLES / sample), str(rendered)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    import cv2

    shown = cv2.imread(str(rendered), cv2.IMREAD_UNCHANGED).astype(np.float64)
    capture = pydicom.dcmread(written.secondary_captures[0].path).pixel_array
    image = capture[capture.shape[0] - view.rows:].astype(np.float64)  # below the banner
    outside = np.ones(image.shape, dtype=bool)  # compare away from the burned-in box
    outside[int(box.y0) - 8: int(box.y1) + 8, int(box.x0) - 8: int(box.x1) + 8] = False
    correlation = np.corrcoef(shown[outside], image[outside])[0, 1]
    assert correlation > 0.95, correlation
