"""What the result writers share: the records crossing their boundary, codes, and file output.

Coordinates: a :class:`inference.records.Box` ``(x0, y0, x1, y1)`` in source pixels uses the
same convention as DICOM 2-D pixel coordinates (PS3.3 C.18.6.1.1, C.10.5.1.2): ``(0, 0)`` is the
top-left corner of the top-left pixel and ``(Columns, Rows)`` the bottom-right corner of the
bottom-right pixel. Box corners are therefore written unchanged.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict

import highdicom as hd
import numpy as np
from highdicom.valuerep import _check_specific_character_set
from pydicom.charset import convert_encodings, encode_string, python_encoding
from pydicom.config import RAISE
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLossless
from pydicom.valuerep import DA, TM, validate_value

from dicomnode.pixels import View
from dicomnode.uids import (
    DEFAULT_UID_PREFIX,
    ResultKind,
    SourceIdentity,
    derive_uid,
    image_result_uid,
    series_uid,
)
from inference.records import AlgorithmInfo, Box, Decision, ImageResult
from inference.regions import Code as RegionCode
from inference.regions import canonical_body_part, is_paired_body_part

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
#: Concept name of the image's score (DCM 122157 "Probability"): the ensemble's probability that
#: the image shows a fracture.
PROBABILITY = codes.DCM.Probability
#: Concept name of a box's score (DCM 111012 "Certainty of Finding", with the derivation
#: "Maximum"): the peak of the averaged per-pixel fracture probability map inside the box, a
#: different quantity from the image's probability.
BOX_CERTAINTY = codes.DCM.CertaintyOfFinding
MAXIMUM = codes.SCT.Maximum
#: UCUM unit of both: dimensionless, in [0, 1] (UCUM "1", the unity).
PROBABILITY_UNIT = Code("1", "UCUM", "no units")
#: Qualitative evaluation of an image or study that got no fracture decision.
UNDETERMINED = codes.SCT.Undetermined
#: Procedure reported in the SR (SNOMED CT 363680008 |Radiographic imaging procedure|).
RADIOGRAPHY = Code("363680008", "SCT", "Radiographic imaging procedure")


class Conclusion(StrEnum):
    """The study-level answer at the top of the results."""

    PRESENT = "fracture present"
    SUSPECTED = "fracture suspected"
    ABSENT = "no fracture detected"
    NOT_ANALYSED = "not analysed"


#: Conclusion → coded value of the study's "Fracture" evaluation.
CONCLUSION_CODES: dict[Conclusion, Code] = {
    Conclusion.PRESENT: codes.SCT.Present,
    Conclusion.SUSPECTED: codes.SCT.Suspected,
    Conclusion.ABSENT: codes.SCT.Absent,
    Conclusion.NOT_ANALYSED: UNDETERMINED,
}

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
    ResultKind.REJECTION_NOTE: 9904,
}
SERIES_DESCRIPTIONS: dict[ResultKind, str] = {
    ResultKind.SR: "AI fracture detection report (preliminary)",
    ResultKind.SECONDARY_CAPTURE: "AI fracture detection overlay (preliminary)",
    ResultKind.PRESENTATION_STATE: "AI fracture detection annotations (preliminary)",
    ResultKind.REJECTION_NOTE: "AI fracture detection: superseded results withdrawn",
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
    region_name: str | None = None
    """The region's display name (summary text), None when unknown."""

    @property
    def finding_site_code(self) -> Code | hd.sr.CodedConcept | None:
        """The finding site as a pydicom/highdicom code (a region's code is converted)."""
        site = self.finding_site
        if isinstance(site, RegionCode):
            return Code(site.value, site.scheme_designator, site.meaning)
        return site


_NOT_PRINTABLE_ASCII = re.compile("[^\x20-\x7e]")


def printable_ascii(text: str) -> str:
    """``text`` with every character outside printable ASCII (controls, C1, non-ASCII)
    replaced by "?"."""
    return _NOT_PRINTABLE_ASCII.sub("?", text)


