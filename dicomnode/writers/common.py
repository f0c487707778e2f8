"""What the result writers share: the records crossing their boundary, codes, and file output.

Coordinates: a :class:`inference.records.Box` ``(x0, y0, x1, y1)`` in source pixels uses the
same convention as DICOM 2-D pixel coordinates (PS3.3 C.18.6.1.1, C.10.5.1.2): ``(0, 0)`` is the
top-left corner of the top-left pixel and ``(Columns, Rows)`` the bottom-right corner of the
bottom-right pixel. Box corners are therefore written unchanged.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import highdicom as hd
import numpy as np
from pydicom.config import RAISE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM, validate_value

from dicomnode.pixels import View
from dicomnode.uids import DEFAULT_UID_PREFIX, ResultKind, derive_uid, image_result_uid, series_uid
from inference.records import AlgorithmInfo, Box, Decision, ImageResult
from inference.regions import Code as RegionCode

#: SNOMED CT 72704001 |Fracture (morphologic abnormality)|: the finding type.
FRACTURE = Code("72704001", "SCT", "Fracture")
#: Concept name of the qualitative evaluation (DCM 121052 "Presence of property").
PRESENCE = codes.DCM.PresenceOfProperty
#: Decision → coded value of the qualitative evaluation (SNOMED CT qualifier values).
DECISION_CODES: dict[Decision, Code] = {
    Decision.FRACTURE: codes.SCT.Present,  # 52101004
    Decision.POSSIBLE_FRACTURE: codes.SCT.Suspected,  # 415684004
    Decision.NO_FRACTURE: codes.SCT.Absent,  # 272519000
}
#: Concept name of the score measurement (DCM 122157 "Probability").
PROBABILITY = codes.DCM.Probability
#: UCUM unit of the score: a dimensionless probability in [0, 1].
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
#: Procedure reported in the SR (SNOMED CT 363680008 |Radiographic imaging procedure|).
RADIOGRAPHY = Code("363680008", "SCT", "Radiographic imaging procedure")

#: Human-readable wording of each decision (banner text, GSPS text, content descriptions).
DECISION_TEXT: dict[Decision, str] = {
    Decision.FRACTURE: "FRACTURE",
    Decision.POSSIBLE_FRACTURE: "POSSIBLE FRACTURE",
    Decision.NO_FRACTURE: "NO FRACTURE DETECTED",
}
DISCLAIMER = "AI result, for review by a physician"

SERIES_NUMBERS: dict[ResultKind, int] = {
    ResultKind.SR: 9901,
    ResultKind.SECONDARY_CAPTURE: 9902,
    ResultKind.PRESENTATION_STATE: 9903,
}
SERIES_DESCRIPTIONS: dict[ResultKind, str] = {
    ResultKind.SR: "AI fracture detection report (preliminary)",
    ResultKind.SECONDARY_CAPTURE: "AI fracture detection overlay (preliminary)",
    ResultKind.PRESENTATION_STATE: "AI fracture detection annotations (preliminary)",
}


@dataclass(frozen=True)
class NodeIdentity:
    """This node as equipment: written into every result object (Contributing Equipment,
    SR device observer, GSPS/SC equipment attributes). No patient data here."""

    manufacturer: str = "fracture-dicomnode project"
    model_name: str = "fracture-dicomnode"
    software_version: str = "0.1.0"
    station_name: str = "DICOMNODE"
    device_serial_number: str = "0"
    device_uid: str = ""
    institution_name: str | None = None
    uid_prefix: str = DEFAULT_UID_PREFIX

    def __post_init__(self) -> None:
        if not self.manufacturer or not self.model_name or not self.software_version:
            raise ValueError("NodeIdentity needs a manufacturer, model name and software version")
        if not self.device_uid:  # stable default: derived from model and station name
            uid = derive_uid("device", self.model_name, self.station_name, prefix=self.uid_prefix)
            object.__setattr__(self, "device_uid", str(uid))


@dataclass(frozen=True, eq=False)
class ImageFinding:
    """One analysed image: its decoded view, the ensemble's result and the finding site code
    (the region's SNOMED CT code, ``None`` when the region is unknown)."""

    view: View
    result: ImageResult
    finding_site: Code | hd.sr.CodedConcept | RegionCode | None = None

    @property
    def finding_site_code(self) -> Code | hd.sr.CodedConcept | None:
        """The finding site as a pydicom/highdicom code (a region's code is converted)."""
        site = self.finding_site
        if isinstance(site, RegionCode):
            return Code(site.value, site.scheme_designator, site.meaning)
        return site


@dataclass(frozen=True)
class PreviousReport:
    """Identifiers of an SR this node sent earlier for the same study (a predecessor)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str

    def as_reference(self) -> Dataset:
        """The minimal data set highdicom reads to fill the Predecessor Documents Sequence."""
        ref = Dataset()
        ref.StudyInstanceUID = self.study_instance_uid
        ref.SeriesInstanceUID = self.series_instance_uid
        ref.SOPInstanceUID = self.sop_instance_uid
        ref.SOPClassUID = self.sop_class_uid
        return ref


@dataclass(frozen=True)
class WrittenObject:
    """A result file on disk with the identifiers the sender and the state database need."""

    kind: ResultKind
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    source_sop_instance_uid: str | None


@dataclass(frozen=True)
class ResultObjects:
    """Everything written for one study: the SR, one SC per image, one GSPS per image; each kind
    only when asked for (``report`` is None and the tuples are empty otherwise)."""

    report: WrittenObject | None
    secondary_captures: tuple[WrittenObject, ...]
    presentation_states: tuple[WrittenObject, ...] = ()

    @property
    def all(self) -> tuple[WrittenObject, ...]:
        report = () if self.report is None else (self.report,)
        return (*report, *self.secondary_captures, *self.presentation_states)


#: Patient/study attributes highdicom copies into every result, with their value representation.
_COPIED_ATTRIBUTES = {
    "PatientName": "PN",
    "PatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "AccessionNumber": "SH",
    "StudyID": "SH",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "ReferringPhysicianName": "PN",
}
_PARSED = {"DA": DA, "TM": TM}


def invalid_header_attributes(header: Dataset) -> tuple[str, ...]:
    """Keywords of copied patient/study attributes whose values break their VR (names only, so
    they can be logged without patient data)."""
    invalid = []
    for keyword, vr in _COPIED_ATTRIBUTES.items():
        value = header.get(keyword)
        if value is None or value == "":
            continue
        try:
            validate_value(vr, value, RAISE)
            if vr in _PARSED:
                _PARSED[vr](value)
        except ValueError:
            invalid.append(keyword)
    if str(header.get("PatientSex", "") or "") not in ("", "M", "F", "O"):
        invalid.append("PatientSex")
    return tuple(dict.fromkeys(invalid))


def result_header(header: Dataset) -> Dataset:
    """The source header as copied into results: attributes with invalid values left empty.

    Real archives hold headers such as a hash in Patient's Birth Date or a 56-character
    Accession Number; highdicom refuses them and dciodvfy flags them. They are all Type 2 in the
    result IODs, so they are written empty ("unknown") instead; patient and study stay matched by
    Patient ID and Study Instance UID. The source header itself is not changed.
    """
    invalid = invalid_header_attributes(header)
    if not invalid:
        return header
    cleaned = copy.deepcopy(header)
    for keyword in invalid:
        setattr(cleaned, keyword, None)
    return cleaned


def study_uid_of(findings: tuple[ImageFinding, ...] | list[ImageFinding]) -> str:
    """The one Study Instance UID shared by all findings (ValueError if none or several)."""
    studies = {finding.view.study_instance_uid for finding in findings}
    if len(studies) != 1:
        raise ValueError(f"results must cover exactly one study, got {len(studies)}")
    return studies.pop()


def box_polyline(box: Box, view: View) -> np.ndarray:
    """Closed POLYLINE (first point repeated) of the box corners as (column, row) float32 pairs.

    Raises ValueError when the box is empty or not inside the image.
    """
    if not (0.0 <= box.x0 < box.x1 <= view.columns and 0.0 <= box.y0 < box.y1 <= view.rows):
        raise ValueError(
            f"box ({box.x0}, {box.y0}, {box.x1}, {box.y1}) is empty or outside the "
            f"{view.columns}x{view.rows} image"
        )
    corners = [(box.x0, box.y0), (box.x1, box.y0), (box.x1, box.y1), (box.x0, box.y1)]
    return np.array([*corners, corners[0]], dtype=np.float32)


def algorithm_identification(
    algorithm: AlgorithmInfo, result: ImageResult
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the operating point and the thresholds actually applied to this image."""
    t = result.thresholds
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"operating point: {algorithm.operating_point}",
            f"calibration group: {result.group}{' (fallback)' if result.group_fallback else ''}",
            f"threshold possible fracture: {t.sensitivity:.4f}",
            f"threshold fracture: {t.high_specificity:.4f}",
            f"thresholds calibrated: {'yes' if t.calibrated else 'no'}",
        ],
    )


