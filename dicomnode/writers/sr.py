"""Comprehensive 3D SR, TID 1500 Measurement Report: the study's machine-readable AI result.

Content, in TID 1500 order:

* observation context (this installation as the device observer), procedure reported;
* the **Image Library** (TID 1600) with every source image: modality, rows and columns, and the
  TID 1603 projection radiography descriptors (patient orientation, imager pixel spacing) where
  the source holds valid ones;
* **Imaging Measurements**: per analysed image one TID 1410 group whose region is the whole
  image (a closed POLYLINE along its border: the image-level assessment, finding Fracture,
  presence present / suspected / absent from the decision, the image's probability (DCM 122157
  "Probability", unit UCUM ``1``), the finding site and the algorithm with its operating point
  (TID 4019)), and per box one TID 1410 group whose region is the box, a closed POLYLINE on the
  source image, measured by the peak of the probability map inside it (DCM 111012 "Certainty of
  Finding", derivation "Maximum", unit ``1``: another quantity than the image's probability).
  Per image that got no decision, a whole-image group whose presence is "Undetermined", with a
  "Comment" saying why ("Not analysed: outside the intended use (chest)").
  The image-level groups carry an image region (rather than being TID 1501 groups without one)
  so that viewers that draw SR measurements, OHIF among them, can open the report: OHIF 3.13
  fails on a group without an image region (``tests/viewer/README.md``);
* **Qualitative Evaluations** (TID 1500 row 12): the study's summary, "Fracture" present /
  suspected / absent / undetermined, and an "Impression" in words (findings, images, regions,
  what was not analysed and why, the disclaimer).

The document is PRELIMINARY, PARTIAL and UNVERIFIED: an AI result, not a physician's report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    FindingSite,
    ImageContentItem,
    ImageRegion,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.uids import ResultKind, report_uid, tracking_uid
from dicomnode.writers.common import (
    BOX_CERTAINTY,
    CONCLUSION_CODES,
    DECISION_CODES,
    FRACTURE,
    MAXIMUM,
    PRESENCE,
    PROBABILITY,
    PROBABILITY_UNIT,
    RADIOGRAPHY,
    UNDETERMINED,
    ImageFinding,
    NodeIdentity,
    NotAnalysedImage,
    PreviousReport,
    StudySummary,
    algorithm_identification,
    box_polyline,
    copy_context,
    instance_number,
    result_header,
    result_identity,
)
from inference.records import AlgorithmInfo

Group = MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations

#: UMLS C0034375 "Qualitative Evaluations": the report-level container of TID 1500 row 12.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_PIXELS = Code("{pixels}", "UCUM", "Pixels")
_PROJECTION = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def build_report(
    findings: Sequence[ImageFinding],
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    previous: PreviousReport | None = None,
    *,
    not_analysed: Sequence[NotAnalysedImage] = (),
    version: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """The study's TID 1500 measurement report (not yet written to disk); ``version`` is the
    study's result generation (Instance Number ``version * 10000 + 1``)."""
    findings, not_analysed = tuple(findings), tuple(not_analysed)
    headers = [result_header(f.view.header) for f in findings]
    headers += [result_header(n.header) for n in not_analysed]
    if not headers:
        raise ValueError("a report needs at least one source image")
    studies = {str(h.StudyInstanceUID) for h in headers}
    if len(studies) != 1:
        raise ValueError(f"results must cover exactly one study, got {len(studies)}")
    study_uid = studies.pop()
    groups: list[Group] = []
    for number, finding in enumerate(findings, start=1):
        groups.extend(_image_groups(number, finding, algorithm, node))
    for number, image in enumerate(not_analysed, start=len(findings) + 1):
        groups.append(_not_analysed_group(number, image, algorithm, node))
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=node.device_uid,
            name=node.station_name,
            manufacturer_name=node.manufacturer,
            model_name=f"{node.model_name} / {algorithm.name} {algorithm.version}",
            serial_number=node.device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=RADIOGRAPHY,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    _insert_library(report, headers)
    report[0].ContentSequence.append(_summary(StudySummary.of(findings, not_analysed)))
    uid = report_uid(
        study_uid,
        [finding.view.source for finding in findings],
        algorithm.version,
        node.uid_prefix,
        predecessor=None if previous is None else previous.sop_instance_uid,
        not_analysed=[image.source for image in not_analysed],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report,
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=None if previous is None else [previous.as_reference()],
        **result_identity(
            ResultKind.SR, study_uid, uid, instance_number(version, 1), algorithm, node, headers
        ),
    )
    copy_context(headers[0], sr)
    return sr