@dataclass(frozen=True, eq=False)
class NotAnalysedImage:
    """An instance of the study that got no fracture decision, and why.

    ``reason`` is in words a radiologist understands ("outside the intended use (chest)",
    "the image could not be decoded") and carries no patient data. ``header`` is the source
    header without pixel data; ``pixels`` the display pixels where the image decoded (its
    Secondary Capture then shows the image under the "not analysed" banner), else None.

    A reason may quote a header value or a decoder's message (the Modality of "outside the
    intended use (XX images)"); every character outside printable ASCII in it becomes "?"
    (:func:`printable_ascii`), so the SR's text values, the summary and the banner stay valid
    whatever the source held (a Modality of random bytes put a TAB and a NUL into the SR's UT
    values: fuzz case 20261204:878)."""

    header: Dataset
    source: SourceIdentity
    reason: str
    pixels: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", printable_ascii(self.reason))

    @property
    def sop_instance_uid(self) -> str:
        return self.source.sop_instance_uid

    @property
    def study_instance_uid(self) -> str:
        return str(self.header.StudyInstanceUID)


@dataclass(frozen=True)
class StudySummary:
    """The report-level answer: the conclusion, what it rests on, and what was not analysed."""

    conclusion: Conclusion
    analysed: int
    positive_images: int
    findings: int
    regions: tuple[str, ...]
    not_analysed: int
    reasons: tuple[str, ...]

    @classmethod
    def of(
        cls, findings: Sequence[ImageFinding], not_analysed: Sequence[NotAnalysedImage]
    ) -> StudySummary:
        decisions = [f.result.decision for f in findings]
        positive = [f for f in findings if f.result.decision is not Decision.NO_FRACTURE]
        if Decision.FRACTURE in decisions:
            conclusion = Conclusion.PRESENT
        elif Decision.POSSIBLE_FRACTURE in decisions:
            conclusion = Conclusion.SUSPECTED
        elif findings:
            conclusion = Conclusion.ABSENT
        else:
            conclusion = Conclusion.NOT_ANALYSED
        regions = tuple(
            dict.fromkeys(
                f.region_name for f in (positive or findings) if f.region_name is not None
            )
        )
        return cls(
            conclusion=conclusion,
            analysed=len(findings),
            positive_images=len(positive),
            findings=sum(len(f.result.boxes) for f in positive),
            regions=regions,
            not_analysed=len(not_analysed),
            reasons=tuple(dict.fromkeys(n.reason for n in not_analysed)),
        )

    def headline(self) -> str:
        """One ASCII line for the top of every Secondary Capture banner."""
        return f"STUDY: {self._conclusion(upper=True)}"

    def text(self) -> str:
        """The study's impression in a sentence or two (the SR's summary)."""
        parts = [f"{self._conclusion(upper=False)}."]
        if self.not_analysed and self.analysed:
            parts.append(f"{_images(self.not_analysed)} not analysed: {'; '.join(self.reasons)}.")
        parts.append(f"{DISCLAIMER}.")
        return " ".join(part[0].upper() + part[1:] for part in parts)

    def _conclusion(self, *, upper: bool) -> str:
        name = self.conclusion.value.upper() if upper else self.conclusion.value
        if self.conclusion is Conclusion.NOT_ANALYSED:
            return f"{name} - {'; '.join(self.reasons)}"
        where = f", {', '.join(self.regions)}" if self.regions else ""
        if self.conclusion is Conclusion.ABSENT:
            return f"{name} ({_images(self.analysed)}{where})"
        return (
            f"{name} ({_count(self.findings, 'finding')} in {self.positive_images} of "
            f"{_images(self.analysed)}{where})"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _images(n: int) -> str:
    return _count(n, "image")


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
    """Everything written for one study: the SR, one SC per image, one GSPS per analysed image;
    each kind only when asked for (``report`` is None and the tuples are empty otherwise); and
    the rejection note withdrawing superseded results, if any (sent last: after the results
    that replace what it withdraws)."""

    report: WrittenObject | None
    secondary_captures: tuple[WrittenObject, ...]
    presentation_states: tuple[WrittenObject, ...] = ()
    rejection_note: WrittenObject | None = None

    @property
    def all(self) -> tuple[WrittenObject, ...]:
        report = () if self.report is None else (self.report,)
        note = () if self.rejection_note is None else (self.rejection_note,)
        return (*report, *self.secondary_captures, *self.presentation_states, *note)


#: Patient, study and patient-study attributes every result object copies from its sources (all
#: in modules every result IOD has), so that an archive that matches patients by ID + issuer
#: files the results with their images.
CONTEXT_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)
#: Context attributes of Type 2 in the result IODs: left empty (unknown) when invalid.
_TYPE_2 = frozenset(
    (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    )
)
def _date(value: object) -> None:
    """Raise unless ``value`` is a date pydicom reads with a year from 1000 to 2999: dciodvfy
    refuses other years, and one there is a damaged value (fuzz case 20261208:842: a Study Date
    of 40261204)."""
    year = DA(value).year
    if not 1000 <= year <= 2999:
        raise ValueError(f"year {year} out of range")