def contributing_equipment(
    node: NodeIdentity, algorithm: AlgorithmInfo
) -> list[hd.ContributingEquipment]:
    """This node as Processing Equipment (DCM 109102, CID 7005) of the result object."""
    return [
        hd.ContributingEquipment(
            manufacturer=node.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=node.model_name,
            software_versions=[node.software_version, f"{algorithm.name} {algorithm.version}"],
            station_name=node.station_name,
            institution_name=node.institution_name,
            contribution_description=f"{DISCLAIMER}: fracture detection by {algorithm.name}",
        )
    ]


class ResultIdentity(TypedDict):
    """The series, instance and equipment attributes every result object carries, as the keyword
    arguments that highdicom's SR, SC and GSPS constructors share (typed, so mypy checks each
    one against the constructor it is passed to)."""

    series_instance_uid: str
    series_number: int
    series_description: str
    sop_instance_uid: str
    instance_number: int
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    institution_name: str | None
    contributing_equipment: list[hd.ContributingEquipment]


def result_identity(
    kind: ResultKind,
    study_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
) -> ResultIdentity:
    """Identity of one result object of ``kind`` in ``study_uid``: the kind's series (UID derived
    from study, kind and model version), the given instance, and this node as equipment."""
    return ResultIdentity(
        series_instance_uid=series_uid(kind, study_uid, algorithm.version, node.uid_prefix),
        series_number=SERIES_NUMBERS[kind],
        series_description=SERIES_DESCRIPTIONS[kind],
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=node.manufacturer,
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        device_serial_number=node.device_serial_number,
        institution_name=node.institution_name,
        contributing_equipment=contributing_equipment(node, algorithm),
    )