def _summary(summary: StudySummary) -> ContainerContentItem:
    """TID 1500 row 12: the study's conclusion, coded and in words."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence(
        [
            CodeContentItem(
                name=FRACTURE,
                value=CONCLUSION_CODES[summary.conclusion],
                relationship_type=RelationshipTypeValues.CONTAINS,
            ),
            TextContentItem(
                name=codes.DCM.Impression,
                value=summary.text(),
                relationship_type=RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    return container


def _insert_library(report: hd.sr.MeasurementReport, headers: Sequence[Dataset]) -> None:
    """Put the Image Library (TID 1600) before the Imaging Measurements container (TID 1500
    row 5), with one entry per source image."""
    content = report[0].ContentSequence
    position = next(
        i
        for i, item in enumerate(content)
        if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value
    )
    content.insert(position, image_library(headers))


def image_library(headers: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600 with one group of every source image, each described by what its header holds
    validly: modality, rows and columns always; patient orientation and imager pixel spacing
    (TID 1603) only where present and well formed (many CR headers lack them; nothing is
    guessed)."""
    group = ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = ContentSequence([_library_entry(h) for h in headers])
    library = ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = ContentSequence([group])
    return library


def _library_entry(header: Dataset) -> ImageContentItem:
    entry = ImageContentItem(
        name=codes.SCT.Source,
        referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=header.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    context = RelationshipTypeValues.HAS_ACQ_CONTEXT
    modality = str(header.get("Modality", "") or "")
    descriptors: list[hd.sr.ContentItem] = []
    if modality:
        descriptors.append(
            CodeContentItem(
                name=codes.DCM.Modality,
                value=Code(modality, "DCM", modality),
                relationship_type=context,
            )
        )
    for name, keyword in (
        (codes.DCM.PixelDataRows, "Rows"),
        (codes.DCM.PixelDataColumns, "Columns"),
    ):
        size = _positive(header.get(keyword))
        if size is not None:
            descriptors.append(
                NumContentItem(name=name, value=size, unit=_PIXELS, relationship_type=context)
            )
    orientation = [str(v) for v in header.get("PatientOrientation", None) or []]
    if modality in _PROJECTION and len(orientation) == 2 and all(orientation):
        for name, value in zip(
            (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn),
            orientation,
            strict=True,
        ):
            descriptors.append(TextContentItem(name=name, value=value, relationship_type=context))
    spacing = _spacing(header.get("ImagerPixelSpacing", None))
    if modality in _PROJECTION and spacing is not None:
        for name, millimetres in (
            (codes.DCM.HorizontalPixelSpacing, spacing[1]),
            (codes.DCM.VerticalPixelSpacing, spacing[0]),
        ):
            descriptors.append(
                NumContentItem(
                    name=name,
                    value=millimetres,
                    unit=codes.UCUM.Millimeter,
                    relationship_type=context,
                )
            )
    entry.ContentSequence = ContentSequence(descriptors)
    return entry


def _image_groups(
    number: int, finding: ImageFinding, algorithm: AlgorithmInfo, node: NodeIdentity
) -> list[Group]:
    """The image-level group of one image followed by one planar ROI group per box."""
    view, result = finding.view, finding.result
    header = result_header(view.header)
    algorithm_id = algorithm_identification(algorithm, result)
    site = finding.finding_site_code
    sites = [] if site is None else [FindingSite(site)]
    evaluation = [QualitativeEvaluation(PRESENCE, DECISION_CODES[result.decision])]
    image_group: Group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(view.source, algorithm.version, 0, node.uid_prefix),
            identifier=f"image {number} fracture assessment (whole image)",
        ),
        referenced_region=_whole_image(header, view.rows, view.columns),
        finding_type=FRACTURE,
        algorithm_id=algorithm_id,
        finding_sites=sites,
        measurements=[_measurement(PROBABILITY, result.score, header)],
        qualitative_evaluations=evaluation,
    )
    box_groups: list[Group] = [
        PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=tracking_uid(view.source, algorithm.version, index, node.uid_prefix),
                identifier=f"image {number} fracture region {index}",
            ),
            referenced_region=ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=box_polyline(box, view),
                source_image=_region_source(header),
            ),
            finding_type=FRACTURE,
            algorithm_id=algorithm_id,
            finding_sites=sites,
            measurements=[_measurement(BOX_CERTAINTY, box.score, header, MAXIMUM)],
            qualitative_evaluations=evaluation,
        )
        for index, box in enumerate(result.boxes, start=1)
    ]
    return [image_group, *box_groups]