_PARSED: dict[str, Callable[[Any], object]] = {"DA": _date, "TM": TM, "DS": float, "IS": int}
_SKIPPED_GROUPS = (0x0002,)
#: The identifying UIDs: the listener stored the instance only if they are usable (VR UI, a UID
#: it can file), so they are never left out (leading zeros in a component, which pydicom's
#: check rejects, occur in real devices' UIDs).
_IDENTIFYING = frozenset(("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))
MAX_SEQUENCE_DEPTH = 16
"""Sequences nested deeper than this are left out of results (real headers nest a few levels;
pydicom's writer needs minutes for a few hundred and fails beyond)."""
#: Items of the copied context sequences must hold these (Type 1 in their macros), else dciodvfy
#: rejects the result object.
_REQUIRED_IN_ITEMS = {
    "OtherPatientIDsSequence": ("PatientID", "TypeOfPatientID"),
}
UTF8 = "ISO_IR 192"


def _name(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or str(tag)


def _wrong_vr_or_vm(element: DataElement) -> bool:
    """Whether a public element is encoded with a VR its tag does not have, or holds a number
    of values its (fixed) multiplicity does not allow; both break the result objects."""
    try:
        allowed_vr, vm = dictionary_VR(element.tag), dictionary_VM(element.tag)
    except KeyError:  # not in pydicom's dictionary: nothing to compare with
        return False
    if element.VR not in (allowed_vr, *allowed_vr.split(" or ")):
        return True
    return element.VR != "SQ" and vm.isdigit() and element.VM not in (0, int(vm))


def _invalid(element: DataElement, depth: int = 0) -> bool:
    """Whether an element's value breaks its VR (or cannot even be read)."""
    try:
        if _wrong_vr_or_vm(element):
            return True
        if element.VR == "SQ":
            return depth >= MAX_SEQUENCE_DEPTH or any(
                invalid_keywords(item, depth + 1) or _incomplete(element.keyword, item)
                for item in element.value
            )
        value = element.value
        if value is None or value == "":
            return False
        for item in value if isinstance(value, MultiValue | list | tuple) else [value]:
            if item is None or item == "":
                continue
            # pydicom's validation refuses its own DS and IS objects ("a value of type 'IS'
            # cannot be assigned..."): their text is what was read and is checked
            validate_value(element.VR, str(item) if element.VR in ("DS", "IS") else item, RAISE)
            if element.VR in _PARSED:
                _PARSED[element.VR](item)
        if element.VR == "CS" and element.keyword == "PatientSex":
            return str(value) not in ("", "M", "F", "O")
        controls = _TEXT_CONTROLS if element.VR in ("ST", "LT", "UT") else _CONTROLS
        return element.VR in _TEXT_VRS and controls.search(str(value)) is not None

    except Exception:  # any failure to read or check the value makes it invalid
        return True


def _incomplete(keyword: str, item: Dataset) -> bool:
    return any(not item.get(name) for name in _REQUIRED_IN_ITEMS.get(keyword, ()))


def invalid_keywords(header: Dataset, depth: int = 0) -> tuple[str, ...]:
    """Names (keywords, else tags) of the elements of ``header`` whose values break their VR,
    their tag's VR or multiplicity, or cannot be read at all, including elements inside
    sequences (reported by the sequence's name; a sequence nested deeper than
    :data:`MAX_SEQUENCE_DEPTH` counts as invalid). Names only, so they can be logged without
    patient data."""
    names = []
    for tag in list(header.keys()):  # tags: iterating a Dataset parses every element
        if tag.group in _SKIPPED_GROUPS or tag.is_private:
            continue
        try:
            bad = _invalid(header[tag], depth)
        except Exception:  # the value cannot be parsed (wrong length for its VR, unknown VR...)
            bad = True
        if bad:
            names.append(_name(tag))
    return tuple(dict.fromkeys(names))


def invalid_header_attributes(header: Dataset) -> tuple[str, ...]:
    """The context attributes (copied into results) among :func:`invalid_keywords`."""
    return tuple(k for k in invalid_keywords(header) if k in CONTEXT_ATTRIBUTES)


def usable_character_set(header: Dataset) -> bool:
    """Whether the Specific Character Set (absent: the default repertoire) is one the result
    objects can declare (defined terms, code extensions only with several values, no empty
    first value: highdicom refuses those) and can encode every text value of the header in."""
    terms = [str(v) for v in _values(header.get("SpecificCharacterSet"))]
    if "SpecificCharacterSet" in header and not terms:
        return False  # present but empty: highdicom refuses it
    if terms:
        try:
            _check_specific_character_set(terms if len(terms) > 1 else terms[0])
        except (ValueError, TypeError):
            return False
        if not all(terms):
            return False
    return _encodable(header, _codec(terms))


def _codec(terms: list[str]) -> str | None:
    """The Python codec of the character set ``terms``: None where it has code extensions
    (several terms), for which only ASCII is taken as certain."""
    if len(terms) > 1:
        return None
    return "ascii" if terms in ([], ["ISO_IR 6"]) else python_encoding.get(terms[0])


_TEXT_VRS = frozenset(("SH", "LO", "ST", "LT", "UT", "UC", "PN"))
#: Control characters text values must not hold (PS3.5 6.2: none but ESC, and LF, FF and CR in
#: ST, LT and UT): pydicom's check lets them pass, dciodvfy does not. C1 controls (a source byte
#: 0x80-0x9F read as Latin-1 becomes one) are in no DICOM character repertoire.
_CONTROLS = re.compile("[\x00-\x1a\x1c-\x1f\x7f-\x9f]")
_TEXT_CONTROLS = re.compile("[\x00-\x09\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f]")


def _encodable(header: Dataset, codec: str | None, depth: int = 0) -> bool:
    """Whether every text value (in sequences too) is ASCII or encodes in ``codec`` (None: a
    character set with code extensions, for which only ASCII is taken as certain)."""
    for tag in list(header.keys()):
        try:
            element = header[tag]
        except Exception:  # unreadable: left out by result_header anyway
            continue
        if element.VR == "SQ" and depth < MAX_SEQUENCE_DEPTH:
            if not all(_encodable(item, codec, depth + 1) for item in element.value or []):
                return False
        elif element.VR in _TEXT_VRS:
            for value in _values(element.value):
                text = str(value)
                if not text.isascii() and (codec is None or not _encodes(text, codec)):
                    return False
    return True


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True


def result_header(header: Dataset) -> Dataset:
    """The source header as the writers read it: every element whose value breaks its VR left
    out, or left empty where the result IODs need it (Type 2); Type 2 context attributes the
    source lacks added empty; an unusable Specific Character Set replaced by UTF-8 (the values
    are already decoded text).

    Real archives hold headers such as a hash in Patient's Birth Date, a 56-character Accession
    Number or "abc" in Patient's Weight; highdicom refuses such values, dciodvfy flags them, and
    a malformed number in a descriptor (Imager Pixel Spacing) can fail a writer. None of it is a
    reason to give the radiologist no result: the value is dropped (its name is logged by the
    worker), patient and study stay matched by Patient ID and Study Instance UID. The source
    header itself is not changed.
    """
    charset_ok = usable_character_set(header)
    terms = [str(v) for v in _values(header.get("SpecificCharacterSet"))] if charset_ok else []
    invalid = set(invalid_keywords(header)) | set(too_long_when_encoded(header, terms or [UTF8]))
    invalid -= _IDENTIFYING
    missing = [name for name in _TYPE_2 if name not in header]
    if not invalid and not missing and charset_ok:
        return header
    cleaned = Dataset()
    if hasattr(header, "file_meta"):
        cleaned.file_meta = copy.deepcopy(header.file_meta)
    for tag in list(header.keys()):  # tags: iterating a Dataset parses every element
        name = _name(tag)
        if name in invalid:
            if name in _TYPE_2:
                setattr(cleaned, name, None)
            continue
        try:
            cleaned[tag] = copy.deepcopy(header[tag])
        except Exception:  # an unreadable private element: not needed by any writer
            continue
    for name in missing:
        setattr(cleaned, name, None)
    if not charset_ok:
        cleaned.SpecificCharacterSet = UTF8
    return cleaned


def copy_context(source: Dataset, target: Dataset) -> None:
    """Copy the :data:`CONTEXT_ATTRIBUTES` ``source`` (a :func:`result_header`) holds into
    ``target`` (a result object highdicom built), beyond those highdicom copies itself."""
    for keyword in CONTEXT_ATTRIBUTES:
        if keyword in source:
            setattr(target, keyword, copy.deepcopy(source[keyword].value))


#: Compressed transfer syntaxes that keep every pixel value (RLE, JPEG lossless, JPEG-LS
#: lossless, JPEG 2000 lossless and HTJ2K lossless); JPEG-LS near-lossless is lossy.
LOSSLESS = frozenset(
    (
        RLELossless,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        JPEG2000MCLossless,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
    )
)


def lossy_compression(header: Dataset) -> str | None:
    """``"01"`` when the source was ever lossy compressed (its Lossy Image Compression says so,
    or its transfer syntax is lossy): every object derived from its pixels must say so too."""
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    lossy_syntax = syntax is not None and UID(syntax).is_compressed and syntax not in LOSSLESS
    if str(header.get("LossyImageCompression", "")) == "01" or lossy_syntax:
        return "01"
    return None


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


_EQUIPMENT = (
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "DeviceSerialNumber",
    "InstitutionName",
    "SoftwareVersions",
)


def _equipment_fits(header: Dataset, terms: list[str]) -> bool:
    """Whether the acquisition equipment of ``header`` encodes, within its VRs' lengths, in the
    character set ``terms`` of the result object."""
    equipment = Dataset()
    for keyword in _EQUIPMENT:
        if keyword in header:
            equipment[keyword] = copy.deepcopy(header[keyword])
    return _encodable(equipment, _codec(terms)) and not too_long_when_encoded(
        equipment, terms or [UTF8]
    )


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
    node: NodeIdentity, algorithm: AlgorithmInfo, sources: Sequence[Dataset] = ()
) -> list[hd.ContributingEquipment]:
    """This node as Processing Equipment (DCM 109102, CID 7005) of the result object, after the
    equipment that acquired its sources as Acquisition Equipment (DCM 109101), so the result
    keeps the General Equipment context of the images it describes.

    The result declares the character set of its first source; the equipment of another source
    whose text that character set cannot encode, or encodes longer than its VR allows, is left
    out (fuzz cases 20261206:228 and :484: a study of three sources, Latin-1 and UTF-8 names in
    the equipment of the second and third, an SR in the default repertoire)."""
    acquisition = []
    seen: set[tuple[str, ...]] = set()
    terms = [str(v) for v in _values(sources[0].get("SpecificCharacterSet"))] if sources else []
    for header in sources:
        if not _equipment_fits(header, terms):
            continue
        manufacturer = str(header.get("Manufacturer", "") or "")
        key = tuple(
            str(header.get(k, "") or "")
            for k in (
                "Manufacturer",
                "ManufacturerModelName",
                "StationName",
                "DeviceSerialNumber",
                "InstitutionName",
            )
        )
        if not manufacturer or key in seen:
            continue
        seen.add(key)
        acquisition.append(
            hd.ContributingEquipment(
                manufacturer=manufacturer,
                purpose_of_reference=codes.DCM.AcquisitionEquipment,
                manufacturer_model_name=key[1] or None,
                station_name=key[2] or None,
                device_serial_number=key[3] or None,
                institution_name=key[4] or None,
                software_versions=[str(v) for v in _values(header.get("SoftwareVersions"))] or None,
            )
        )
    return [
        *acquisition,
        hd.ContributingEquipment(
            manufacturer=node.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=node.model_name,
            software_versions=[node.software_version, f"{algorithm.name} {algorithm.version}"],
            device_serial_number=node.device_serial_number,
            station_name=node.station_name,
            institution_name=node.institution_name,
            contribution_description=f"{DISCLAIMER}: fracture detection by {algorithm.name}",
        ),
    ]


#: The longest value of a text VR in bytes (PS3.5 Table 6.2-1; a PN component group for PN).
_MAX_BYTES = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240}


def too_long_when_encoded(header: Dataset, terms: Sequence[str]) -> tuple[str, ...]:
    """Names of the top-level text elements of ``header`` whose values, encoded in the
    character set ``terms`` the results declare, are longer than their VR allows.

    pydicom's check counts characters; a value of 15 characters within the limit of SH can
    need 23 bytes in UTF-8 or with ISO 2022 escape sequences, which dciodvfy rejects (fuzz case
    20261204:2922: "Gonçalves^Zoë" read as JIS X 0201 in an Accession Number); and it does not
    check the length of a PN at all (129 characters of Patient's Name: case 20261206:3146)."""
    try:
        encodings = convert_encodings(list(terms))
    except Exception:  # an unknown term: usable_character_set has refused it already
        encodings = ["utf_8"]
    names = []
    for tag in list(header.keys()):
        try:
            element = header[tag]
            limit = _MAX_BYTES.get(str(element.VR))
            if limit is None or tag.group in _SKIPPED_GROUPS or tag.is_private:
                continue
            for value in _values(element.value):
                text = str(value)
                groups = text.split("=") if element.VR == "PN" else [text]
                if any(len(encode_string(g, encodings)) > limit for g in groups):
                    names.append(_name(tag))
                    break
        except Exception:  # unreadable or not encodable: invalid_keywords reports it
            continue
    return tuple(names)


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


class ResultContext(TypedDict):
    """What every per-image object of a study's result set shares: the study summary (its
    banner), the result version (Instance Numbers) and the series context."""

    summary: StudySummary
    version: int
    context: Mapping[str, str]


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
    sources: Sequence[Dataset] = (),
) -> ResultIdentity:
    """Identity of one result object of ``kind`` in ``study_uid``: the kind's series (UID derived
    from study, kind and model version), the given instance, and this node as equipment (after
    the equipment that acquired ``sources``)."""
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
        contributing_equipment=contributing_equipment(node, algorithm, sources),
    )