def image_result_identity(
    kind: ResultKind,
    finding: ImageFinding,
    instance_number: int,
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
) -> ResultIdentity:
    """Identity of the per-image result (SC or GSPS) of ``finding``: its UID follows the source
    image's identity (SOP Instance UID and bytes) and the model version."""
    view = finding.view
    uid = image_result_uid(kind, view.source, algorithm.version, node.uid_prefix)
    return result_identity(kind, view.study_instance_uid, uid, instance_number, algorithm, node)


def mark_series_laterality_unknown(dataset: Dataset) -> None:
    """Give the result series an empty (unknown) Laterality, Type 2C in General Series.

    One result series holds the results of every image of the study, which may show both
    sides, so no single series laterality is true; the image-level laterality stays with the
    source images. (dciodvfy warns that empty means unknown, which is the case.)
    """
    dataset.Laterality = None


def banner_lines(result: ImageResult) -> tuple[str, str]:
    """Two ASCII lines: decision with score, and the disclaimer."""
    return (f"{DECISION_TEXT[result.decision]}  (score {result.score:.2f})", DISCLAIMER)


def save(dataset: Dataset, out_dir: Path) -> Path:
    """Write ``dataset`` to ``out_dir/<SOPInstanceUID>.dcm`` atomically (temp file, fsync, rename).

    The name comes from the (deterministic) SOP Instance UID, so rewriting the same result
    replaces the file instead of adding a second one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{dataset.SOPInstanceUID}.dcm"
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as handle:
            dataset.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def written(
    kind: ResultKind, dataset: Dataset, path: Path, source_sop_instance_uid: str | None
) -> WrittenObject:
    """The :class:`WrittenObject` record of a saved result data set."""
    return WrittenObject(
        kind=kind,
        path=path,
        sop_class_uid=str(dataset.SOPClassUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        source_sop_instance_uid=source_sop_instance_uid,
    )