def _not_analysed_group(
    number: int, image: NotAnalysedImage, algorithm: AlgorithmInfo, node: NodeIdentity
) -> Group:
    """The group of an image that got no decision: presence undetermined, and why."""
    header = result_header(image.header)
    tracking = TrackingIdentifier(
        uid=tracking_uid(image.source, algorithm.version, 0, node.uid_prefix),
        identifier=f"image {number} not analysed",
    )
    evaluation = [QualitativeEvaluation(PRESENCE, UNDETERMINED)]
    group: Group
    rows, columns = _positive(header.get("Rows")), _positive(header.get("Columns"))
    if rows is not None and columns is not None:
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=_whole_image(header, rows, columns),
            finding_type=FRACTURE,
            qualitative_evaluations=evaluation,
        )
    else:  # no size known: the image is named without a region
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=FRACTURE,
            qualitative_evaluations=evaluation,
            source_images=[
                SourceImageForMeasurementGroup(header.SOPClassUID, header.SOPInstanceUID)
            ],
        )
    group[0].ContentSequence.append(
        TextContentItem(
            name=codes.DCM.Comment,
            value=f"Not analysed: {image.reason}",
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _whole_image(header: Dataset, rows: int, columns: int) -> ImageRegion:
    """The region of an image-level assessment: a closed POLYLINE along the image's border
    (``rows`` x ``columns``: the decoded image's size, or a not analysed image's header's)."""
    width, height = float(columns), float(rows)
    border = np.array(
        [(0.0, 0.0), (width, 0.0), (width, height), (0.0, height), (0.0, 0.0)], dtype=np.float32
    )
    return ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=border,
        source_image=_region_source(header),
    )


def _region_source(header: Dataset) -> SourceImageForRegion:
    """The reference of a region to its image, by SOP Class and Instance UID (highdicom's
    ``from_source_image`` also wants Modality and pixel description attributes, which a header
    may lack or hold unusable values for: the reference needs the UIDs only)."""
    return SourceImageForRegion(header.SOPClassUID, header.SOPInstanceUID)


def _positive(value: object) -> int | None:
    """A header value as a positive integer (Rows, Columns), None if it is not one."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number > 0 else None


def _spacing(value: object) -> tuple[float, float] | None:
    """Imager Pixel Spacing (row, column) as two positive finite numbers, None if it is not.

    Empty values in a multi-valued DS ("\\" is two of them) pass the header checks; they once
    failed the whole SR with float('') (fuzz case 20261205:348)."""
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(numbers) != 2 or not all(math.isfinite(n) and n > 0 for n in numbers):
        return None
    return numbers[0], numbers[1]


def _measurement(
    name: Code, value: float, header: Dataset, derivation: Code | None = None
) -> Measurement:
    """A value in [0, 1] as a TID 300 measurement inferred from the source image."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"score {value} is outside [0, 1]")
    return Measurement(
        name=name,
        value=float(value),
        unit=PROBABILITY_UNIT,
        derivation=derivation,
        referenced_images=[SourceImageForMeasurement(header.SOPClassUID, header.SOPInstanceUID)],
    )