def image_result_identity(
    kind: ResultKind,
    source: SourceIdentity,
    header: Dataset,
    instance_number: int,
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    *,
    analysed: bool = True,
    summary: StudySummary | None = None,
) -> ResultIdentity:
    """Identity of the per-image result (SC or GSPS) of one source image: its UID follows the
    source's identity (SOP Instance UID and bytes), the model version, whether the image was
    analysed (a "not analysed" capture never shares a UID with a result) and the study summary
    it shows."""
    uid = image_result_uid(
        kind,
        source,
        algorithm.version,
        node.uid_prefix,
        analysed=analysed,
        study_summary="" if summary is None else summary.headline(),
    )
    study = str(header.StudyInstanceUID)
    return result_identity(kind, study, uid, instance_number, algorithm, node, [header])


def instance_number(version: int, index: int) -> int:
    """Instance Number of the ``index``-th (1-based) object of a kind in the study's
    ``version``-th result set: later versions always number higher, so a viewer that shows
    "the latest" by Instance Number shows the current result."""
    if version < 1 or not 1 <= index < VERSION_STRIDE:
        raise ValueError(f"version must be >= 1 and index in 1..{VERSION_STRIDE - 1}")
    return version * VERSION_STRIDE + index


VERSION_STRIDE = 10_000
"""Instance Numbers of one result version: version * 10,000 + index (IS holds 2**31 - 1)."""


def series_context(headers: Sequence[Dataset]) -> dict[str, str]:
    """Series-level attributes of the sources' own series that hold for a whole result series:
    Body Part Examined (as the Annex L term of the anatomy it names, see
    :func:`inference.regions.canonical_body_part`) and Laterality (R or L) where every source
    agrees: a study of both wrists gets no Laterality, one of a hand and a knee no Body Part
    Examined."""
    parts = {canonical_body_part(str(h.get("BodyPartExamined", "") or "")) for h in headers}
    sides = {str(h.get("Laterality", "") or "").strip().upper() for h in headers}
    context = {}
    if len(parts) == 1 and (part := parts.pop()):
        context["BodyPartExamined"] = part
    if len(sides) == 1 and (side := sides.pop()) in ("R", "L"):
        context["Laterality"] = side
    return context


def set_series_context(dataset: Dataset, context: Mapping[str, str]) -> None:
    """Body Part Examined and Laterality of the result series (:func:`series_context`).

    Laterality is Type 2C in General Series (required for a paired body part): written where
    the sources agree on it, left empty (unknown) where they do not and the part is paired or
    not known, and left out for an unpaired part (chest, pelvis). (dciodvfy warns that empty
    means unknown, which is the case.)"""
    part = context.get("BodyPartExamined")
    if part is not None:
        dataset.BodyPartExamined = part
    if part is None or is_paired_body_part(part):
        dataset.Laterality = context.get("Laterality")
    elif "Laterality" in dataset:
        del dataset.Laterality


def banner_lines(result: ImageResult, summary: StudySummary) -> tuple[str, str, str]:
    """Three ASCII lines: the study's conclusion, this image's decision with its score, and the
    disclaimer."""
    return (
        summary.headline(),
        f"THIS IMAGE: {DECISION_TEXT[result.decision]}  (score {result.score:.2f})",
        DISCLAIMER,
    )


def not_analysed_lines(image: NotAnalysedImage, summary: StudySummary) -> tuple[str, str, str]:
    """The banner of a Secondary Capture of an image that got no decision."""
    return (summary.headline(), f"THIS IMAGE: NOT ANALYSED - {image.reason}", DISCLAIMER)


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
